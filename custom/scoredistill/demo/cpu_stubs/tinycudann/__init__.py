"""Stand-in for tinycudann (CPU runs of the demo only): importable, frees nothing, constructs nothing."""
from _unavailable import make

Encoding = make("Encoding", "tinycudann")
Network = make("Network", "tinycudann")
NetworkWithInputEncoding = make("NetworkWithInputEncoding", "tinycudann")


def free_temporary_memory():
    return None
