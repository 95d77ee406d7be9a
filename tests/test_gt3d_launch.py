"""The ground-truth 3D benchmark in small (CI): threestudio's unmodified launch.py distils the known cube from the
exact ground-truth prior (scoredistill.bench.gt3d_bench), and the score against the cube's true renders moves.

* threestudio's own ``stable-diffusion-guidance`` (config ``gs-sds``, CFG 7.5) and one pack method (``vdm-gs``):
  the final PSNR on threestudio's test cameras beats the initial render (step-0 validation) by a stated margin;
* a negative control, the prior built with a wrong camera convention (renders labelled with the mirrored
  azimuth, so "front view" selects the cube's back): clearly worse than the same run on the right prior.

32² renders, 100 steps, cube only, 160 prior renders; the three runs take ~2 minutes on a 2-core machine.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [pytest.mark.threestudio, pytest.mark.slow]

STEPS = 100
VIEWS = 160
#: stated margins (dB).  Measured (2-core machine, seed 0): initial 9.67 dB (the init sphere), SDS CFG 7.5
#: 18.69, VDM 16.90, SDS on the mirrored prior 10.80 -- the bars leave about half of each margin as slack.
SDS_GAIN = 5.0
VDM_GAIN = 4.0
MIRROR_GAP = 4.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from scoredistill.bench import gt3d_bench as b

    out = str(tmp_path_factory.mktemp("gt3d"))
    right = os.path.join(out, "prior")
    mirrored = os.path.join(out, "prior-mirrored")
    b.build_scene_prior(right, VIEWS, scenes=("cube",))
    b.build_scene_prior(mirrored, VIEWS, scenes=("cube",), azimuth_offset_deg=180.0)
    jobs = {
        "sds": (b.ROW_BY_NAME["gs-sds (CFG 7.5)"], right, "right"),
        "vdm": (b.ROW_BY_NAME["vdm-gs"], right, "right"),
        "mirrored": (b.ROW_BY_NAME["gs-sds (CFG 7.5)"], mirrored, "mirrored"),
    }

    def go(item):
        key, (row, prior, sub) = item
        info = b.run_one(row, "cube", 0, prior, os.path.join(out, sub), STEPS, "eval", 10.0)
        return key, info

    with ThreadPoolExecutor(max_workers=2) as pool:
        infos = dict(pool.map(go, jobs.items()))
    gt = b.GroundTruth(n_test=17)
    scores = {k: b.score_run(v["trial"], "cube", "gs", gt) for k, v in infos.items()}
    for k, v in infos.items():
        scores[k]["unet_samples"] = v["unet_samples"]
    print({k: (round(s["initial_psnr"], 2), round(s["psnr"], 2)) for k, s in scores.items()}, file=sys.stderr)
    return scores


def test_sds_cfg_7_5_reconstructs_the_cube(runs):
    s = runs["sds"]
    assert s["psnr"] >= s["initial_psnr"] + SDS_GAIN, (s["initial_psnr"], s["psnr"])
    # the validation curve rises overall, and the exact UNet cost is SDS's: B=2 views x (cond + uncond) per step
    assert s["curve"][-1][1] > s["curve"][0][1]
    assert s["unet_samples"] == 4 * STEPS


def test_a_pack_method_vdm_reconstructs_the_cube(runs):
    s = runs["vdm"]
    assert s["psnr"] >= s["initial_psnr"] + VDM_GAIN, (s["initial_psnr"], s["psnr"])


def test_mirrored_camera_convention_is_clearly_worse(runs):
    assert runs["mirrored"]["psnr"] <= runs["sds"]["psnr"] - MIRROR_GAP, (runs["mirrored"]["psnr"], runs["sds"]["psnr"])
