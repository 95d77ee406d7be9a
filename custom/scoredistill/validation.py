"""Setting validation for the pack's systems, run before anything heavy loads (threestudio adapter helpers).

threestudio builds a system in this order: ``BaseLift3DSystem.configure`` makes the geometry (for
``gsplat-gaussian-splatting`` possibly Shap-E), material, background and renderer; launch.py then creates the
Trainer, whose ``ConfigSnapshotCallback.on_fit_start`` writes ``<trial>/configs/parsed.yaml`` and ``raw.yaml``;
only then does the system's ``on_fit_start`` build the prompt processor (text encoder) and the guidance (UNet),
and Lightning restores the checkpoint.  So a guidance setting error used to be reported after Shap-E had run,
and a failed start (e.g. ``--config <trial>/configs/parsed.yaml resume=... system.guidance.x=<bad>``) had already
overwritten the trial's ``parsed.yaml`` / ``raw.yaml``.

The pack's systems (``gsplat-system``, ``gsplat-edit-system``, ``nerf-edit-system``, ``hifa-system``) call
:func:`validate_system_settings` at the start of ``configure`` — before the geometry is built.  This module is the
launch-time orchestration only: it decides which part's own check runs, in which order, before anything heavy
loads -- the prompt (and the prompt processor's config), the guidance (its own ``validate_config`` on a model-free
instance), the geometry, the renderer and the exporter (each its own ``validate_settings(cfg, prefix)``
classmethod next to its ``Config``), the densification schedule (``geometry.densify.validate_settings``), and the
settings no part owns: ``system.loss`` / ``system.optimizer`` (shared by every pack system) and threestudio's
``data.*``.  Their ``setup`` hook calls :func:`defer_config_snapshot`, which moves threestudio's config snapshot
from ``on_fit_start`` to ``on_train_start`` (after the guidance and text encoder have loaded and the checkpoint was
restored), so a start that fails anywhere before training leaves an existing trial's files untouched.

Error messages name the full dotted setting (``system.guidance.guidance_scale``) and its allowed range; the
helpers the parts share for that (the number-range check, the parsing, the qualifying of bare field names) are in
:mod:`scoredistill.settings`.
"""
from __future__ import annotations

import functools
import math
import types
from typing import Any

from scoredistill.settings import check_range, in_range, interval, is_number, parse_settings, plain, run_qualified


def find_registered(type_name: Any, setting: str):
    """``threestudio.find(type_name)`` with an error naming ``setting`` and the registered names of its kind.

    Before: ``system.guidance_type=no-such-guidance`` raised a bare ``KeyError: 'no-such-guidance'``.
    """
    import threestudio

    try:
        return threestudio.find(type_name)
    except (KeyError, TypeError):
        kind = setting.rsplit(".", 1)[-1].replace("_type", "")  # guidance, geometry, prompt_processor, ...
        word = kind.split("_")[-1]
        names = sorted(n for n in getattr(threestudio, "__modules__", {}) if word in n)
        raise ValueError(f"{setting}: {type_name!r} is not a registered threestudio {kind.replace('_', ' ')}; "
                         f"registered: {', '.join(names) or '(none)'}") from None


def validate_guidance_settings(guidance_type: str, guidance_cfg: Any, prefix: str = "system.guidance") -> None:
    """Parse the guidance config and, for the pack's guidances, run its ``validate_config`` without loading models.

    The instance is made with ``object.__new__`` and only ``cfg`` set; ``validate_config`` reads only ``cfg``.
    """
    cls = find_registered(guidance_type, prefix + "_type")
    parsed = parse_settings(cls.Config, guidance_cfg, prefix)
    validate = getattr(cls, "validate_config", None)
    if validate is None:
        return
    probe = object.__new__(cls)
    probe.cfg = parsed
    run_qualified(types.MethodType(validate, probe), prefix, cls.Config)


def validate_prompt_settings(prompt_processor_type: str, cfg: Any, prefix: str = "system.prompt_processor") -> None:
    """A non-empty prompt (an empty one trained silently into a folder named ``@<timestamp>``) and a valid config."""
    import threestudio

    prompt = cfg.get("prompt", None) if cfg is not None else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{prefix}.prompt must be a non-empty text prompt, got {prompt!r}")
    cls = find_registered(prompt_processor_type, prefix + "_type")
    parsed = parse_settings(cls.Config, cfg, prefix)
    check_prompt_token_length(parsed, prefix)


#: views threestudio's prompt processor appends to the prompt (``view_dependent_prompting``; ``…_front``: prepends)
_VIEW_SUFFIXES = ("side", "front", "back", "overhead")
_VIEW_PREFIXES = ("side", "front", "backside", "overhead")


@functools.lru_cache(maxsize=4)
def _local_tokenizer(path: str):
    """The model's tokenizer from a local folder or the Hugging Face cache (no download), or ``None``."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except Exception:
        return None


def check_prompt_token_length(parsed: Any, prefix: str = "system.prompt_processor") -> None:
    """Refuse a prompt (or negative prompt) longer than the text encoder's context, before any model loads.

    threestudio's prompt processors tokenize with ``padding="max_length"`` and no truncation, so a prompt over
    ``model_max_length`` (77 for SD's CLIP, start and end tokens included) failed inside the text encoder after
    Stable Diffusion had loaded.  The longest view-dependent form of the prompt (``"<prompt>, overhead view"``;
    with ``view_dependent_prompt_front``: ``"backside view of <prompt>"``) is what is encoded, so that is counted.
    Only the tokenizer (a few files) is read, from ``pretrained_model_name_or_path`` locally or from the Hugging
    Face cache; when it is not there the check is left to the prompt processor.
    """
    path = getattr(parsed, "pretrained_model_name_or_path", None)
    prompt = getattr(parsed, "prompt", None)
    if not isinstance(path, str) or not isinstance(prompt, str):
        return
    tok = _local_tokenizer(path)
    limit = getattr(tok, "model_max_length", None)
    if tok is None or not isinstance(limit, int) or limit > 100_000:
        return
    texts = {"prompt": [prompt]}
    if getattr(parsed, "view_dependent_prompting", True):
        if getattr(parsed, "view_dependent_prompt_front", False):
            texts["prompt"] += [f"{v} view of {prompt}" for v in _VIEW_PREFIXES]
        else:
            texts["prompt"] += [f"{prompt}, {v} view" for v in _VIEW_SUFFIXES]
    negative = getattr(parsed, "negative_prompt", None)
    if isinstance(negative, str) and negative:
        texts["negative_prompt"] = [negative]
    for key, variants in texts.items():
        counts = [len(tok(t).input_ids) for t in variants]
        worst = max(range(len(counts)), key=counts.__getitem__)
        if counts[worst] > limit:
            form = "" if variants[worst] == variants[0] else f" in its view-dependent form {variants[worst]!r}"
            raise ValueError(f"{prefix}.{key} is {counts[worst]} tokens{form}, start and end tokens included; the text "
                             f"encoder of {path} takes at most {limit}: shorten it by {counts[worst] - limit} tokens")


def _check_finite_tree(value: Any, name: str) -> None:
    from omegaconf import OmegaConf

    from scoredistill.integrity.checkpointing import named_leaves

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    for path, leaf in named_leaves(value, name, dotted=True):
        if OmegaConf.is_config(leaf):
            _check_finite_tree(leaf, path)
            continue
        if isinstance(leaf, str):
            try:  # "nan" / "inf" from a dotlist override stay strings in untyped config dicts
                number = float(leaf)
            except ValueError:
                continue
        elif isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            number = leaf
        else:
            continue
        if not math.isfinite(number):
            raise ValueError(f"{path} must be a finite number, got {leaf!r}")


def validate_system_settings(system, guidance_cfg: Any = None) -> None:
    """Check every setting of a pack system before anything heavy loads.

    Args:
        system: the threestudio system being configured (``system.cfg`` is its parsed config).
        guidance_cfg: the guidance config the system will build the guidance with (default ``cfg.guidance``).

    Raises:
        ValueError: naming the full dotted setting and its allowed range.
    """
    cfg = system.cfg
    dm = launch_datamodule()
    if dm is not None:  # launch.py: its data.* settings too, before the geometry (Shap-E) is built
        validate_data_settings(dm.cfg, "data")
    validate_prompt_settings(cfg.prompt_processor_type, cfg.prompt_processor)
    source_prompt = getattr(cfg, "source_prompt", None)
    if source_prompt is not None and (not isinstance(source_prompt, str) or not source_prompt.strip()):
        raise ValueError(f"system.source_prompt must be a non-empty text prompt or null, got {source_prompt!r}")
    validate_guidance_settings(cfg.guidance_type, cfg.guidance if guidance_cfg is None else guidance_cfg)
    for key in ("material", "background"):
        if getattr(cfg, f"{key}_type", None):
            find_registered(getattr(cfg, f"{key}_type"), f"system.{key}_type")
    validate_part_settings(cfg, "geometry")
    renderer = validate_part_settings(cfg, "renderer")
    if hasattr(cfg, "strategy"):
        from scoredistill.geometry import densify

        densify.validate_settings(cfg.strategy, "system.strategy", _config_dict(renderer))
    check_loss_weights(cfg.loss)
    check_optimizer_settings(cfg.optimizer)
    # every other number the system reads (after the specific checks above, whose messages give the range)
    _check_finite_tree(cfg.loss, "system.loss")
    _check_finite_tree(cfg.optimizer, "system.optimizer")
    for key in ("geometry", "material", "background", "renderer"):
        typ = getattr(cfg, f"{key}_type", None)
        if typ:
            _check_finite_tree(getattr(cfg, key), f"system.{key}")
    if getattr(cfg, "exporter_type", None):
        validate_part_settings(cfg, "exporter", parse_only=True)


def validate_part_settings(cfg: Any, key: str, parse_only: bool = False) -> Any:
    """Run the own settings check of the part ``system.{key}`` (``geometry``, ``renderer``, ``exporter``).

    The part is the class registered as ``system.{key}_type``; the pack's parts (``gsplat-gaussian-splatting``,
    ``gsplat-rasterizer``, ``kernel-smoothed-volume-renderer``, the exporters) check their settings in a
    ``validate_settings(cfg, prefix)`` classmethod next to their ``Config``, which returns what it parsed.  A
    foreign part (threestudio's own) has none: its config is only parsed when ``parse_only`` (its own parse
    errors then name ``system.{key}``).  Returns the part's parsed settings, or ``None``.
    """
    prefix = f"system.{key}"
    cls = find_registered(getattr(cfg, f"{key}_type"), f"{prefix}_type")
    validate = getattr(cls, "validate_settings", None)
    if callable(validate):
        return validate(getattr(cfg, key), prefix)
    if parse_only:
        return parse_settings(cls.Config, getattr(cfg, key), prefix)
    return None


def _config_dict(parsed: Any) -> dict:
    """A part's parsed settings as a plain ``dict`` (``{}`` for ``None`` or settings that are no config)."""
    value = plain(parsed)
    return value if isinstance(value, dict) else {}


def check_optimizer_settings(optimizer: Any, prefix: str = "system.optimizer") -> None:
    """Every learning rate (``args.lr``, ``params.<group>.lr``) a finite number > 0, and ``name`` an optimizer.

    Before: ``lr=abc`` reached torch as a string (``TypeError: '<' not supported ...``) and ``lr=-1`` gave torch's
    ``Invalid learning rate: -1`` -- neither naming the setting.
    """
    opt = plain(optimizer)
    if not isinstance(opt, dict):
        return
    name = opt.get("name")
    if name is not None:
        import torch

        if not isinstance(name, str) or (name not in ("FusedAdam", "Adan") and
                                         not isinstance(getattr(torch.optim, name, None), type)):
            raise ValueError(f"{prefix}.name must be a torch.optim optimizer (Adam, AdamW, SGD, ...), got {name!r}")
    lrs = []
    if isinstance(opt.get("args"), dict) and "lr" in opt["args"]:
        lrs.append((f"{prefix}.args.lr", opt["args"]["lr"]))
    for group, args in (opt.get("params") or {}).items() if isinstance(opt.get("params"), dict) else ():
        if isinstance(args, dict) and "lr" in args:
            lrs.append((f"{prefix}.params.{group}.lr", args["lr"]))
    for setting, lr in lrs:
        check_range(lr, setting, 0, open_low=True)


def check_loss_weights(loss: Any, prefix: str = "system.loss") -> None:
    """Every ``lambda_*`` weight >= 0 (a constant or a threestudio schedule ``[start_step, start, end, end_step]``).

    A negative weight is refused, not trained: ``lambda_sds=-1`` turns score distillation into score *ascent*
    (the render is pushed away from the prompt) and ran silently.  0 turns a term off.
    """
    values = plain(loss)
    if not isinstance(values, dict):
        return
    for key, value in values.items():
        if not str(key).startswith("lambda_"):
            continue
        numbers = value if isinstance(value, list) else [value]
        for v in numbers:
            if is_number(v) and v < 0:
                raise ValueError(f"{prefix}.{key} must be >= 0 (a loss weight; 0 turns the term off), got {value!r}")


def _int_or_int_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def validate_data_settings(data: Any, prefix: str = "data") -> None:
    """threestudio's ``random-camera-datamodule`` settings the pack's configs depend on.

    Before: ``data.batch_size=0`` / ``-1``, ``data.width=0``, ``data.height=0`` and ``data.fovy_range=[0, 0]`` were
    accepted and failed (or rendered NaN cameras) mid-training.  Checked: ``batch_size``, ``width``, ``height``
    (an integer or one per ``resolution_milestones`` stage) and ``eval_*`` sizes >= 1; ``fovy_range`` two finite
    degrees ``0 < lo <= hi < 180``; ``eval_fovy_deg`` in ``(0, 180)``; ``camera_distance_range`` ``0 < lo <= hi``;
    ``elevation_range`` / ``azimuth_range`` ``lo <= hi``; ``n_val_views``, ``n_test_views`` >= 1.
    """
    d = plain(data)
    if not isinstance(d, dict):
        return
    stages = 1 + len(d.get("resolution_milestones") or [])
    for key in ("batch_size", "width", "height"):
        if key not in d:
            continue
        values = _int_or_int_list(d[key])
        if not values or not all(in_range(v, 1, integer=True) for v in values):
            raise ValueError(f"{prefix}.{key} must be an integer >= 1 (or a list of them, one per "
                             f"{prefix}.resolution_milestones stage), got {d[key]!r}")
        if isinstance(d[key], list) and len(values) != stages:
            raise ValueError(f"{prefix}.{key} has {len(values)} entries but {prefix}.resolution_milestones gives "
                             f"{stages} stages")
    for key in ("eval_batch_size", "eval_width", "eval_height", "n_val_views", "n_test_views"):
        if key in d:
            check_range(d[key], f"{prefix}.{key}", 1, integer=True)

    def pair(key, low=-math.inf, high=math.inf, open_low=False, open_high=False):
        if key not in d:
            return
        v = d[key]
        ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(in_range(x, low, high, open_low, open_high) for x in v)
        if not (ok and v[0] <= v[1]):
            raise ValueError(f"{prefix}.{key} must be [lo, hi], two finite numbers with lo <= hi in "
                             f"{interval(low, high, open_low, open_high)}, got {v!r}")

    pair("fovy_range", 0, 180, open_low=True, open_high=True)
    pair("camera_distance_range", 0, open_low=True)
    pair("elevation_range", -90, 90)
    pair("azimuth_range")
    if "eval_fovy_deg" in d:
        check_range(d["eval_fovy_deg"], f"{prefix}.eval_fovy_deg", 0, 180, open_low=True, open_high=True, note=" degrees")


def launch_datamodule(max_depth: int = 40):
    """The datamodule that threestudio's ``launch.py`` built just before the system (its local ``dm``), found on the
    call stack while the system is being configured, or ``None`` (another caller).

    launch.py makes ``dm = threestudio.find(cfg.data_type)(cfg.data)`` and then the system, whose ``configure``
    builds the geometry (Shap-E by default) -- so looking the datamodule up here lets its ``data.*`` settings be
    checked before anything loads.  The system's ``setup`` hook checks them again through the trainer
    (:func:`validate_trainer_settings`) for any other caller.
    """
    import inspect

    try:
        import pytorch_lightning as pl
    except ImportError:  # pragma: no cover
        return None
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            dm = frame.f_locals.get("dm")
            if isinstance(dm, pl.LightningDataModule) and getattr(dm, "cfg", None) is not None:
                return dm
        return None
    finally:
        del frame


def validate_trainer_settings(trainer) -> None:
    """The run's ``data.*`` settings, from the trainer's datamodule (:func:`validate_data_settings`).

    The pack's systems see only ``system.*`` in ``configure``; the datamodule is reachable once Lightning has
    attached it, in the system's ``setup`` hook -- after the datamodule's own ``setup`` (which accepts these
    values) and before ``on_fit_start`` loads the text encoder and Stable Diffusion.
    """
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    cfg = getattr(dm, "cfg", None)
    if cfg is not None:
        validate_data_settings(cfg, "data")


def defer_config_snapshot(trainer) -> int:
    """Move threestudio's ``ConfigSnapshotCallback`` write from ``on_fit_start`` to ``on_train_start``.

    ``on_fit_start`` runs before the system's own ``on_fit_start`` (text encoder, guidance) and before the
    checkpoint's training state is restored, so a start that fails there would already have replaced an existing
    trial's ``configs/parsed.yaml`` and ``raw.yaml``.  ``on_train_start`` runs after all of it.  Returns the number
    of callbacks deferred (0 when there is no trainer or no snapshot callback, e.g. ``--export``).

    The pack's systems call this from their ``setup`` hook, which is also where the run's ``data.*`` settings
    become reachable: they are checked first (:func:`validate_trainer_settings`), so a bad one is refused
    before any model loads and before the snapshot.
    """
    if trainer is None:
        return 0
    validate_trainer_settings(trainer)
    try:
        from threestudio.utils.callbacks import ConfigSnapshotCallback
    except ImportError:  # pragma: no cover
        return 0
    n = 0
    for cb in getattr(trainer, "callbacks", []) or []:
        if isinstance(cb, ConfigSnapshotCallback) and not getattr(cb, "_scoredistill_deferred", False):
            cb._scoredistill_deferred = True
            cb.on_fit_start = lambda trainer, pl_module: None
            cb.on_train_start = lambda trainer, pl_module, _cb=cb: _cb.save_config_snapshot()
            n += 1
    return n
