"""Which ``strategy.grow_grad2d`` densifies as often as LucidDreamer's 7.5e-4 (issue 14)?

    python benchmarks/densify_threshold.py                 # 6 windows of 100 steps, 1000 Gaussians, 32x32, 4 views
    python benchmarks/densify_threshold.py --windows 10 --gaussians 2000 --size 64

LucidDreamer accumulates the view-space gradient of the last of its 4 cameras per step; gsplat's
DefaultStrategy (the pack) accumulates every visible view.  For each window the same gradients go through both
rules (see ``scoredistill.bench.densify_threshold``), and for each reference densification rate r the ratio
tau_pack / tau_ref of the thresholds densifying the same fraction r of the Gaussians is printed, per window
and as mean / min / max over windows.  Runs on the CPU rasteriser (about 12 s per window on one core).
"""
import argparse
import statistics

import torch

from scoredistill.bench.densify_threshold import LUCIDDREAMER_THRESHOLD, measure


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--steps", type=int, default=100, help="steps per window (refine_every)")
    ap.add_argument("--gaussians", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for w in range(a.windows):
        r = measure(a.gaussians, a.steps, a.views, a.size, a.rates, seed=w)
        runs.append(r)
        print(f"window {w}: tau_pack/tau_ref = " + " ".join(f"{x:.3f}" for x in r["tau_ratio"])
              + f"  | mean stat pack/ref {r['stat_ratio_mean']:.3f}, renders per Gaussian pack {r['mean_count_pack']:.0f} ref {r['mean_count_ref']:.0f}")
    print("rate   mean    min     max     equal-rate grow_grad2d (mean ratio x 7.5e-4)")
    for i, rate in enumerate(a.rates):
        v = [r["tau_ratio"][i] for r in runs]
        print(f"{rate:<6} {statistics.mean(v):.3f}   {min(v):.3f}   {max(v):.3f}   {statistics.mean(v) * LUCIDDREAMER_THRESHOLD:.2e}")


if __name__ == "__main__":
    main()
