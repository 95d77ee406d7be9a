"""Run a script as ``__main__`` with the model classes its model folders name imported (tooling of the 3D benchmark).

Usage (from a threestudio work tree, run by path)::

    python .../scoredistill/testing/gt_prior_launch.py launch.py --config ... --train ...

The folder of :func:`scoredistill.testing.gt_prior3d.build_gt_prior` names its UNet and VAE classes in
``model_index.json`` as ``scoredistill.testing.gt_prior3d``.  diffusers (0.42) resolves a library that is not its
own only from ``sys.modules`` ("import it before calling ``from_pretrained``"), so threestudio's
``StableDiffusionPipeline.from_pretrained`` needs that module imported in the launch.py process.  The runtime does
not import the tooling, so the benchmark imports it here: every ``...pretrained_model_name_or_path=FOLDER``
override whose ``FOLDER/model_index.json`` names a ``scoredistill.*`` module has that module imported
(:func:`pack_modules_named`), then the script (threestudio's ``launch.py``) runs unchanged.  On a machine without CUDA it runs behind the CPU launcher (``cpu_launch.py gt_prior_launch.py
launch.py ...``), so that threestudio is first imported with the CPU device patch.
"""
from __future__ import annotations

import json
import os
import runpy
import sys
from typing import List, Sequence


def pack_modules_named(argv: Sequence[str]) -> List[str]:
    """The ``scoredistill.*`` modules named in ``model_index.json`` of the folders of the
    ``...pretrained_model_name_or_path=FOLDER`` overrides in ``argv`` (sorted, without repeats)."""
    out = set()
    for arg in argv:
        key, sep, folder = str(arg).partition("=")
        if not sep or not key.endswith("pretrained_model_name_or_path"):
            continue
        index = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index):
            continue
        with open(index) as fh:
            entries = json.load(fh)
        for entry in entries.values():
            if isinstance(entry, list) and entry and isinstance(entry[0], str) and \
                    (entry[0] == "scoredistill" or entry[0].startswith("scoredistill.")):
                out.add(entry[0])
    return sorted(out)


def import_pack_modules_named(argv: Sequence[str]) -> List[str]:
    """Import the modules of :func:`pack_modules_named`; returns their names."""
    import importlib

    modules = pack_modules_named(argv)
    for module in modules:
        importlib.import_module(module)
    return modules


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python gt_prior_launch.py SCRIPT [ARGS...]  (SCRIPT: threestudio's launch.py)")
    here = os.path.dirname(os.path.abspath(__file__))
    # run by path, this folder is sys.path[0]: take it off, so its modules never shadow top-level names
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    script = argv[0]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    import_pack_modules_named(argv[1:])

    sys.argv = argv
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
