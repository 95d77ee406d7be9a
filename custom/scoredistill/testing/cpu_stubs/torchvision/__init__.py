"""Stand-in for torchvision (CPU runs only; the PyPI build for torch 2.13 is CUDA-only)."""
from _unavailable import module_getattr

__version__ = "0.0.0+scoredistill-cpu-stub"
from . import models, transforms  # noqa: E402,F401

__getattr__ = module_getattr("torchvision")
