"""Issue 26: the H200 speed run as a table and a profile picture (benchmarks/results/gpu_suite/).

Reads the GPU suite's ``speed`` section(s) (``speed.json`` and ``speed2.json``: the configs the first call's time
budget did not reach), and writes ``speed_table.md`` (before/after s/it, peak memory allocated and reserved,
× arithmetic limit, 5000-iteration time vs the paper's, the issue's targets and whether met) and
``speed_profile.png`` (stacked bars per config: the step's GPU time by part, from CUDA events).

    python benchmarks/gpu_suite_speed_report.py [--results benchmarks/results/gpu_suite]

"Before" is the first H200 record (main 4852393, ../shared/gpu-kit/H200-2026-12-04.md, s/it over steps 3-4);
"after" is the speed section (main f3fb70f's speed work: s/it = median over plain steps after 3 warm-up).
"""
from __future__ import annotations

import argparse
import json
import os

#: config -> (s/it, peak allocated GiB, peak reserved GiB) on main 4852393 (H200-2026-12-04.md)
BEFORE = {
    "gs-sds": (0.188, 10.07, 12.24), "ge3d-gs": (0.633, 8.56, 9.22), "vdm-gs": (0.154, 8.54, 9.25),
    "lods-embedding-gs": (0.279, 19.64, 20.76), "uds-gs": (0.140, 8.82, 9.52), "uds-edit-gs": (0.205, 15.01, 16.45),
}
#: arithmetic limit of a step at 790 TFLOP/s (UNet + VAE FLOPs), seconds (issue 26)
LIMIT = {"gs-sds": 0.025, "ge3d-gs": 0.090, "vdm-gs": 0.025, "lods-embedding-gs": 0.037, "uds-gs": 0.029}
#: issue 26's s/it targets on an H200
TARGET = {"vdm-gs": 0.050, "uds-gs": 0.060, "lods-embedding-gs": 0.075, "ge3d-gs": 0.180, "uds-edit-gs": 0.070}
PAPER = {"ge3d-gs": "10–20 min (A6000)", "vdm-gs": "~15 min (A100)", "lods-embedding-gs": "30 min (A6000)"}
ORDER = ["gs-sds", "ge3d-gs", "vdm-gs", "lods-embedding-gs", "uds-gs", "uds-edit-gs"]
PARTS = ["render", "vae", "unet", "backward", "optimizer", "densify", "other"]
MEM_TARGET_GIB = 12.0


def load_rows(folder: str) -> dict:
    rows, parity = {}, {}
    for name in ("speed.json", "speed2.json"):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            d = json.load(f)
        parity.update(d["sections"].get("parity", {}))
        for r in d["sections"].get("speed", {}).get("rows", []):
            if "s_per_it" in r:
                rows[r["config"]] = r
    return {"rows": rows, "parity": parity}


def table(data: dict) -> str:
    rows = data["rows"]
    out = ["| config | s/it before → after | peak alloc GiB before → after | peak reserved GiB before → after | × arithmetic limit "
           "(after) | max_steps × s/it (paper) | target s/it | met | syncs / step |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in ORDER:
        if c not in rows:
            out.append(f"| {c} | not measured | | | | | | | |")
            continue
        r, (b_s, b_m, b_r) = rows[c], BEFORE[c]
        s, m = r["s_per_it"], r["peak_vram_gib"]
        lim = f"{s / LIMIT[c]:.1f} (limit {LIMIT[c] * 1e3:.0f} ms)" if c in LIMIT else "—"
        total = f"{r['max_steps']} it: {r['max_steps'] * s / 60:.1f} min (paper: {PAPER.get(c, '—')})"
        if c == "gs-sds":
            p = r["profile"]["parts_seconds"]
            own = p["render"] + p["optimizer"] + p["densify"]
            tgt = "pack's share ≤ 15 ms"
            met = (f"render+opt+densify {own * 1e3:.1f} ms; with unattributed {r['profile']['other_seconds'] * 1e3:.1f} ms: "
                   f"{(own + r['profile']['other_seconds']) * 1e3:.1f} ms — not shown met")
        else:
            tgt = f"≤ {TARGET[c]:.3f}"
            met = "yes" if s <= TARGET[c] else f"no ({s / TARGET[c]:.1f}×)"
        mem = "≤ 12 GiB: yes" if m <= MEM_TARGET_GIB else "≤ 12 GiB: no"
        out.append(f"| {c} | {b_s:.3f} → {s:.3f} ({(s / b_s - 1) * 100:+.0f}%) | {b_m:.2f} → {m:.2f} ({mem}) | "
                   f"{b_r:.2f} → {r['peak_reserved_gib']:.2f} | {lim} | {total} | {tgt} | {met} | {r['syncs']['count']} |")
    par = data["parity"]
    if par:
        out += ["", "Parity (" + par.get("comparison", "") + "; max |diff| / max |ref|): " + ", ".join(
            f"{k} {v:.2e}" for k, v in par.items() if isinstance(v, float) and k != "section_seconds")]
    out += ["", "Per-step GPU time by part (ms; CUDA events around one step's parts; 'other' = step − parts):", "",
            "| config | step | " + " | ".join(PARTS) + " |", "|---|---|" + "---|" * len(PARTS)]
    for c in ORDER:
        if c in rows:
            p = dict(rows[c]["profile"]["parts_seconds"], other=rows[c]["profile"]["other_seconds"])
            out.append(f"| {c} | {rows[c]['profile']['gpu_step_seconds'] * 1e3:.1f} | "
                       + " | ".join(f"{p[k] * 1e3:.1f}" for k in PARTS) + " |")
    return "\n".join(out) + "\n"


def picture(data: dict, path: str) -> None:
    """Stacked horizontal bars per config (matplotlib ``Figure`` on an Agg canvas: no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = data["rows"]
    configs = [c for c in ORDER if c in rows]
    fig = Figure(figsize=(9, 0.55 * len(configs) + 1.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"render": "#4c72b0", "vae": "#dd8452", "unet": "#c44e52", "backward": "#8172b3",
              "optimizer": "#55a868", "densify": "#937860", "other": "#b0b0b0"}
    left = [0.0] * len(configs)
    for part in PARTS:
        vals = []
        for c in configs:
            p = rows[c]["profile"]
            vals.append(1e3 * (p["other_seconds"] if part == "other" else p["parts_seconds"][part]))
        ax.barh(configs, vals, left=left, color=colors[part], label=part)
        left = [a + b for a, b in zip(left, vals)]
    for i, c in enumerate(configs):
        ax.text(left[i] + 5, i, f"{rows[c]['s_per_it'] * 1e3:.0f} ms/it", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GPU time of one step, ms (CUDA events)")
    ax.set_title("Where a training step's time goes (H200, SD 2.1-base arch, fp16, each config's settings)", fontsize=9)
    ax.legend(ncol=7, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    ax.set_xlim(0, max(left) * 1.18)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_suite"),
                    help="folder with speed.json / speed2.json; the table and picture are written there")
    a = ap.parse_args(argv)
    data = load_rows(a.results)
    if not data["rows"]:
        raise SystemExit(f"no measured speed rows in {a.results}/speed.json or speed2.json")
    md = table(data)
    with open(os.path.join(a.results, "speed_table.md"), "w") as f:
        f.write("# Issue 26 on one H200 (2026-12-04)\n\n" + md)
    picture(data, os.path.join(a.results, "speed_profile.png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
