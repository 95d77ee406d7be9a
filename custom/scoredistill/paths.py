"""Where the pack's files are, and linking the package into a threestudio tree: one small module that the command
line (:mod:`scoredistill.cli`), the suite runner (:mod:`scoredistill.suite`), the benchmarks and the demo import,
so that none of them imports another for a path.

* :data:`PACKAGE_DIR` -- this package's folder (what ``scoredistill link`` links into ``threestudio/custom/``).
* :data:`CHECKOUT` -- the repository holding the package when it runs from a checkout (``<repo>/custom/scoredistill``
  beside ``<repo>/setup.py``), else ``None`` (a non-editable ``pip install .``).
* :data:`CONFIGS` -- the pack's threestudio configs: ``<repo>/configs`` in a checkout, else the copy a wheel
  carries (``pack_configs/`` in the package, see setup.py).
* :func:`link` -- ``scoredistill link``: the package folder linked (or copied) into ``<threestudio>/custom/``.
* :data:`SCENES` -- the ground-truth scenes of the 3D benchmark: ``<repo>/load/gt_scenes``, else ``pack_scenes/``.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.normpath(os.path.join(PACKAGE_DIR, "..", ".."))
CHECKOUT: Optional[str] = _REPO if os.path.isfile(os.path.join(_REPO, "setup.py")) else None
CONFIGS = os.path.join(_REPO, "configs") if CHECKOUT else os.path.join(PACKAGE_DIR, "pack_configs")
SCENES = os.path.join(_REPO, "load", "gt_scenes") if CHECKOUT else os.path.join(PACKAGE_DIR, "pack_scenes")


def link(threestudio_root: str, copy: bool = False) -> str:
    """Link (or copy) the package into ``threestudio_root/custom/scoredistill``; returns that path.

    Raises:
        FileNotFoundError: ``threestudio_root`` has no ``launch.py`` or no ``custom/`` folder.
        FileExistsError: ``custom/scoredistill`` exists and is not a link to this package.
    """
    root = os.path.abspath(threestudio_root)
    if not os.path.isfile(os.path.join(root, "launch.py")) or not os.path.isdir(os.path.join(root, "custom")):
        raise FileNotFoundError(f"{root} is not a threestudio checkout (needs launch.py and custom/)")
    dest = os.path.join(root, "custom", "scoredistill")
    if os.path.islink(dest):
        if os.path.realpath(dest) == os.path.realpath(PACKAGE_DIR):
            return dest
        raise FileExistsError(f"{dest} links to {os.path.realpath(dest)}, not to {PACKAGE_DIR}; remove it first")
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} already exists; remove it first")
    if copy:
        shutil.copytree(PACKAGE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        os.symlink(PACKAGE_DIR, dest)
    return dest
