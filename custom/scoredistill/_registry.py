"""Registration of the pack's threestudio modules, idempotent.

threestudio's ``register`` raises ``ValueError`` when a name is registered twice, and a
failing registration makes launch.py drop the whole extension ("IMPORT FAILED").  The pack
can be imported twice under different module names (``pip install -e .`` makes it
``scoredistill``; launch.py loads ``custom/<folder>`` under the folder's name), so every
registration goes through :func:`register`, which accepts a second registration of the same
class (same module path below the package, same qualified name) and keeps the first.
A name owned by another class is still an error.
"""
from __future__ import annotations

import importlib
import importlib.util

#: registered name -> "module.Class" below the package (filled by the adapters)
REGISTERED_NAMES: dict = {}

# Modules whose import registers adapters with threestudio (order matters only for
# readability; each module registers its own classes).
_ADAPTER_MODULES = (
    "geometry.gaussian_splatting",
    "renderer.gsplat_rasterizer",
    "renderer.kernel_smoothed_volume_renderer",
    "system.gsplat_system",
    "system.hifa_system",
    "system.uds_edit_system",
    "guidance.ge3d_guidance",
    "guidance.lods_guidance",
    "guidance.vdm_guidance",
    "guidance.uds_guidance",
    "guidance.hifa_guidance",
    "exporter.gaussian_ply_exporter",
    "exporter.gaussian_mesh_exporter",
)


def _identity(cls) -> str:
    module = cls.__module__.split(".", 1)[1] if "." in cls.__module__ else cls.__module__
    return f"{module}.{cls.__qualname__}"


def register(name: str):
    """Decorator: ``threestudio.register(name)`` that tolerates re-registration of the same class.

    Raises:
        ValueError: ``name`` is already registered to a different class (a name collision
            with threestudio or another extension).
    """
    import threestudio

    def decorator(cls):
        existing = threestudio.__modules__.get(name)
        if existing is not None:
            if _identity(existing) == _identity(cls):
                return existing
            raise ValueError(
                f"scoredistill: threestudio name '{name}' is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; cannot register "
                f"{cls.__module__}.{cls.__qualname__}"
            )
        threestudio.register(name)(cls)
        REGISTERED_NAMES[name] = _identity(cls)
        return cls

    return decorator


def threestudio_importable() -> bool:
    """Whether ``import threestudio`` gives the real threestudio package.

    A threestudio *checkout* in the current folder (``./threestudio/`` holding ``launch.py`` and the package in
    ``./threestudio/threestudio/``) imports as an empty namespace package when the real package is not on
    ``sys.path``; taking it for threestudio crashed ``import scoredistill`` with
    ``No module named 'threestudio.models'``.  Such a namespace module is removed from ``sys.modules`` again
    (so a later, correct ``sys.path`` can import the real package) and counts as "not importable".
    """
    import sys

    try:
        import threestudio
    except ImportError:
        return False
    if getattr(threestudio, "__file__", None) is None or not hasattr(threestudio, "register"):
        if sys.modules.get("threestudio") is threestudio:
            del sys.modules["threestudio"]
        return False
    return True


def register_with_threestudio() -> bool:
    """Import every adapter module (registering its classes) if threestudio is importable.

    Returns ``False`` (and registers nothing) when threestudio cannot be imported.
    Adapter modules that do not exist yet are skipped; an adapter that exists but fails
    to import raises, so a broken adapter is never silently missing.
    """
    if not threestudio_importable():
        return False
    package = __name__.rsplit(".", 1)[0]
    for rel in _ADAPTER_MODULES:
        full = f"{package}.{rel}"
        try:
            spec = importlib.util.find_spec(full)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        importlib.import_module(full)
    # The runtime never imports the tooling: model classes a diffusers folder names in its model_index.json (the
    # ground-truth prior of the 3D benchmark) are imported by whoever uses that folder -- the pack's guidances
    # through guidance.memory.pipeline_component_class, the benchmark's launch.py runs through
    # scoredistill/testing/gt_prior_launch.py.
    return True
