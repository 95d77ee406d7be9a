"""Stand-in for nvdiffrast.torch (CPU runs only: tests, benchmarks, demo): the context classes exist for annotations."""
from _unavailable import make

RasterizeGLContext = make("RasterizeGLContext", "nvdiffrast")
RasterizeCudaContext = make("RasterizeCudaContext", "nvdiffrast")


def __getattr__(name):
    raise RuntimeError(f"nvdiffrast.torch.{name} is not available (CPU stand-in)")
