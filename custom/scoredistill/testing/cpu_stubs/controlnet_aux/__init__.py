"""Stand-in for controlnet_aux (CPU runs only: tests, benchmarks, demo)."""
from _unavailable import make

CannyDetector = make("CannyDetector", "controlnet_aux")
NormalBaeDetector = make("NormalBaeDetector", "controlnet_aux")
