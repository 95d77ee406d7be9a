"""Where the pack's files are: one small module that the command line (:mod:`scoredistill.cli`), the suite runner
(:mod:`scoredistill.suite`) and the benchmarks import, so that none of them imports another for a path.

* :data:`PACKAGE_DIR` -- this package's folder (what ``scoredistill link`` links into ``threestudio/custom/``).
* :data:`CHECKOUT` -- the repository holding the package when it runs from a checkout (``<repo>/custom/scoredistill``
  beside ``<repo>/setup.py``), else ``None`` (a non-editable ``pip install .``).
* :data:`CONFIGS` -- the pack's threestudio configs, ``<repo>/configs`` (also when ``CHECKOUT`` is ``None``: the
  path a checkout would have, as before).
"""
from __future__ import annotations

import os
from typing import Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.normpath(os.path.join(PACKAGE_DIR, "..", ".."))
CHECKOUT: Optional[str] = _REPO if os.path.isfile(os.path.join(_REPO, "setup.py")) else None
CONFIGS = os.path.join(_REPO, "configs")
