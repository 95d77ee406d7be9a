"""The report of the ground-truth 3D benchmark: the tables (``gt3d.md``, the README's ``gt3d_readme.md``, every run's
``gt3d_runs.csv``, the JSON records) and the pictures (``gt3d_grid.png``, ``gt3d_curves.png``)."""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from . import gt_scenes
from .gt3d_runs import ROWS
from .gt3d_scoring import GroundTruth, read_panels, step_images


def _mean_std(vals: List[float]) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    t = torch.tensor(vals, dtype=torch.float64)
    sd = float(t.std()) if len(vals) > 1 else 0.0
    return f"{float(t.mean()):.2f} ± {sd:.2f}"


def summarise(results: List[Dict]) -> List[Dict]:
    """One line per row: per-scene PSNR / SSIM / IoU / saturation means ± std over seeds, Janus, Chamfer, cost."""
    lines = []
    for row in ROWS:
        rs = [r for r in results if r["row"] == row.name and "error" not in r]
        errs = [r for r in results if r["row"] == row.name and "error" in r]
        if not rs and not errs:
            continue
        line = {"row": row.name, "config": row.config, "runs": len(rs), "failed": len(errs)}
        for scene in ("cube", "janus", "table"):
            sr = [r for r in rs if r["scene"] == scene]
            if sr:
                line[f"{scene}_psnr"] = _mean_std([r["psnr"] for r in sr])
                line[f"{scene}_initial_psnr"] = _mean_std([r["initial_psnr"] for r in sr])
        cube = [r for r in rs if r["scene"] == "cube"]
        line["cube_ssim"] = _mean_std([r["ssim"] for r in cube])
        line["iou"] = _mean_std([r["iou"] for r in rs])
        line["chroma"] = _mean_std([r["chroma_ratio"] for r in rs])
        line["intensity"] = _mean_std([r["intensity_ratio"] for r in rs])
        line["janus"] = _mean_std([r["janus"] for r in rs if r["scene"] == "janus"])
        line["chamfer_table"] = _mean_std([r.get("chamfer") for r in rs if r["scene"] == "table"])
        line["chamfer_cube"] = _mean_std([r.get("chamfer") for r in rs if r["scene"] == "cube"])
        line["unet_samples_per_step"] = _mean_std([r["unet_samples"] / r["steps"] for r in rs if r.get("unet_samples")])
        line["seconds"] = _mean_std([r["seconds"] for r in rs])
        lines.append(line)
    return lines


MD_COLUMNS = [("row", "method (config)"), ("cube_psnr", "cube PSNR ↑"), ("cube_initial_psnr", "cube initial"),
              ("cube_ssim", "cube SSIM ↑"), ("janus_psnr", "two-faced PSNR ↑"), ("janus", "Janus score ↓"),
              ("table_psnr", "table PSNR ↑"), ("chamfer_table", "table Chamfer ↓"), ("iou", "mask IoU ↑"),
              ("chroma", "chroma ratio (→1)"), ("intensity", "intensity ratio (→1)"),
              ("unet_samples_per_step", "UNet samples / step"), ("seconds", "wall s / run")]


#: the README's shorter table (``gt3d_readme.md``)
README_COLUMNS = [("row", "method (config)"), ("cube_psnr", "cube PSNR ↑"), ("janus_psnr", "two-faced PSNR ↑"),
                  ("janus", "Janus ↓"), ("table_psnr", "table PSNR ↑"), ("chamfer_table", "table Chamfer ↓"),
                  ("iou", "mask IoU ↑"), ("chroma", "chroma (→1)"), ("unet_samples_per_step", "UNet samples / step"),
                  ("seconds", "s / run")]


def _markdown(lines: List[Dict], columns) -> str:
    md = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for line in lines:
        cells = [f"{line['row']} (`{line['config']}`)" if k == "row" else str(line.get(k, "–")) for k, _ in columns]
        if line["failed"]:
            cells[0] += f" ({line['failed']} run(s) failed)"
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def write_tables(out: str, results: List[Dict], meta: Dict) -> str:
    from scoredistill.atomic_io import atomic_write_json, atomic_write_text

    lines = summarise(results)
    keys = sorted({k for r in results for k in r if k != "curve"})
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in results:
        w.writerow({k: r.get(k) for k in keys})
    atomic_write_text(os.path.join(out, "gt3d_runs.csv"), buf.getvalue())
    text = _markdown(lines, MD_COLUMNS)
    atomic_write_text(os.path.join(out, "gt3d.md"), text)
    atomic_write_text(os.path.join(out, "gt3d_readme.md"), _markdown(lines, README_COLUMNS))
    atomic_write_json(os.path.join(out, "gt3d_meta.json"), meta, indent=2)
    atomic_write_json(os.path.join(out, "gt3d_results.json"), results, indent=1)
    return text


def write_pictures(out: str, results: List[Dict], gt: GroundTruth, views=(0, 4, 8, 12)) -> None:
    """``gt3d_grid.png`` (ground truth and each row's seed-0 result from 4 test views, per scene) and
    ``gt3d_curves.png`` (validation PSNR against step and against UNet samples, mean over seeds, cube)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = [s for s in gt_scenes.SCENES if any(r["scene"] == s for r in results)]
    rows = [r.name for r in ROWS if any(x["row"] == r.name and "error" not in x for x in results)]
    fig, axes = plt.subplots(len(rows) + 1, len(scenes), figsize=(2.6 * len(scenes), 0.75 * (len(rows) + 1) + 0.3),
                             squeeze=False)
    for j, scene in enumerate(scenes):
        g, _ = gt.get(scene, "test")
        strip = torch.cat([g[v] for v in views], 1)
        axes[0][j].imshow(strip.numpy())
        axes[0][j].set_title(scene, fontsize=8)
        for i, name in enumerate(rows):
            rs = [r for r in results if r["row"] == name and r["scene"] == scene and "error" not in r]
            ax = axes[i + 1][j]
            if rs:
                rs.sort(key=lambda r: r["seed"])
                tests = step_images(rs[0]["trial"], "it*-test/*.png")
                imgs = tests[max(tests)]
                ax.imshow(torch.cat([read_panels(imgs[v])[0] for v in views if v < len(imgs)], 1).numpy())
    for i, name in enumerate(["ground truth"] + rows):
        axes[i][0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    fig.tight_layout(pad=0.2)
    fig.savefig(os.path.join(out, "gt3d_grid.png"), dpi=130)
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))

    def cube_curves():  # mean over seeds of each row's cube runs
        for name in rows:
            rs = [r for r in results if r["row"] == name and r["scene"] == "cube" and "error" not in r and r["curve"]]
            if not rs:
                continue
            steps = [s for s, _ in rs[0]["curve"]]
            mean = [sum(r["curve"][k][1] for r in rs if len(r["curve"]) > k) / len(rs) for k in range(len(steps))]
            yield name, steps, mean, rs[0].get("unet_samples") and rs[0]["unet_samples"] / rs[0]["steps"]

    plot_psnr_curves(a1, a2, cube_curves(), "PSNR on validation views (cube), dB")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gt3d_curves.png"), dpi=120)
    plt.close(fig)


def plot_psnr_curves(a1, a2, curves: Iterable[Tuple[str, List[int], List[float], Optional[float]]], ylabel: str,
                     **style) -> None:
    """Validation PSNR against step (axes ``a1``) and against UNet samples (``a2``: step × the run's exact UNet samples
    per step; a curve without that count is left out of ``a2``), labelled, legend on ``a1``.  ``curves``:
    ``(label, steps, psnrs, unet_samples_per_step)``; ``style``: ``Axes.plot`` keywords.  This benchmark's and
    :mod:`scoredistill.bench.gt3d_gpu`'s curves."""
    for label, steps, vals, per in curves:
        a1.plot(steps, vals, label=label, **style)
        if per:
            a2.plot([s * per for s in steps], vals, label=label, **style)
    a1.set_xlabel("step")
    a2.set_xlabel("UNet samples")
    a2.set_xscale("symlog")
    for a in (a1, a2):
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
    a1.legend(fontsize=6)
