"""Prepare the threestudio work tree the integration tests run against (tests only).

Usage: ``python tests/harness/prepare_threestudio.py [SOURCE] [DEST]``

Copies the pinned, unmodified threestudio snapshot (default ``../shared/threestudio`` beside the
repository, see its ``SNAPSHOT.md``) to the git-ignored ``.threestudio/`` (default) with write bits, and
creates its ``custom/`` folder (empty in threestudio, so absent from the snapshot) where the pack is linked.
An existing DEST is replaced only if it is a copy made by this script (marker file); anything else is an error.
The tests find ``.threestudio/`` by themselves; ``THREESTUDIO_ROOT`` overrides it.
"""
import os
import shutil
import stat
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MARKER = ".scoredistill-test-copy"


def prepare(source: str, dest: str) -> str:
    source, dest = os.path.abspath(source), os.path.abspath(dest)
    if not os.path.isfile(os.path.join(source, "launch.py")):
        raise SystemExit(f"{source} is not a threestudio tree (no launch.py); pass the snapshot folder as SOURCE")
    if os.path.exists(dest):
        if not os.path.exists(os.path.join(dest, MARKER)):
            raise SystemExit(f"{dest} exists and was not made by this script; remove it or pass another DEST")
        shutil.rmtree(dest)
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for base, dirs, files in os.walk(dest):
        for name in dirs + files:
            p = os.path.join(base, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    os.chmod(dest, os.stat(dest).st_mode | stat.S_IWUSR)
    os.makedirs(os.path.join(dest, "custom"), exist_ok=True)
    with open(os.path.join(dest, MARKER), "w") as f:
        f.write(f"copied from {source}\n")
    return dest


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(REPO), "shared", "threestudio")
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(REPO, ".threestudio")
    print(prepare(src, dst))
