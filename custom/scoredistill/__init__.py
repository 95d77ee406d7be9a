"""scoredistill: score-distillation methods for threestudio.

``import scoredistill`` never needs threestudio: the method maths lives in plain
functions over tensors (``scoredistill.maths``: one module per paper plus the shared
diffusion maths; ``scoredistill.geometry``/``renderer`` helpers).  When threestudio is
importable, importing this package (or threestudio's ``launch.py`` loading it from
its ``custom/`` folder) also registers the pack's modules with threestudio, once.
"""
__version__ = "0.1.0"

from ._registry import REGISTERED_NAMES, register_with_threestudio

THREESTUDIO_AVAILABLE = register_with_threestudio()
