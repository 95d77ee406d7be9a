"""The densification threshold of the Gaussian configs, justified by a measurement (issue 14).

``strategy.grow_grad2d = 7.5e-4`` is LucidDreamer's ``densify_grad_threshold``, whose statistic accumulates one
of its 4 views per step while gsplat's DefaultStrategy (the pack) accumulates all of them.  On the same
gradients (one 100-step window, 4 random views per step, the pack's CPU rasteriser) the threshold that
densifies the same fraction of Gaussians under gsplat's rule is measured; ``benchmarks/densify_threshold.py``
runs more windows (mean ratio 0.98-0.99, per window 0.91-1.09: equal to 1 within the window-to-window spread),
so the configs keep 7.5e-4.
"""
import glob
import os

import pytest
import torch
import yaml

from scoredistill.bench.densify_threshold import LUCIDDREAMER_THRESHOLD, measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_equal_rate_threshold_is_luciddreamers():
    torch.set_num_threads(1)
    r = measure(n_gaussians=600, steps=100, n_views=4, size=32, rates=(0.02, 0.05, 0.1, 0.2), seed=3)
    # the two rules differ as described: gsplat sees every view, LucidDreamer one of the 4
    assert r["mean_count_pack"] == pytest.approx(4 * r["mean_count_ref"])
    # same quantity (per-view NDC gradient, gsplat's x n_cameras undoes the pack's mean over views): a
    # missing or double n_cameras factor would give 0.25 or 4 here
    assert 0.85 < r["stat_ratio_mean"] < 1.15
    print("tau_pack / tau_ref at rates 2/5/10/20 %:", [round(x, 3) for x in r["tau_ratio"]])
    for ratio in r["tau_ratio"]:
        assert 0.85 < ratio < 1.15


def test_gaussian_configs_use_the_measured_threshold():
    found = 0
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        with open(path) as f:
            text = f.read()
        if "grow_grad2d" not in text:
            continue
        strategy = yaml.safe_load(text)["system"]["strategy"]
        assert float(strategy["grow_grad2d"]) == LUCIDDREAMER_THRESHOLD, path
        found += 1
    assert found >= 5
