"""Issue 13 findings 2, 3, 4, 7, 8 and issue 14 item 5: bad inputs are refused early with the full setting name.

Each test reproduces one finding and fails on the code before the fix (noted per test).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from scoredistill.geometry import gaussian_init, gaussian_params, gaussian_ply
from scoredistill.geometry.densify import GaussianDensifier, group_views

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NAN, INF = float("nan"), float("inf")


def _params(n=5, degree=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return {
        "means": torch.randn(n, 3, generator=g), "scales": torch.randn(n, 3, generator=g) - 3,
        "quats": torch.randn(n, 4, generator=g), "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g), "shN": torch.randn(n, k - 1, 3, generator=g),
    }


# ------------------------------------------------------------------------------ finding 2 / 7: PLY import
@pytest.mark.parametrize("key,prop", [("opacities", "opacity"), ("means", "x/y/z"), ("shN", "f_rest_*")])
def test_ply_import_rejects_non_finite_values_naming_the_file(tmp_path, key, prop):
    # before: the NaN was loaded silently (it later spread into the UDS edit target)
    p = _params(degree=1)
    p[key].view(-1)[2] = NAN
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "nan.ply"), p)
    with pytest.raises(ValueError) as e:
        gaussian_ply.load_gaussians_ply(path, setting="system.geometry.init_path")
    msg = str(e.value)
    assert "system.geometry.init_path" in msg and "nan.ply" in msg and "non-finite" in msg and f"1 in {prop}" in msg


def test_point_cloud_import_rejects_non_finite_points(tmp_path):
    from plyfile import PlyData, PlyElement

    arr = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    arr["y"][1] = np.inf
    path = str(tmp_path / "pc.ply")
    PlyData([PlyElement.describe(arr, "vertex")]).write(path)
    with pytest.raises(ValueError, match=r"system.geometry.init_path = '.*pc.ply'.*non-finite.*1 in x/y/z"):
        gaussian_init.load_point_cloud(path, setting="system.geometry.init_path")


def test_truncated_ply_error_names_file_and_setting(tmp_path):
    # before: plyfile's own error, naming neither the file nor the setting
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "cut.ply"), _params(n=50))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 300])
    with pytest.raises(ValueError, match=r"system.source_ply = '.*cut.ply': cannot read the PLY \(truncated"):
        gaussian_ply.load_gaussians_ply(path, setting="system.source_ply")


def test_zero_gaussians_export_and_import(tmp_path):
    # before: "cannot reshape tensor of 0 elements", so a fully pruned model crashed the end-of-training save
    for degree in (0, 3):
        empty = {k: v[:0] for k, v in _params(degree=degree).items()}
        path = gaussian_ply.save_gaussians_ply(str(tmp_path / f"empty{degree}.ply"), empty)
        back = gaussian_ply.load_gaussians_ply(path)
        assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in empty.items()}


# ------------------------------------------------------------------------------ issue 14 item 5: SH degree
def test_higher_degree_ply_is_refused_not_truncated(tmp_path):
    # before: a degree-3 PLY loaded with sh_degree 0 silently lost its 15 bands
    p = _params(degree=3)
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "d3.ply"), p)
    assert gaussian_ply.ply_sh_degree(path) == 3
    with pytest.raises(ValueError, match=r"SH degree 3 .* system.geometry.sh_degree is 0; set system.geometry.sh_degree: 3"):
        gaussian_ply.load_gaussians_ply(path, sh_degree=0, setting="system.geometry.init_path", sh_setting="system.geometry.sh_degree")
    kept = gaussian_ply.load_gaussians_ply(path, sh_degree=3)
    assert torch.equal(kept["shN"], p["shN"])
    dropped = gaussian_ply.load_gaussians_ply(path, sh_degree=1, drop_sh_bands=True)  # explicit
    assert torch.equal(dropped["shN"], p["shN"][:, :3])


# ------------------------------------------------------------------------------ finding 7: atomic writes
def test_atomic_write_gives_umask_mode_and_removes_stale_temporaries(tmp_path):
    # before: the PLY kept mkstemp's 0600, and temporaries of killed writers stayed forever
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-g.ply.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / ".tmp-other.ply.1.abc.tmp"  # another file's temporary: left alone
    other.write_bytes(b"y")
    old = os.umask(0o027)
    try:
        path = gaussian_ply.save_gaussians_ply(str(tmp_path / "g.ply"), _params())
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o640
    assert sorted(os.listdir(tmp_path)) == sorted(["g.ply", other.name])

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gaussian_ply.write_ply_atomic(path, boom)
    assert sorted(os.listdir(tmp_path)) == sorted(["g.ply", other.name])


# ------------------------------------------------------------------------------ finding 3: densification
@pytest.mark.parametrize(
    "opts,match",
    [
        ({"grow_grad2d": -1e-4}, r"system.strategy.grow_grad2d must be a finite number >= 0.0, got"),
        ({"grow_grad2d": NAN}, r"system.strategy.grow_grad2d must be a finite number"),
        ({"prune_opa": 1.5}, r"system.strategy.prune_opa must be a finite number in \[0.0, 1.0\)"),
        ({"refine_every": 0}, r"system.strategy.refine_every must be an integer >= 1, got"),
        ({"reset_every": 0}, r"system.strategy.reset_every must be an integer >= 1, got"),
        ({"grow_scale3d": INF}, r"system.strategy.grow_scale3d must be a finite number"),
        ({"scene_scale": NAN}, r"system.strategy.scene_scale must be a finite number"),
        ({"max_num": -5}, r"system.strategy.max_num must be an integer >= 0, got"),
        ({"type": "mcmc", "cap_max": 0}, r"system.strategy.cap_max must be an integer >= 1, got"),
        ({"type": "mcmc", "max_num": 10}, r"system.strategy.max_num is for type: default"),
    ],
)
def test_bad_densification_settings_are_refused(opts, match):
    # before: each reached gsplat (count doubling, everything pruned, ZeroDivisionError after step 1)
    with pytest.raises(ValueError, match=match):
        GaussianDensifier(dict(opts))


def test_absgrad_and_packed_need_the_renderers_output():
    # before: AttributeError (means2d.absgrad) / TypeError mid-run
    from scoredistill.geometry.densify import validate_strategy_config

    with pytest.raises(ValueError, match=r"system.strategy.absgrad: true .* system.renderer.absgrad: true"):
        validate_strategy_config({"absgrad": True}, {"absgrad": False})
    with pytest.raises(ValueError, match=r"system.strategy.packed: true needs .*system.renderer.packed: true"):
        validate_strategy_config({"packed": True}, {"packed": False})
    validate_strategy_config({"absgrad": True, "packed": True}, {"absgrad": True, "packed": True})
    with pytest.raises(ValueError, match="system.strategy.absgrad: true needs gsplat's CUDA rasterizer"):
        GaussianDensifier({"absgrad": True}).check_device(torch.device("cpu"))


def _scripted(n=6):
    pts = torch.tensor([[i * 0.5, 0.0, 0.0] for i in range(n)])
    p = gaussian_init.params_from_points(pts, sh_degree=0, init_opacity=0.5, init_scale=0.005)
    with torch.no_grad():
        p["opacities"] += torch.arange(n, dtype=torch.float32) * 0.1  # distinct opacities
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in p.items()})
    opt = torch.optim.Adam([{"params": [params[k]], "name": f"geometry.{k}", "lr": 0.01} for k in gaussian_params.PARAM_KEYS])
    return params, opt


def _refine_everything(dens, params, opt, step):
    views = group_views(opt, {k: f"geometry.{k}" for k in gaussian_params.PARAM_KEYS})
    n = params["means"].shape[0]
    means2d = torch.zeros(1, n, 2, requires_grad=True)
    info = {"means2d": means2d, "radii": torch.full((1, n, 2), 3, dtype=torch.int32), "width": 10, "height": 10,
            "n_cameras": 1, "gaussian_ids": None}
    dens.pre_backward(params, views, step, info)
    (means2d * torch.ones(1, n, 2)).sum().backward()  # every Gaussian above the threshold
    return dens.post_backward(params, views, step, info)


def test_max_num_caps_the_gaussian_count():
    # before: no cap (and `max_num` was an unknown option)
    base = {"refine_start_iter": 0, "refine_every": 1, "grow_grad2d": 0.01, "grow_scale3d": 100.0,
            "reset_every": 10**6, "prune_opa": 0.005}
    params, opt = _scripted()
    assert _refine_everything(GaussianDensifier(dict(base)), params, opt, 1) == {"before": 6, "after": 12}
    params, opt = _scripted()
    opac_before = params["opacities"].detach().clone()
    dens = GaussianDensifier(dict(base, max_num=9))
    assert _refine_everything(dens, params, opt, 1) == {"before": 6, "after": 9}  # overshoot trimmed
    # the least opaque were dropped: the 9 most opaque of the 6 originals + 6 clones survive
    kept = torch.sort(params["opacities"].detach()).values
    assert torch.equal(kept, torch.sort(torch.cat([opac_before, opac_before])).values[3:])
    assert opt.param_groups[0]["params"][0] is params["means"] and dens.state["grad2d"].shape == (9,)
    assert _refine_everything(dens, params, opt, 2) == {"before": 9, "after": 9}  # at the cap: no growth


# ------------------------------------------------------------------------------ finding 2: CPU rasterizer
def test_one_nan_colour_does_not_poison_its_tile():
    from scoredistill.renderer.gsplat_render import rasterize_cpu

    means = torch.tensor([[-0.5, -0.5, 0.0], [0.5, 0.5, 0.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    scales = torch.full((2, 3), 0.02)
    opac = torch.tensor([0.9, 0.9])
    colors = torch.tensor([[1.0, 0.0, 0.0], [NAN, 0.0, 0.0]])
    viewmat = torch.eye(4)
    viewmat[2, 3] = 3.0
    K = torch.tensor([[40.0, 0, 8], [0, 40.0, 8], [0, 0, 1]])
    img, alpha, _ = rasterize_cpu(means, quats, scales, opac, colors, viewmat[None], K[None], 16, 16)
    # one 16x16 tile holds both Gaussians; only the NaN Gaussian's own footprint may be NaN (gsplat's rule)
    nan_px = torch.isnan(img[0, ..., 0])
    assert nan_px.any() and nan_px.float().mean() < 0.2
    assert img[0, 1:6, 1:6, 0].max() > 0.5 and torch.isfinite(img[0, :8, :8]).all()


# ------------------------------------------------------------------------------ finding 8: import next to a checkout
def test_import_scoredistill_next_to_a_threestudio_checkout(tmp_path):
    # before: ModuleNotFoundError: No module named 'threestudio.models'
    (tmp_path / "threestudio" / "threestudio").mkdir(parents=True)
    (tmp_path / "threestudio" / "launch.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    import scoredistill

    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(scoredistill.__file__)))  # the code under test
    code = "import sys, scoredistill; print(scoredistill.THREESTUDIO_AVAILABLE, 'threestudio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------ threestudio in-process
@pytest.mark.threestudio
@pytest.mark.parametrize(
    "override,match",
    [
        ({"init_radius": NAN}, r"system.geometry.init_radius must be a finite number > 0, got"),
        ({"init_scale": NAN}, r"system.geometry.init_scale must be a finite number > 0 or null, got"),
        ({"upsample_jitter": NAN}, r"system.geometry.upsample_jitter must be a finite number >= 0, got"),
        ({"init_opacity": NAN}, r"system.geometry.init_opacity must be a finite number in \(0.0, 1.0\)"),
        ({"init_scale_factor": INF}, r"system.geometry.init_scale_factor must be a finite number"),
        ({"init_offset": [0.0, NAN, 0.0]}, r"system.geometry.init_offset must be 3 finite numbers"),
        ({"init": "ply", "init_path": "/nonexistent.ply"}, r"system.geometry.init_path = '/nonexistent.ply': no such file"),
    ],
)
def test_non_finite_geometry_settings_are_refused(threestudio_module, override, match):
    # before: NaN passed the `x <= 0` checks and made NaN Gaussians
    with pytest.raises(ValueError, match=match):
        threestudio_module.find("gsplat-gaussian-splatting")({"init": "sphere", "num_points": 8, **override})


@pytest.mark.threestudio
def test_ply_init_keeps_bands_and_starts_at_the_files_degree(threestudio_module, tmp_path):
    p = _params(n=7, degree=3)
    path = gaussian_ply.save_gaussians_ply(str(tmp_path / "d3.ply"), p)
    find = threestudio_module.find("gsplat-gaussian-splatting")
    with pytest.raises(ValueError, match=r"system.geometry.init_path = .*d3.ply.*SH degree 3.*system.geometry.sh_degree is 0"):
        find({"init": "ply", "init_path": path, "sh_degree": 0})
    geo = find({"init": "ply", "init_path": path, "sh_degree": 3})
    assert torch.equal(geo.params["shN"].detach(), p["shN"])
    assert geo.active_sh_degree == 3  # before: 0 for the first 3000 steps
    geo.do_update_step(0, 0)
    assert geo.active_sh_degree == 3
    dropped = find({"init": "ply", "init_path": path, "sh_degree": 1, "drop_sh_bands": True})
    assert dropped.active_sh_degree == 1 and dropped.params["shN"].shape == (7, 3, 3)
    fresh = find({"init": "sphere", "num_points": 4, "sh_degree": 3, "initial_active_sh_degree": 2})
    assert fresh.active_sh_degree == 2


@pytest.mark.threestudio
def test_guidance_errors_name_the_full_setting(threestudio_module):
    # before: "guidance_scale must be a finite number > 0"
    with pytest.raises(ValueError, match=r"^system.guidance.guidance_scale must be a finite number > 0"):
        threestudio_module.find("ge3d-guidance")({"guidance_scale": -1.0})
    with pytest.raises(ValueError, match=r"^system.guidance.n_steps \(number of trajectory intervals n\) must be"):
        threestudio_module.find("ge3d-guidance")({"n_steps": 0})


def _system_cfg(threestudio_module, config, *overrides):
    from threestudio.utils.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", config), cli_args=list(overrides), n_gpus=0)
    return cfg.system


@pytest.mark.threestudio
@pytest.mark.parametrize(
    "config,override,match",
    [
        ("ge3d-gs.yaml", "system.guidance.n_steps=0", r"system.guidance.n_steps \(number of trajectory intervals n\) must be"),
        ("ge3d-gs.yaml", "system.guidance.guidance_scale=nan", r"system.guidance.guidance_scale must be a finite number"),
        ("ge3d-gs.yaml", "system.guidance.no_such_setting=1", r"system.guidance: unknown settings \['system.guidance.no_such_setting'\]"),
        ("ge3d-gs.yaml", "system.prompt_processor.prompt=''", r"system.prompt_processor.prompt must be a non-empty text prompt"),
        ("ge3d-gs.yaml", "system.prompt_processor.prompt=' '", r"system.prompt_processor.prompt must be a non-empty text prompt"),
        ("ge3d-gs.yaml", "system.strategy.refine_every=0", r"system.strategy.refine_every must be an integer >= 1, got"),
        ("ge3d-gs.yaml", "system.strategy.absgrad=true", r"system.strategy.absgrad: true .* system.renderer.absgrad: true"),
        ("ge3d-gs.yaml", "system.renderer.eps2d=nan", r"system.renderer.eps2d must be a finite number"),
        ("ge3d-gs.yaml", "system.exporter.save_name=../x.ply", r"system.exporter.save_name must be relative"),
        ("ge3d-gs.yaml", "system.loss.lambda_sds=nan", r"system.loss.lambda_sds must be a finite number"),
        ("gs-sds.yaml", "system.guidance.no_such_setting=1", r"system.guidance: unknown settings"),
        ("uds-gs.yaml", "system.guidance.mode=edit", r"system.guidance.mode must be one of"),
        ("vdm-gs.yaml", "system.guidance.dca_cutoff=-3", r"system.guidance.dca_cutoff must be"),
        ("lods-embedding-gs.yaml", "system.guidance.variant=x", r"system.guidance.variant must be one of"),
    ],
)
def test_system_settings_are_refused_before_shap_e_and_models_load(threestudio_module, monkeypatch, config, override, match):
    # before: the geometry (Shap-E by default) was built first; guidance errors came after it loaded
    def no_shap_e(*a, **k):
        raise AssertionError("Shap-E was started before the settings were checked")

    monkeypatch.setattr(gaussian_init, "run_shap_e", no_shap_e)
    cfg = _system_cfg(threestudio_module, config, "system.prompt_processor.prompt=a red ball", override)
    with pytest.raises(ValueError, match=match):
        threestudio_module.find(cfg_type(config))(cfg)


def cfg_type(config):
    return {"ge3d-gs.yaml": "gsplat-system", "gs-sds.yaml": "gsplat-system", "uds-gs.yaml": "gsplat-system",
            "vdm-gs.yaml": "gsplat-system", "lods-embedding-gs.yaml": "gsplat-system"}[config]


# ------------------------------------------------------------------------------ finding 4: failed start, launch.py
@pytest.mark.threestudio
@pytest.mark.slow
def test_failed_start_keeps_the_trials_config_files(tmp_path):
    """``launch.py --config <trial>/configs/parsed.yaml --train <override that fails at start>`` must leave the
    trial's ``configs/parsed.yaml`` and ``raw.yaml`` as they were.  Before: threestudio's ConfigSnapshotCallback
    rewrote both in ``on_fit_start``, before the guidance loaded and failed."""
    from harness import import_threestudio, run_launch, tiny_overrides, tiny_sd_path

    import_threestudio()
    from threestudio.utils.config import dump_config, load_config

    sd = tiny_sd_path()
    exp_root = str(tmp_path / "outputs")
    overrides = tiny_overrides(sd, "system.geometry.init=sphere", "system.geometry.num_points=50",
                               "system.geometry.upsample_to=0", "data.batch_size=1", max_steps=1)
    cfg = load_config(os.path.join(REPO, "configs", "ge3d-gs.yaml"), cli_args=overrides + [f"exp_root_dir={exp_root}"], n_gpus=1)
    configs = os.path.join(cfg.trial_dir, "configs")
    os.makedirs(configs)
    parsed = os.path.join(configs, "parsed.yaml")
    dump_config(parsed, cfg)
    with open(os.path.join(configs, "raw.yaml"), "w") as f:
        f.write("# the trial's original raw config\n")
    before = {n: open(os.path.join(configs, n), "rb").read() for n in ("parsed.yaml", "raw.yaml")}
    with pytest.raises(RuntimeError) as e:  # the guidance fails to load in on_fit_start
        run_launch(parsed, ["system.guidance.pretrained_model_name_or_path=/nonexistent-model"], exp_root=exp_root,
                   timeout=600)
    assert "nonexistent-model" in str(e.value)
    after = {n: open(os.path.join(configs, n), "rb").read() for n in ("parsed.yaml", "raw.yaml")}
    assert after == before
    assert not os.path.exists(os.path.join(cfg.trial_dir, "ckpts"))


@pytest.mark.threestudio
def test_uds_edit_source_keeps_its_sh_bands_from_step_0(threestudio_module, tmp_path):
    """Issue 14 item 5: the UDS editing source (a degree-3 3DGS PLY) renders with its view-dependent colour from
    step 0; with the config's default sh_degree 0 the PLY is refused instead of losing its 15 bands."""
    p = _params(n=20, degree=3)
    ply = gaussian_ply.save_gaussians_ply(str(tmp_path / "asset.ply"), p)
    base = ["system.prompt_processor.prompt=a red ball", "system.source_prompt=a ball", f"system.source_ply={ply}"]
    cfg = _system_cfg(threestudio_module, "uds-edit-gs.yaml", *base)
    with pytest.raises(ValueError, match=r"asset.ply.*SH degree 3 .*system.geometry.sh_degree is 0"):
        threestudio_module.find("gsplat-edit-system")(cfg)
    cfg = _system_cfg(threestudio_module, "uds-edit-gs.yaml", *base, "system.geometry.sh_degree=3")
    system = threestudio_module.find("gsplat-edit-system")(cfg)
    assert system.geometry.active_sh_degree == 3  # before: 0 until step 3000
    system.geometry.do_update_step(0, 0)
    assert system.geometry.active_sh_degree == 3
    assert torch.equal(system._source["geometry"].params["shN"].detach(), p["shN"])
    # the resumed run (init -> empty) keeps the floor from the PLY header
    resumed = threestudio_module.find("gsplat-edit-system")(
        _system_cfg(threestudio_module, "uds-edit-gs.yaml", *base, "system.geometry.sh_degree=3"), resumed=True
    )
    assert resumed.geometry.num_gaussians == 0 and resumed.geometry.active_sh_degree == 3


@pytest.mark.threestudio
def test_exporter_temp_folder_is_removed_and_ply_has_umask_mode(threestudio_module):
    """Finding 7: ``save_via_file`` left its ``gsplat-ply-*`` temporary folder behind, and the PLY was 0600."""
    import gc

    geo = threestudio_module.find("gsplat-gaussian-splatting")({"init": "sphere", "num_points": 5})
    exporter = threestudio_module.find("gsplat-ply-exporter")({"save_via_file": True}, geometry=geo, material=None,
                                                             background=None)
    first = exporter()[0].params["src_path"]
    assert (os.stat(first).st_mode & 0o777) == (0o666 & ~_umask())
    second = exporter()[0].params["src_path"]
    assert os.path.isfile(second) and not os.path.exists(os.path.dirname(first))
    assert gaussian_ply.load_gaussians_ply(second)["means"].shape == (5, 3)
    del exporter
    gc.collect()
    assert not os.path.exists(os.path.dirname(second))


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m
