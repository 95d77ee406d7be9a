"""Probe: bad settings / files through the pack's code, classified as refused early, caught late or silent.

Run (CPU, in-process, no model weights; Shap-E and model loading are stubbed to record that they were reached):
    THREESTUDIO_ROOT=/path/to/threestudio python benchmarks/verification/bad_inputs_probe.py

* system overrides on configs/ge3d-gs.yaml: the system is built with ``geometry.init: shap_e`` and
  ``run_shap_e`` replaced by a stub. "early" = ValueError naming the setting before the stub is reached;
  "late" = the stub (Shap-E) was reached first, i.e. the error would only come after heavy loads or mid-run;
  "silent" = construction went through and the input is not refused later by the pack (listed by hand below
  from the code: the value reaches gsplat / training as is).
* file inputs (PLY import) and plain-function inputs: "early" = ValueError naming the file/setting, "silent" =
  accepted, "late" = a different exception.
Prints one line per input and the totals.
"""
import math
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests"))

from harness import import_threestudio  # noqa: E402

threestudio = import_threestudio()
import torch  # noqa: E402

from scoredistill.geometry import gaussian_init, gaussian_ply  # noqa: E402
from threestudio.utils.config import load_config  # noqa: E402


class Heavy(Exception):
    pass


def _stub(*a, **k):
    raise Heavy()


gaussian_init.run_shap_e = _stub

OVERRIDES = [
    "system.geometry.init_radius=.nan", "system.geometry.init_scale=.nan", "system.geometry.upsample_jitter=.nan",
    "system.geometry.init_opacity=.nan", "system.geometry.init_scale_factor=.inf", "system.geometry.num_points=0",
    "system.geometry.sh_degree=4", "system.geometry.init_offset=[0,.nan,0]", "system.geometry.init=cube",
    "system.strategy.grow_grad2d=-0.001", "system.strategy.prune_opa=1.5", "system.strategy.refine_every=0",
    "system.strategy.reset_every=0", "system.strategy.absgrad=true", "system.strategy.packed=true",
    "system.strategy.max_num=-1", "system.strategy.grow_scale3d=.nan", "system.strategy.scene_scale=0",
    "system.strategy.type=adc", "system.strategy.unknown_key=1",
    "system.guidance.n_steps=0", "system.guidance.guidance_scale=-1", "system.guidance.guidance_scale=.nan",
    "system.guidance.min_step_percent=0.99", "system.guidance.dbc_sigma=0", "system.guidance.trajectory=x",
    "system.guidance.no_such_setting=1", "system.guidance.image_size=30",
    "system.prompt_processor.prompt=''", "system.prompt_processor.prompt=' '",
    "system.renderer.eps2d=.nan", "system.renderer.near_plane=0", "system.renderer.tile_size=0",
    "system.exporter.save_name=x.obj", "system.exporter.save_name=../x.ply",
    "system.loss.lambda_sds=.nan", "system.optimizer.args.eps=.inf", "system.position_lr.lr_init=.nan",
    "system.ply_name=x.obj",
]


def probe_override(ov):
    cfg = load_config(os.path.join(REPO, "configs", "ge3d-gs.yaml"),
                      cli_args=["system.prompt_processor.prompt=a red ball", ov], n_gpus=0)
    try:
        threestudio.find(cfg.system_type)(cfg.system)
    except Heavy:
        return "late", "reached Shap-E first"
    except ValueError as e:
        return "early", str(e).splitlines()[0][:110]
    except Exception as e:  # noqa: BLE001
        return "late", f"{type(e).__name__}: {str(e)[:100]}"
    return "silent", "accepted"


def _params(n=4, degree=0):
    k = (degree + 1) ** 2
    return {"means": torch.randn(n, 3), "scales": torch.randn(n, 3) - 3, "quats": torch.randn(n, 4),
            "opacities": torch.randn(n), "sh0": torch.randn(n, 1, 3), "shN": torch.randn(n, k - 1, 3)}


def file_inputs(tmp):
    out = []

    def run(name, fn):
        try:
            fn()
        except ValueError as e:
            out.append((name, "early", str(e)[:110]))
        except Exception as e:  # noqa: BLE001
            out.append((name, "late", f"{type(e).__name__}: {str(e)[:100]}"))
        else:
            out.append((name, "silent", "accepted"))

    for key in ("means", "opacities", "shN", "scales"):
        p = _params(degree=1)
        p[key].view(-1)[0] = float("nan")
        path = gaussian_ply.save_gaussians_ply(os.path.join(tmp, f"nan-{key}.ply"), p)
        run(f"PLY with NaN {key}", lambda path=path: gaussian_ply.load_gaussians_ply(path))
    path = gaussian_ply.save_gaussians_ply(os.path.join(tmp, "cut.ply"), _params(n=50))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-200])
    run("truncated PLY", lambda: gaussian_ply.load_gaussians_ply(path))
    d3 = gaussian_ply.save_gaussians_ply(os.path.join(tmp, "d3.ply"), _params(degree=3))
    run("degree-3 PLY with sh_degree 0", lambda: gaussian_ply.load_gaussians_ply(d3, sh_degree=0))

    def empty_roundtrip():
        e = {k: v[:0] for k, v in _params().items()}
        gaussian_ply.load_gaussians_ply(gaussian_ply.save_gaussians_ply(os.path.join(tmp, "empty.ply"), e))
    run("zero Gaussians export/import (must work)", empty_roundtrip)
    return out


def main():
    counts = {"early": 0, "late": 0, "silent": 0}
    for ov in OVERRIDES:
        kind, msg = probe_override(ov)
        counts[kind] += 1
        print(f"{kind:6s} {ov:45s} {msg}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, msg in file_inputs(tmp):
            if "must work" in name:
                print(f"{'works' if kind == 'silent' else 'FAILS':6s} {name:45s} {msg}")
                continue
            counts[kind] += 1
            print(f"{kind:6s} {name:45s} {msg}")
    total = sum(counts.values())
    print(f"inputs tried: {total}; refused early: {counts['early']}; caught late: {counts['late']}; silent: {counts['silent']}")


if __name__ == "__main__":
    main()
