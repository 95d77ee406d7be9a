"""Helpers for the import-time stand-ins (CPU runs only: tests, benchmarks, demo)."""


class _Meta(type):
    def __getattr__(cls, name):
        # class attributes (enum members such as InterpolationMode.BILINEAR) resolve to placeholders
        if name.startswith("__"):
            raise AttributeError(name)
        return make(f"{cls.__name__}.{name}", cls._package)


class Unavailable(metaclass=_Meta):
    """Placeholder: importable, but constructing or calling it raises."""

    _package = "a CUDA-only package"

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__name__} comes from {self._package}, which is only a CPU stand-in on this "
            "machine (scoredistill/testing/cpu_stubs); use a pure-torch alternative on the CPU"
        )


def make(name, package):
    return _Meta(name, (Unavailable,), {"_package": package})


def module_getattr(package):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return make(name, package)

    return __getattr__
