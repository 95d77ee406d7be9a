"""``scoredistill`` command line.

``scoredistill link THREESTUDIO_ROOT``: make the pack visible to a threestudio checkout by linking this
package folder as ``THREESTUDIO_ROOT/custom/scoredistill`` (threestudio's launch.py imports every folder
under ``custom/``).  ``--copy`` copies instead of linking.  An existing different entry is never replaced.

``scoredistill suite run SUITE.yaml`` / ``scoredistill suite report OUTPUT_DIR``: prompt suites
(:mod:`scoredistill.suite`).

``scoredistill demo [--threestudio PATH]``: the first run without GPU or weights (:mod:`scoredistill.demo`).

``scoredistill mesh GAUSSIANS.ply OUT_DIR``: a textured mesh (OBJ + MTL + PNG, GLB, JSON report) from a 3DGS
PLY, the ``gsplat-mesh-exporter`` outside threestudio (options: ``scoredistill mesh --help``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .paths import PACKAGE_DIR, link  # noqa: F401  (shared with the suite runner, the benchmarks, the demo)

DESCRIPTION = """scoredistill: score-distillation methods (GE3D, LODS, DreamMapping, UDS, HiFA) and 3D Gaussians for threestudio.

commands:
  link THREESTUDIO_ROOT        make the pack visible to a threestudio checkout (custom/scoredistill)
  suite run|report|status ...  prompt suites: run every prompt x config x seed, CLIP report, state
  demo [--threestudio PATH]    first run without GPU or weights: distil a known scene on the CPU
  mesh GAUSSIANS.ply OUT_DIR   textured mesh (OBJ+MTL+PNG, GLB, JSON) from a 3DGS PLY

'scoredistill COMMAND --help' shows each command's options with their defaults."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scoredistill", description=DESCRIPTION, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_link = sub.add_parser("link", help="make the pack visible to a threestudio checkout", formatter_class=_HelpFormatter,
                            description="Link (or copy) this package as THREESTUDIO_ROOT/custom/scoredistill, so threestudio's "
                                        "launch.py imports it. An existing different entry is never replaced.")
    p_link.add_argument("threestudio_root", help="a threestudio checkout (the folder with launch.py and custom/)")
    p_link.add_argument("--copy", action="store_true", help="copy the package instead of linking it (default: a symlink)")
    p_suite = sub.add_parser("suite", help="run a prompt suite and report CLIP scores (scoredistill.suite)", formatter_class=_HelpFormatter,
                             description="Prompt suites: 'run' launches every unfinished prompt x config x seed, 'report' "
                                         "writes a CSV, markdown means and an HTML gallery, 'status' prints each run's state.")
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each option's default ("(default: ...)", unless the text states it or it is unset) and the
    descriptions' line breaks kept."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _add_demo_parser(sub) -> None:
    from .demo import add_arguments

    p = sub.add_parser("demo", help="first run without GPU or weights: distil a known scene through threestudio's "
                                    "launch.py on the CPU; writes a video, a PLY, a GLB and a page",
                       description="Distil a ground-truth scene (exact ground-truth prior, no downloads) through "
                                   "threestudio's launch.py with a pack config on the CPU (~3 min on 2 cores); writes "
                                   "OUT/index.html, video.mp4, gaussians.ply, mesh/model.glb (scoredistill.demo).",
                       formatter_class=_HelpFormatter)
    add_arguments(p)


def _add_suite_parser(p) -> None:
    sub = p.add_subparsers(dest="suite_command", required=True, metavar="SUITE_COMMAND")
    r = sub.add_parser("run", help="run every unfinished prompt x config x seed of a suite", formatter_class=_HelpFormatter)
    r.add_argument("suite_file", help="the suite's YAML file")
    r.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: the suite's gpus)")
    r.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submit through submitit (SLURM job array; local/debug for testing) instead of the local pool")
    r.add_argument("--no-wait", action="store_true", help="with --cluster: return after submission")
    r.add_argument("--output-dir", default=None, help="override the suite's output_dir")
    r.add_argument("--link", action="store_true", help="link the pack into threestudio_root/custom first")
    rep = sub.add_parser("report", help="CSV, markdown means with CIs and an HTML gallery of a suite's runs", formatter_class=_HelpFormatter)
    rep.add_argument("target", help="a suite's output folder (or its suite file)")
    rep.add_argument("--clip-model", action="append", default=None,
                     help="CLIPModel name or folder for the CLIP score and CLIP R-Precision; repeat for several "
                          "(default: openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14, B/32 and L/14 as "
                          "DreamFusion reports; bigG: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)")
    rep.add_argument("--device", default="cpu", help="torch device of the CLIP model")
    rep.add_argument("--panel", default="first", choices=["first", "full"],
                     help="gallery images: the first test view of each run, or the full panel of views")
    rep.add_argument("--out", default=None, help="report folder (default OUTPUT_DIR/report)")
    st = sub.add_parser("status", help="print the state of every run of a suite's output folder", formatter_class=_HelpFormatter)
    st.add_argument("target", help="a suite's output folder (or its suite file)")


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


MESH_DESCRIPTION = """Textured triangle mesh from a 3DGS PLY (the gsplat-mesh-exporter without threestudio):
opacity-weighted Gaussian density on a grid -> interior fill -> marching cubes -> cleanup (degenerate faces
collapsed, floaters dropped, quadric decimation, manifold repair) -> xatlas UVs -> texture baked from the
Gaussians' colours.  Prints watertightness, component count and the surface's offset to the Gaussian centres.

files written into OUT_DIR (replaced as one set; old files of the set not written again are removed):
  NAME.obj, NAME.mtl, NAME.png   OBJ with vertex normals and UVs, its material and texture   (--formats obj)
  NAME.glb                       binary glTF 2.0: POSITION, NORMAL, TEXCOORD_0, embedded PNG   (--formats glb)
  NAME.ply                       vertex-coloured mesh with normals                             (--formats ply)
  NAME.json                      always: stats (watertight, components, surface offset, level, faces, timings),
                                 settings and frame
frame: +Y up (glTF's axis): threestudio (x, y, z) -> (x, z, -y); --up-axis z keeps threestudio's +Z up."""


def _add_mesh_parser(sub) -> None:
    from scoredistill.exporter.gaussian_mesh import COLOR_MODES, FORMATS, UP_AXES, MeshSettings

    d = MeshSettings()
    p = sub.add_parser("mesh", help="textured mesh (OBJ+MTL+PNG, GLB, JSON report) from a 3DGS PLY",
                       description=MESH_DESCRIPTION, formatter_class=_HelpFormatter)
    p.add_argument("ply", help="3D Gaussian PLY (e.g. written by gsplat-ply-exporter)")
    p.add_argument("out_dir", help="output folder (created if missing; other files in it are left alone)")
    p.add_argument("--name", default="model", help="file stem of the written files")
    p.add_argument("--resolution", type=int, default=d.resolution,
                   help="grid nodes along the longest side of the bounds, 8..2048 (finer surface, cubic cost in memory)")
    p.add_argument("--isosurface-threshold", default=d.isosurface_threshold,
                   help="density level of the surface: 'auto' (--auto-level-ratio x the median density at the Gaussians' "
                        "centres: the surface sits ~1.7 std outside a layer of Gaussians, sparse or dense) or a number > 0 "
                        "(absolute; a lone Gaussian of opacity o peaks at o)")
    p.add_argument("--auto-level-ratio", type=float, default=d.auto_level_ratio,
                   help="with --isosurface-threshold auto: the level as a fraction of the median density at the centres, in (0, 1)")
    p.add_argument("--bounds", default=d.bounds,
                   help="grid bounds: 'auto' (the visible Gaussians' extent), a radius r (cube [-r, r]^3), or 6 numbers "
                        "'xmin,ymin,zmin,xmax,ymax,zmax'")
    p.add_argument("--min-opacity", type=float, default=d.min_opacity, help="ignore Gaussians below this opacity, in [0, 1)")
    p.add_argument("--fill-interior", action=argparse.BooleanOptionalAction, default=d.fill_interior,
                   help="fill cavities enclosed by the surface, so a hollow shell of Gaussians gives one closed outer surface")
    p.add_argument("--smooth-iterations", type=int, default=d.smooth_iterations, help="Taubin smoothing iterations (0 = off)")
    p.add_argument("--decimate-target", type=int, default=d.decimate_target, help="at most this many faces (0 = no decimation)")
    p.add_argument("--texture-size", type=int, default=d.texture_size, help="texture width = height in texels, 16..8192")
    p.add_argument("--color-mode", default=d.color_mode, choices=list(COLOR_MODES),
                   help="dc: view-independent base colour (SH degree 0); normal_sh: the full SH seen along the surface normal")
    p.add_argument("--formats", default=",".join(d.formats), help=f"comma-separated, any of {', '.join(FORMATS)} (NAME.json is always written)")
    p.add_argument("--up-axis", default=d.up_axis, choices=list(UP_AXES),
                   help="up axis of every file: y (glTF's; threestudio (x, y, z) -> (x, z, -y)) or z (threestudio's frame)")
    p.add_argument("--device", default="auto",
                   help="torch device of the density grid, UV rasterization and colours: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_mesh_bounds(text: str):
    if text == "auto":
        return text
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--bounds must be 'auto', a radius or 'xmin,ymin,zmin,xmax,ymax,zmax', got {text!r}") from None
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 6:
        return [vals[:3], vals[3:]]
    raise ValueError(f"--bounds must be 'auto', a radius or 'xmin,ymin,zmin,xmax,ymax,zmax', got {text!r}")


def _run_mesh(args) -> int:
    from scoredistill.exporter.gaussian_mesh import export_ply_to_mesh, summary_line

    try:
        level = args.isosurface_threshold
        if level != "auto":
            try:
                level = float(level)
            except ValueError:
                raise ValueError(f"--isosurface-threshold must be 'auto' or a finite number > 0, got {level!r}") from None
        settings = dict(
            resolution=args.resolution, isosurface_threshold=level, auto_level_ratio=args.auto_level_ratio,
            bounds=_parse_mesh_bounds(str(args.bounds)), min_opacity=args.min_opacity, fill_interior=args.fill_interior,
            smooth_iterations=args.smooth_iterations, texture_size=args.texture_size, decimate_target=args.decimate_target,
            color_mode=args.color_mode, formats=[f for f in args.formats.split(",") if f], up_axis=args.up_axis,
        )
        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        paths, result = export_ply_to_mesh(args.ply, args.out_dir, name=args.name, device=device,
                                           progress=not args.quiet, **settings)
    except (ValueError, OSError, OverflowError) as e:
        print(f"scoredistill mesh: {e}", file=sys.stderr)
        return 2
    print(summary_line(result.stats))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
