"""Suite files: prompts × configs × seeds, expanded into one launch.py command per run.

A suite is a YAML file::

    name: papers-small                 # default: the file name
    output_dir: outputs/suites/small   # default: <suite folder>/<name>-outputs; relative paths: to the suite file
    threestudio_root: /path/to/threestudio   # default: $THREESTUDIO_ROOT
    prompts: load/suites/papers.yaml   # a list, or a file (.txt one a line, .json / .yaml list), or
                                       # {t3bench: .../prompt_single.txt, limit: 10}, or {file: ..., limit: ...}
    configs:                           # one "method" each
      - name: sds
        config: pack:gs-sds            # pack:<name> = the pack's configs/<name>.yaml;
                                       # threestudio:<path> = relative to threestudio_root; else a path
        overrides: [system.guidance.guidance_scale=100]
      - pack:ge3d-gs                   # short form: name = the config's file name
    seeds: [0, 1]
    overrides: [trainer.max_steps=5000]      # for every run (config overrides come after, and win)
    gpus: [0, 1]                       # local runner: one run per GPU at a time
    launcher: ["{python}", launch.py]  # the command before launch.py's own arguments (see below)
    env: {HF_HUB_OFFLINE: "1"}         # extra environment of every run
    slurm: {timeout_min: 240, slurm_partition: gpu}   # submitit executor parameters (cluster runs)

Every run is ``LAUNCHER --config CONFIG --train --gpu 0 exp_root_dir=RUN_DIR name=CONFIG_NAME tag=TAG
use_timestamp=false seed=SEED system.prompt_processor.prompt=PROMPT OVERRIDES...`` in ``threestudio_root``,
with ``CUDA_VISIBLE_DEVICES`` set to the run's GPU, so its trial folder is ``RUN_DIR/CONFIG_NAME/TAG``
(no timestamp: a rerun lands in the same folder).  The default launcher is
``["{python}", "{count_launch}", "launch.py"]``: launch.py run unmodified, with a counter of UNet forward
samples (:mod:`scoredistill.suite.count_launch`); in the launcher ``{python}`` is replaced by the runner's
Python and ``{count_launch}`` by the path of ``count_launch.py``.  The test suite puts its CPU launcher between the counter and launch.py.

Overrides (``overrides:`` of the suite or of a config) may not set what the runner sets for every run
(:data:`RUNNER_SETTINGS`: ``exp_root_dir``, ``name``, ``tag``, ``use_timestamp``, ``trial_dir``, ``timestamp``,
``seed``, ``resume``, the prompt): one would move the trial out of ``RUN_DIR`` -- ``tag=../../x`` wrote outside
``output_dir`` and the run was "failed: no test video" on every rerun.  Every run folder must resolve inside
``output_dir`` (no symbolic link out of it).

Prompts are passed as a command-line override, which OmegaConf parses as YAML: a prompt that would not come
back as the same string (``a: b``, ``null``, ``123``) is quoted; one containing ``${`` is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from ..paths import CONFIGS as PACK_CONFIGS

COUNT_LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "count_launch.py")
DEFAULT_LAUNCHER = ["{python}", "{count_launch}", "launch.py"]
SUITE_KEYS = {"name", "output_dir", "threestudio_root", "prompts", "configs", "seeds", "overrides", "gpus",
              "launcher", "env", "slurm", "mode"}


class SuiteError(ValueError):
    """A suite file setting is invalid; the message names the setting (``suite.<key>``)."""


@dataclass
class Prompt:
    text: str
    source: Optional[str] = None  # citation (paper, figure / table)


@dataclass
class MethodConfig:
    name: str
    config: str  # absolute path
    overrides: List[str] = field(default_factory=list)


@dataclass
class Run:
    """One prompt × config × seed: everything needed to run it, written to ``RUN_DIR/run.json``."""

    run_id: str
    method: str
    prompt: str
    prompt_source: Optional[str]
    seed: int
    run_dir: str
    trial_dir: str
    config: str
    args: List[str]  # launch.py arguments after the launcher (without --gpu)
    cwd: str
    launcher: List[str]
    env: Dict[str, str]

    def command(self, gpu_arg: str = "0") -> List[str]:
        launcher = [a.replace("{python}", sys.executable).replace("{count_launch}", COUNT_LAUNCH)
                    for a in self.launcher]
        return launcher + self.args[:3] + ["--gpu", gpu_arg] + self.args[3:]

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Run":
        return cls(**d)


@dataclass
class Suite:
    name: str
    path: Optional[str]
    output_dir: str
    threestudio_root: str
    prompts: List[Prompt]
    configs: List[MethodConfig]
    seeds: List[int]
    overrides: List[str]
    gpus: List[int]
    launcher: List[str]
    env: Dict[str, str]
    slurm: Dict[str, Any]
    mode: str = "--train"

    def runs(self) -> List[Run]:
        out = []
        for m in self.configs:
            for p in self.prompts:
                for s in self.seeds:
                    out.append(make_run(self, m, p, s))
        return out


# ------------------------------------------------------------------------------------------------- prompts
def read_prompt_file(path: str, limit: Optional[int] = None) -> List[Prompt]:
    """Prompts from a file: ``.txt`` one a line (blank lines and ``#`` comments skipped; this is also the
    format of T3Bench's ``data/prompt_{single,surr,multi}.txt``), ``.json`` / ``.yaml`` / ``.yml`` a list of
    strings or of ``{prompt: ..., source: ...}`` (or a mapping with a ``prompts:`` list).

    Raises:
        FileNotFoundError: no such file.  SuiteError: bad contents.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"suite.prompts: prompt file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".json", ".yaml", ".yml"):
        with open(path, encoding="utf-8") as f:
            if ext == ".json":
                data = json.load(f)
            else:
                import yaml

                data = yaml.safe_load(f)
        if isinstance(data, dict) and "prompts" in data:
            data = data["prompts"]
        prompts = parse_prompt_list(data, f"suite.prompts ({path})")
    else:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
        prompts = [Prompt(ln) for ln in lines if ln and not ln.startswith("#")]
    if limit is not None:
        prompts = prompts[: int(limit)]
    if not prompts:
        raise SuiteError(f"suite.prompts: {path} holds no prompts")
    return prompts


def parse_prompt_list(data: Any, where: str = "suite.prompts") -> List[Prompt]:
    if not isinstance(data, list):
        raise SuiteError(f"{where}: expected a list of prompts, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(Prompt(item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            src = item.get("source")
            out.append(Prompt(item["prompt"].strip(), None if src is None else str(src)))
        else:
            raise SuiteError(f"{where}[{i}]: expected a string or {{prompt: ..., source: ...}}, got {item!r}")
        if not out[-1].text:
            raise SuiteError(f"{where}[{i}]: empty prompt")
    return out


def load_t3bench(path: str, limit: Optional[int] = None) -> List[Prompt]:
    """A T3Bench prompt list the user downloaded (``data/prompt_single.txt``, ``prompt_surr.txt`` or
    ``prompt_multi.txt`` of https://github.com/THU-LYJ-Lab/T3Bench: 100 prompts, one a line); each prompt's
    source is ``T3Bench <file name>``."""
    prompts = read_prompt_file(path, limit)
    tag = f"T3Bench {os.path.basename(path)}"
    return [Prompt(p.text, p.source or tag) for p in prompts]


# ------------------------------------------------------------------------------------------------- overrides
def safe_override(key: str, value: str) -> str:
    """``key=value`` such that OmegaConf's command-line parsing gives back exactly the string ``value``."""
    from omegaconf import OmegaConf

    if "${" in value:
        raise SuiteError(f"suite.prompts: {value!r} contains '${{', which OmegaConf reads as an interpolation")
    for cand in (value, json.dumps(value, ensure_ascii=False)):
        try:
            got = OmegaConf.select(OmegaConf.from_cli([f"{key}={cand}"]), key)
        except Exception:
            continue
        if got == value:
            return f"{key}={cand}"
    raise SuiteError(f"suite.prompts: {value!r} cannot be passed to launch.py as a {key} override")


def slug(text: str, n: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n].strip("_") or "prompt"
    return f"{s}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def make_run(suite: Suite, m: MethodConfig, p: Prompt, seed: int) -> Run:
    tag = f"{slug(p.text)}-seed{seed}"
    run_id = f"{m.name}/{tag}"
    run_dir = os.path.join(suite.output_dir, "runs", m.name, tag)
    if not within(run_dir, suite.output_dir):
        raise SuiteError(f"suite.output_dir: the folder of run {run_id}, {run_dir}, resolves to "
                         f"{os.path.realpath(run_dir)}, outside {os.path.realpath(suite.output_dir)} (a symbolic link?)")
    args = [
        "--config", m.config, suite.mode,
        f"exp_root_dir={run_dir}", f"name={m.name}", f"tag={tag}", "use_timestamp=false", f"seed={seed}",
        safe_override("system.prompt_processor.prompt", p.text),
        *suite.overrides, *m.overrides,
    ]
    return Run(run_id=run_id, method=m.name, prompt=p.text, prompt_source=p.source, seed=seed, run_dir=run_dir,
               trial_dir=os.path.join(run_dir, m.name, tag), config=m.config, args=args,
               cwd=suite.threestudio_root, launcher=list(suite.launcher), env=dict(suite.env))


# ------------------------------------------------------------------------------------------------- loading
def _resolve_config(spec: str, base: str, ts_root: str, where: str) -> str:
    if spec.startswith("pack:"):
        name = spec[5:]
        path = os.path.join(PACK_CONFIGS, name if name.endswith((".yaml", ".yml")) else name + ".yaml")
    elif spec.startswith("threestudio:"):
        path = os.path.join(ts_root, spec[len("threestudio:"):])
    else:
        path = spec if os.path.isabs(spec) else os.path.join(base, spec)
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise SuiteError(f"{where}: config {spec!r} not found ({path})")
    return path


#: launch.py settings the runner itself sets for every run: an override of one would move the trial folder out of
#: ``RUN_DIR`` (``exp_root_dir``, ``name``, ``tag``, ``use_timestamp``, ``trial_dir``, ``timestamp``) or make the
#: run something else than its prompt × seed (``seed``, the prompt)
RUNNER_SETTINGS = ("exp_root_dir", "name", "tag", "use_timestamp", "trial_dir", "timestamp", "seed",
                   "system.prompt_processor.prompt", "resume")


def _check_overrides(overrides: List[str], where: str) -> List[str]:
    """Refuse an override of a setting the runner sets itself (:data:`RUNNER_SETTINGS`) or one that is not
    ``key=value``; returns ``overrides``."""
    for i, o in enumerate(overrides):
        key = o.split("=", 1)[0].strip().lstrip("+~").strip()
        if "=" not in o or not key:
            raise SuiteError(f"{where}[{i}]: {o!r} is not a launch.py override KEY=VALUE")
        if key in RUNNER_SETTINGS:
            what = "the prompt comes from suite.prompts" if key.endswith("prompt") else (
                "the seed comes from suite.seeds" if key == "seed" else
                "a suite run resumes by running again, not from a checkpoint" if key == "resume" else
                "it would move the run's trial folder out of its run folder under suite.output_dir")
            raise SuiteError(f"{where}[{i}]: {o!r} overrides {key}, which the suite runner sets for every run "
                             f"({what}); allowed: any other launch.py setting")
    return overrides


def within(path: str, root: str) -> bool:
    """``path`` resolved (symbolic links followed) lies inside ``root`` resolved."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _str_list(value: Any, where: str) -> List[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SuiteError(f"{where}: expected a list of strings, got {value!r}")
    return list(value)


def _int_list(value: Any, where: str, default: List[int]) -> List[int]:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SuiteError(f"{where}: expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise SuiteError(f"{where}: duplicate entries in {value!r}")
    return list(value)


def _prompts(value: Any, base: str) -> List[Prompt]:
    if value is None:
        raise SuiteError("suite.prompts: required (a list, a file, or {t3bench: FILE})")
    if isinstance(value, str):
        return read_prompt_file(value if os.path.isabs(value) else os.path.join(base, value))
    if isinstance(value, dict):
        limit = value.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise SuiteError(f"suite.prompts.limit: expected an integer >= 1, got {limit!r}")
        for key, loader in (("t3bench", load_t3bench), ("file", read_prompt_file)):
            if key in value:
                f = value[key]
                return loader(f if os.path.isabs(f) else os.path.join(base, f), limit)
        raise SuiteError(f"suite.prompts: a mapping needs 'file' or 't3bench', got keys {sorted(value)}")
    prompts = parse_prompt_list(value)
    if not prompts:
        raise SuiteError("suite.prompts: empty list")
    return prompts


def load_suite(path_or_dict, base_dir: Optional[str] = None) -> Suite:
    """Parse and check a suite (a YAML file path or a dict); raises :class:`SuiteError` naming the setting."""
    if isinstance(path_or_dict, (str, os.PathLike)):
        path = os.path.abspath(path_or_dict)
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise SuiteError(f"suite: no such suite file {path}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SuiteError(f"suite: {path} is not valid YAML{at}: {problem}") from None
        except OSError as e:
            raise SuiteError(f"suite: cannot read {path}: {e.strerror or e}") from None
        base = base_dir or os.path.dirname(path)
        default_name = os.path.splitext(os.path.basename(path))[0]
    else:
        path, data = None, dict(path_or_dict)
        base = os.path.abspath(base_dir or os.getcwd())
        default_name = "suite"
    if not isinstance(data, dict):
        raise SuiteError("suite: the file must hold a mapping")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise SuiteError(f"suite: unknown setting(s) {sorted(unknown)}; allowed: {sorted(SUITE_KEYS)}")
    name = str(data.get("name") or default_name)
    ts_root = data.get("threestudio_root") or os.environ.get("THREESTUDIO_ROOT")
    if not ts_root:
        raise SuiteError("suite.threestudio_root: required (or set THREESTUDIO_ROOT)")
    ts_root = os.path.abspath(ts_root if os.path.isabs(ts_root) else os.path.join(base, ts_root))
    if not os.path.isfile(os.path.join(ts_root, "launch.py")):
        raise SuiteError(f"suite.threestudio_root: {ts_root} has no launch.py")
    out = data.get("output_dir") or f"{name}-outputs"
    out = os.path.abspath(out if os.path.isabs(out) else os.path.join(base, out))
    prompts = _prompts(data.get("prompts"), base)
    texts = [p.text for p in prompts]
    if len(set(texts)) != len(texts):
        dup = sorted({t for t in texts if texts.count(t) > 1})
        raise SuiteError(f"suite.prompts: duplicate prompts {dup}")
    raw_configs = data.get("configs")
    if not isinstance(raw_configs, list) or not raw_configs:
        raise SuiteError("suite.configs: required, a non-empty list of configs")
    configs = []
    for i, c in enumerate(raw_configs):
        where = f"suite.configs[{i}]"
        if isinstance(c, str):
            c = {"config": c}
        if not isinstance(c, dict) or not isinstance(c.get("config"), str):
            raise SuiteError(f"{where}: expected a config path or {{name, config, overrides}}, got {c!r}")
        extra = set(c) - {"name", "config", "overrides"}
        if extra:
            raise SuiteError(f"{where}: unknown setting(s) {sorted(extra)}; allowed: config, name, overrides")
        cfg = _resolve_config(c["config"], base, ts_root, f"{where}.config")
        cname = str(c.get("name") or os.path.splitext(os.path.basename(cfg))[0])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", cname):
            raise SuiteError(f"{where}.name: {cname!r} must be letters, digits and _ . + - (it names a folder)")
        overrides = _check_overrides(_str_list(c.get("overrides"), f"{where}.overrides"), f"{where}.overrides")
        configs.append(MethodConfig(cname, cfg, overrides))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise SuiteError(f"suite.configs: two configs share a name {names}; give each a distinct 'name'")
    launcher = data.get("launcher", DEFAULT_LAUNCHER)
    launcher = _str_list(launcher, "suite.launcher")
    if not launcher:
        raise SuiteError("suite.launcher: empty")
    env = data.get("env") or {}
    if not isinstance(env, dict):
        raise SuiteError(f"suite.env: expected a mapping, got {env!r}")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SuiteError(f"suite.slurm: expected a mapping of submitit parameters, got {slurm!r}")
    mode = data.get("mode", "--train")
    if mode not in ("--train", "--test"):
        raise SuiteError(f"suite.mode: expected --train or --test, got {mode!r}")
    return Suite(
        name=name, path=path, output_dir=out, threestudio_root=ts_root, prompts=prompts, configs=configs,
        seeds=_int_list(data.get("seeds"), "suite.seeds", [0]),
        overrides=_check_overrides(_str_list(data.get("overrides"), "suite.overrides"), "suite.overrides"),
        gpus=_int_list(data.get("gpus"), "suite.gpus", [0]), launcher=launcher,
        env={str(k): str(v) for k, v in env.items()}, slurm=dict(slurm), mode=mode,
    )
