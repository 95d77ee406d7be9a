"""``scoredistill`` command line.

``scoredistill link THREESTUDIO_ROOT``: make the pack visible to a threestudio checkout by linking this
package folder as ``THREESTUDIO_ROOT/custom/scoredistill`` (threestudio's launch.py imports every folder
under ``custom/``).  ``--copy`` copies instead of linking.  An existing different entry is never replaced.

``scoredistill mesh GAUSSIANS.ply OUT_DIR``: a textured mesh (OBJ + MTL + PNG, GLB) from a 3DGS PLY, the
``gsplat-mesh-exporter`` outside threestudio (options: ``scoredistill mesh --help``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def link(threestudio_root: str, copy: bool = False) -> str:
    """Link (or copy) the package into ``threestudio_root/custom/scoredistill``; returns that path.

    Raises:
        FileNotFoundError: ``threestudio_root`` has no ``launch.py`` or no ``custom/`` folder.
        FileExistsError: ``custom/scoredistill`` exists and is not a link to this package.
    """
    root = os.path.abspath(threestudio_root)
    if not os.path.isfile(os.path.join(root, "launch.py")) or not os.path.isdir(os.path.join(root, "custom")):
        raise FileNotFoundError(f"{root} is not a threestudio checkout (needs launch.py and custom/)")
    dest = os.path.join(root, "custom", "scoredistill")
    if os.path.islink(dest):
        if os.path.realpath(dest) == os.path.realpath(PACKAGE_DIR):
            return dest
        raise FileExistsError(f"{dest} links to {os.path.realpath(dest)}, not to {PACKAGE_DIR}; remove it first")
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} already exists; remove it first")
    if copy:
        shutil.copytree(PACKAGE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        os.symlink(PACKAGE_DIR, dest)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scoredistill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_link = sub.add_parser("link", help="make the pack visible to a threestudio checkout")
    p_link.add_argument("threestudio_root")
    p_link.add_argument("--copy", action="store_true", help="copy the package instead of linking it")
    _add_mesh_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "mesh":
        return _run_mesh(args)
    if args.command == "link":
        try:
            dest = link(args.threestudio_root, copy=args.copy)
        except (FileNotFoundError, FileExistsError) as e:
            print(f"scoredistill link: {e}", file=sys.stderr)
            return 2
        print(dest)
    return 0


def _add_mesh_parser(sub) -> None:
    p = sub.add_parser("mesh", help="textured mesh (OBJ+MTL+PNG, GLB) from a 3DGS PLY")
    p.add_argument("ply", help="3D Gaussian PLY (e.g. written by gsplat-ply-exporter)")
    p.add_argument("out_dir")
    p.add_argument("--name", default="model", help="file stem (default: model)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--isosurface-threshold", type=float, default=0.5)
    p.add_argument("--texture-size", type=int, default=1024)
    p.add_argument("--decimate-target", type=int, default=100_000)
    p.add_argument("--color-mode", default="dc", help="dc | normal_sh")
    p.add_argument("--formats", default="obj,glb", help="comma-separated: obj, glb, ply")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")


def _run_mesh(args) -> int:
    from scoredistill.exporter.gaussian_mesh import export_ply_to_mesh

    settings = dict(
        resolution=args.resolution, isosurface_threshold=args.isosurface_threshold, texture_size=args.texture_size,
        decimate_target=args.decimate_target, color_mode=args.color_mode, formats=[f for f in args.formats.split(",") if f],
    )
    try:
        paths, result = export_ply_to_mesh(args.ply, args.out_dir, name=args.name, device=args.device, **settings)
    except (ValueError, OSError) as e:
        print(f"scoredistill mesh: {e}", file=sys.stderr)
        return 2
    print(f"{int(result.stats['faces'])} faces, {int(result.stats['vertices'])} vertices")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
