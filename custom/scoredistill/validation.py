"""Setting validation for the pack's systems, run before anything heavy loads (threestudio adapter helpers).

threestudio builds a system in this order: ``BaseLift3DSystem.configure`` makes the geometry (for
``gsplat-gaussian-splatting`` possibly Shap-E), material, background and renderer; launch.py then creates the
Trainer, whose ``ConfigSnapshotCallback.on_fit_start`` writes ``<trial>/configs/parsed.yaml`` and ``raw.yaml``;
only then does the system's ``on_fit_start`` build the prompt processor (text encoder) and the guidance (UNet),
and Lightning restores the checkpoint.  So a guidance setting error used to be reported after Shap-E had run,
and a failed start (e.g. ``--config <trial>/configs/parsed.yaml resume=... system.guidance.x=<bad>``) had already
overwritten the trial's ``parsed.yaml`` / ``raw.yaml``.

The pack's systems (``gsplat-system``, ``gsplat-edit-system``, ``nerf-edit-system``, ``hifa-system``) call
:func:`validate_system_settings` at the start of ``configure`` — before the geometry is built — which checks the
prompt, the guidance config (the guidance's own ``validate_config`` on a model-free instance), the prompt
processor, geometry, renderer, densification strategy and exporter configs.  Their ``setup`` hook calls
:func:`defer_config_snapshot`, which moves threestudio's config snapshot from ``on_fit_start`` to
``on_train_start`` (after the guidance and text encoder have loaded and the checkpoint was restored), so a start
that fails anywhere before training leaves an existing trial's files untouched.

Error messages name the full dotted setting (``system.guidance.guidance_scale``): :func:`qualify_message`
prefixes the field names of a config in a message that names them bare.
"""
from __future__ import annotations

import math
import re
import types
from typing import Any, Iterable, Optional


def _field_names(config_cls) -> list:
    from dataclasses import fields, is_dataclass

    return [f.name for f in fields(config_cls)] if is_dataclass(config_cls) else []


def qualify_message(message: str, prefix: str, names: Iterable[str]) -> str:
    """``message`` with the first bare setting of ``names`` it mentions written as ``{prefix}.{name}``.

    The first mention is the setting at fault (``min_step_percent (0.5) must be <= max_step_percent``).  Names with
    an underscore (``guidance_scale``) are looked for anywhere as a whole word not already preceded by ``.``;
    one-word names (``mode``, ``trajectory``), which may be plain English, only at the start of the message or
    right after a ``"<class>: "`` prefix.  A message that already names a ``system.`` setting is left as it is.
    """
    names = sorted({n for n in names if n}, key=len, reverse=True)
    if not names or message.startswith("system.") or re.match(r"^[\w\-]+: system\.", message):
        return message
    single = [n for n in names if "_" not in n]
    if single:
        pattern = re.compile(r"^((?:[\w\-]+: )?)(" + "|".join(re.escape(n) for n in single) + r")(?![\w.])")
        out = pattern.sub(lambda m: f"{m.group(1)}{prefix}.{m.group(2)}", message, count=1)
        if out != message:
            return out
    multi = [n for n in names if "_" in n]
    if multi:
        pattern = re.compile(r"(?<![\w.\-])(" + "|".join(re.escape(n) for n in multi) + r")(?![\w])")
        return pattern.sub(lambda m: f"{prefix}.{m.group(1)}", message, count=1)
    return message


def run_qualified(fn, prefix: str, config_cls) -> None:
    """Call ``fn()``; re-raise its ``ValueError`` with the config's setting names qualified by ``prefix``."""
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        qualified = qualify_message(msg, prefix, _field_names(config_cls))
        if qualified == msg:
            raise
        raise ValueError(qualified) from e


def parse_settings(config_cls, cfg: Any, prefix: str):
    """threestudio's ``parse_structured`` with an error that names ``prefix`` (unknown or mistyped keys)."""
    from omegaconf import OmegaConf
    from threestudio.utils.config import parse_structured

    if cfg is None:
        cfg = {}
    try:
        return parse_structured(config_cls, cfg)
    except TypeError as e:  # unknown keyword argument
        known = sorted(_field_names(config_cls))
        given = sorted(OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else dict(cfg))
        unknown = [k for k in given if k not in known]
        raise ValueError(f"{prefix}: unknown settings {[f'{prefix}.{k}' for k in unknown] or given} ({e})") from None
    except Exception as e:  # omegaconf ValidationError: wrong type
        raise ValueError(f"{prefix}: {type(e).__name__}: {e}".replace("\n", " ")) from None


def validate_guidance_settings(guidance_type: str, guidance_cfg: Any, prefix: str = "system.guidance") -> None:
    """Parse the guidance config and, for the pack's guidances, run its ``validate_config`` without loading models.

    The instance is made with ``object.__new__`` and only ``cfg`` set; ``validate_config`` reads only ``cfg``.
    """
    import threestudio

    cls = threestudio.find(guidance_type)
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
    cls = threestudio.find(prompt_processor_type)
    parse_settings(cls.Config, cfg, prefix)


def _check_finite_tree(value: Any, name: str) -> None:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        try:  # "nan" / "inf" from a dotlist override stay strings in untyped config dicts
            number = float(value)
        except ValueError:
            return
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite_tree(v, f"{name}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite_tree(v, f"{name}[{i}]")


def validate_system_settings(system, guidance_cfg: Any = None) -> None:
    """Check every setting of a pack system before anything heavy loads.

    Args:
        system: the threestudio system being configured (``system.cfg`` is its parsed config).
        guidance_cfg: the guidance config the system will build the guidance with (default ``cfg.guidance``).

    Raises:
        ValueError: naming the full dotted setting and its allowed range.
    """
    import threestudio

    cfg = system.cfg
    validate_prompt_settings(cfg.prompt_processor_type, cfg.prompt_processor)
    source_prompt = getattr(cfg, "source_prompt", None)
    if source_prompt is not None and (not isinstance(source_prompt, str) or not source_prompt.strip()):
        raise ValueError(f"system.source_prompt must be a non-empty text prompt or null, got {source_prompt!r}")
    validate_guidance_settings(cfg.guidance_type, cfg.guidance if guidance_cfg is None else guidance_cfg)
    geo_cls = threestudio.find(cfg.geometry_type)
    from scoredistill.geometry.gaussian_splatting import GsplatGaussianSplatting, check_gaussian_geometry_config

    if issubclass(geo_cls, GsplatGaussianSplatting):
        check_gaussian_geometry_config(parse_settings(geo_cls.Config, cfg.geometry, "system.geometry"), "system.geometry")
    ren_cls = threestudio.find(cfg.renderer_type)
    from scoredistill.renderer.gsplat_rasterizer import GsplatRasterizer, check_rasterizer_config

    if issubclass(ren_cls, GsplatRasterizer):
        check_rasterizer_config(parse_settings(ren_cls.Config, cfg.renderer, "system.renderer"), "system.renderer")
    if hasattr(cfg, "strategy"):
        from scoredistill.geometry.densify import validate_strategy_config

        renderer = cfg.renderer if issubclass(ren_cls, GsplatRasterizer) else {}
        validate_strategy_config(dict(cfg.strategy or {}), dict(renderer or {}))
    # every other number the system reads (after the specific checks above, whose messages give the range)
    _check_finite_tree(cfg.loss, "system.loss")
    _check_finite_tree(cfg.optimizer, "system.optimizer")
    for key in ("geometry", "material", "background", "renderer"):
        typ = getattr(cfg, f"{key}_type", None)
        if typ:
            _check_finite_tree(getattr(cfg, key), f"system.{key}")
    exp_type = getattr(cfg, "exporter_type", None)
    if exp_type:
        exp_cls = threestudio.find(exp_type)
        parsed = parse_settings(exp_cls.Config, cfg.exporter, "system.exporter")
        check = getattr(exp_cls, "check_config", None)
        if check is not None:
            check(parsed, "system.exporter")


def defer_config_snapshot(trainer) -> int:
    """Move threestudio's ``ConfigSnapshotCallback`` write from ``on_fit_start`` to ``on_train_start``.

    ``on_fit_start`` runs before the system's own ``on_fit_start`` (text encoder, guidance) and before the
    checkpoint's training state is restored, so a start that fails there would already have replaced an existing
    trial's ``configs/parsed.yaml`` and ``raw.yaml``.  ``on_train_start`` runs after all of it.  Returns the number
    of callbacks deferred (0 when there is no trainer or no snapshot callback, e.g. ``--export``).
    """
    if trainer is None:
        return 0
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
