from _unavailable import module_getattr

__getattr__ = module_getattr("torchvision")
from . import functional  # noqa: F401
