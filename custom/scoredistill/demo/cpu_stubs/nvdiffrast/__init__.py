"""Stand-in for nvdiffrast (CPU runs of the demo only)."""
