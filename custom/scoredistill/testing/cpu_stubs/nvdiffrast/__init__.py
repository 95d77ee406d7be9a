"""Stand-in for nvdiffrast (CPU runs only: tests, benchmarks, demo)."""
