"""``scoredistill`` command line.

``scoredistill link THREESTUDIO_ROOT``: make the pack visible to a threestudio checkout by linking this
package folder as ``THREESTUDIO_ROOT/custom/scoredistill`` (threestudio's launch.py imports every folder
under ``custom/``).  ``--copy`` copies instead of linking.  An existing different entry is never replaced.

``scoredistill suite run SUITE.yaml`` / ``scoredistill suite report OUTPUT_DIR``: prompt suites
(:mod:`scoredistill.suite`).

``scoredistill demo [--threestudio PATH]``: the first run without GPU or weights (:mod:`scoredistill.demo`).

``scoredistill mesh GAUSSIANS.ply OUT_DIR``: a textured mesh (OBJ + MTL + PNG, GLB) from a 3DGS PLY, the
``gsplat-mesh-exporter`` outside threestudio (options: ``scoredistill mesh --help``).
"""
from __future__ import annotations

import argparse
import os
import sys

from .paths import PACKAGE_DIR, link  # noqa: F401  (shared with the suite runner, the benchmarks, the demo)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scoredistill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_link = sub.add_parser("link", help="make the pack visible to a threestudio checkout")
    p_link.add_argument("threestudio_root")
    p_link.add_argument("--copy", action="store_true", help="copy the package instead of linking it")
    p_suite = sub.add_parser("suite", help="run a prompt suite and report CLIP scores (scoredistill.suite)")
    _add_suite_parser(p_suite)
    _add_mesh_parser(sub)
    _add_demo_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run as run_demo

        return run_demo(args)
    if args.command == "suite":
        return _suite_main(args)
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


def _add_demo_parser(sub) -> None:
    from .demo import add_arguments

    p = sub.add_parser("demo", help="first run without GPU or weights: distil a known scene through threestudio's "
                                    "launch.py on the CPU; writes a video, a PLY, a GLB and a page",
                       description="Distil a ground-truth scene (exact ground-truth prior, no downloads) through "
                                   "threestudio's launch.py with a pack config on the CPU (~3 min on 2 cores); writes "
                                   "OUT/index.html, video.mp4, gaussians.ply, mesh/model.glb (scoredistill.demo).")
    add_arguments(p)


def _add_suite_parser(p) -> None:
    sub = p.add_subparsers(dest="suite_command", required=True)
    r = sub.add_parser("run", help="run every unfinished prompt x config x seed of a suite")
    r.add_argument("suite_file")
    r.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: the suite's gpus)")
    r.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submit through submitit (SLURM job array; local/debug for testing) instead of the local pool")
    r.add_argument("--no-wait", action="store_true", help="with --cluster: return after submission")
    r.add_argument("--output-dir", default=None, help="override the suite's output_dir")
    r.add_argument("--link", action="store_true", help="link the pack into threestudio_root/custom first")
    rep = sub.add_parser("report", help="CSV, markdown means with CIs and an HTML gallery of a suite's runs")
    rep.add_argument("target", help="a suite's output folder (or its suite file)")
    rep.add_argument("--clip-model", action="append", default=None,
                     help="CLIPModel name or folder for the CLIP score and CLIP R-Precision; repeat for several "
                          "(default: openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14, B/32 and L/14 as "
                          "DreamFusion reports; bigG: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)")
    rep.add_argument("--device", default="cpu")
    rep.add_argument("--panel", default="first", choices=["first", "full"])
    rep.add_argument("--out", default=None, help="report folder (default OUTPUT_DIR/report)")
    st = sub.add_parser("status", help="print the state of every run of a suite's output folder")
    st.add_argument("target")


def _suite_main(args) -> int:
    from .suite import runner, spec

    try:
        if args.suite_command == "run":
            suite = spec.load_suite(args.suite_file)
            if args.output_dir:
                suite.output_dir = os.path.abspath(args.output_dir)
            if args.link:
                try:
                    link(suite.threestudio_root)
                except FileExistsError as e:
                    print(f"scoredistill suite: {e}", file=sys.stderr)
            if args.cluster:
                states = runner.run_submitit(suite, cluster=args.cluster, wait=not args.no_wait)
                if args.no_wait:
                    print(runner.summarize(states))
                    return 0
            else:
                gpus = None if args.gpus is None else runner.check_gpus(args.gpus, "--gpus")
                states = runner.run_local(suite, gpus=gpus)
            print(runner.summarize(states))
            return 0 if all(s.get("status") == "done" for s in states.values()) else 1
        target = args.target
        if os.path.isfile(target):
            target = spec.load_suite(target).output_dir
        if args.suite_command == "status":
            from .suite.state import safe_read_state

            states = {r.run_id: safe_read_state(r.run_dir) for r in runner.load_runs(target)}
            print(runner.summarize(states))
            return 0
        from .suite import report

        report.write_report(target, args.out, args.clip_model or list(report.DEFAULT_CLIPS), args.device, args.panel)
        return 0
    except (ValueError, OSError, RuntimeError) as e:  # SuiteError, StateError, unwritable folders: one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        print(f"scoredistill suite: {msg}", file=sys.stderr)
        return 2


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
