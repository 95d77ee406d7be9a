"""Helpers every configurable part of the pack shares to validate its own settings.

Each part checks its own config next to where the config is declared (the geometry, the densification schedule,
the renderers, the exporters, the guidances, the systems); :mod:`scoredistill.validation` only decides, at launch,
which part's check runs before anything heavy loads.  What they share is here:

* :func:`check_range` -- the one number-range check: a number (never a ``bool``), finite, optionally an integer,
  inside a closed / open / half-bounded range, with an error naming the full dotted setting and the range
  (``system.geometry.sh_degree must be an integer in [0, 3], got 5``).  :func:`in_range` and
  :func:`describe_range` are its two halves, for checks whose message says more (a list of sizes, a pair);
* :func:`parse_settings` -- threestudio's ``parse_structured`` with an error naming the part's prefix;
* :func:`qualify_message` / :func:`run_qualified` -- a check written with bare field names (``guidance_scale must
  be ...``) re-raised with the full setting (``system.guidance.guidance_scale must be ...``);
* :func:`field_names`, :func:`plain` -- a config class's field names; OmegaConf containers as plain Python.

Nothing here imports threestudio or torch at module level (``parse_settings`` imports threestudio when called).
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

INF = math.inf


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (``True`` is an ``int`` in Python, never a setting's number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def in_range(value: Any, low: float = -INF, high: float = INF, open_low: bool = False, open_high: bool = False,
             integer: bool = False) -> bool:
    """Whether ``value`` is a finite number (an ``int`` when ``integer``; never a ``bool``) in the range.

    ``low`` / ``high`` are included unless ``open_low`` / ``open_high``; ``-inf`` / ``inf`` leave a side open.
    NaN and inf are refused whatever the range (NaN passes no comparison, so it is tested first).
    """
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = is_number(value) and math.isfinite(value)
    if not ok:
        return False
    if value < low or (open_low and value == low):
        return False
    return not (value > high or (open_high and value == high))


def interval(low: float, high: float, open_low: bool = False, open_high: bool = False) -> str:
    """``[low, high]`` / ``(low, high)`` / ``[low, high)`` ... as written in messages (bounds as given: 0 or 0.0)."""
    return f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def describe_range(low: float = -INF, high: float = INF, open_low: bool = False, open_high: bool = False,
                   integer: bool = False) -> str:
    """What :func:`in_range` accepts, in words: ``an integer in [0, 3]``, ``a finite number > 0``,
    ``an integer >= 1``, ``a finite number in (0, 1)``, ``a finite number``."""
    kind = "an integer" if integer else "a finite number"
    if low > -INF and high < INF:
        return f"{kind} in {interval(low, high, open_low, open_high)}"
    if low > -INF:
        return f"{kind} {'>' if open_low else '>='} {low}"
    if high < INF:
        return f"{kind} {'<' if open_high else '<='} {high}"
    return kind


def check_range(value: Any, setting: str, low: float = -INF, high: float = INF, open_low: bool = False,
                open_high: bool = False, integer: bool = False, optional: bool = False, note: str = "") -> Any:
    """Return ``value`` if it is a finite number in the range (:func:`in_range`), else raise ``ValueError``.

    Args:
        value: the setting's value.
        setting: its full dotted name (``system.strategy.refine_every``), or a bare field name in a check whose
            caller qualifies it (:func:`run_qualified`).
        low, high, open_low, open_high: the allowed range; bounds are included unless open, ``-inf`` / ``inf``
            (the defaults) leave a side unbounded.  Written in the message as given (``0`` or ``0.0``).
        integer: the value must be an ``int`` (``3.0`` is refused, as OmegaConf does for an ``int`` field).
        optional: ``None`` is accepted too (and the message says ``or null``).
        note: words added after the range in the message (``" (0 = exact)"``).

    Raises:
        ValueError: ``"{setting} must be {range}{ or null}{note}, got {value!r}"``, e.g.
            ``system.geometry.sh_degree must be an integer in [0, 3], got 5``.
    """
    if optional and value is None:
        return value
    if not in_range(value, low, high, open_low, open_high, integer):
        allowed = describe_range(low, high, open_low, open_high, integer)
        raise ValueError(f"{setting} must be {allowed}{' or null' if optional else ''}{note}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------- config parsing
def field_names(config_cls) -> list:
    """The field names of a dataclass config class (``[]`` for anything else)."""
    from dataclasses import fields, is_dataclass

    return [f.name for f in fields(config_cls)] if is_dataclass(config_cls) else []


def plain(value: Any) -> Any:
    """OmegaConf containers as plain Python dicts / lists (resolved); anything else unchanged."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover
        return value
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


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
        qualified = qualify_message(msg, prefix, field_names(config_cls))
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
        known = sorted(field_names(config_cls))
        given = sorted(OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else dict(cfg))
        unknown = [k for k in given if k not in known]
        raise ValueError(f"{prefix}: unknown settings {[f'{prefix}.{k}' for k in unknown] or given} ({e})") from None
    except Exception as e:  # omegaconf ValidationError: wrong type
        raise ValueError(f"{prefix}: {type(e).__name__}: {e}".replace("\n", " ")) from None
