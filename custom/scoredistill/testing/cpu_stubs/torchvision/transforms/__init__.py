from _unavailable import module_getattr

from . import functional, v2  # noqa: F401

__getattr__ = module_getattr("torchvision")
