"""Contract of the pack's call of ``gsplat.rasterization`` (the CUDA render path), checked on the CPU.

The CUDA kernels cannot run here, so the renderer's CUDA branch is driven with CPU tensors through a
stand-in for ``gsplat.rasterization`` that
* binds the call to gsplat's *real* signature (``inspect.signature(gsplat.rasterization).bind``): a renamed
  or removed keyword in a gsplat release fails here, on CPU;
* asserts the shapes, dtypes and value ranges gsplat's docstring documents for every mode the pack uses
  (RGB+ED, SH degree 0-3, classic / antialiased, packed, absgrad, several cameras);
* returns the CPU fallback's output (converted to gsplat's packed ``info`` layout when ``packed=True``, with
  ``means2d.absgrad`` filled on backward when ``absgrad=True``), so the rest of the pipeline — threestudio
  outputs, backward, the densifier reading ``info`` — runs as it would on CUDA.
"""
import inspect

import pytest
import torch

pytestmark = pytest.mark.threestudio

import gsplat  # noqa: E402  (a dependency of the pack)
REAL_RASTERIZATION = gsplat.rasterization
SIGNATURE = inspect.signature(REAL_RASTERIZATION)


class GsplatStandIn:
    """Records each call; see the module docstring."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        from scoredistill.renderer.gsplat_render import rasterize_cpu

        bound = SIGNATURE.bind(*args, **kwargs)  # TypeError if the pack's call does not fit gsplat's signature
        bound.apply_defaults()
        a = bound.arguments
        self.calls.append(dict(a))
        means, quats, scales, opacities, colors = a["means"], a["quats"], a["scales"], a["opacities"], a["colors"]
        viewmats, Ks, W, H = a["viewmats"], a["Ks"], a["width"], a["height"]
        N, C = means.shape[0], viewmats.shape[0]
        # documented shapes (no batch dims in the pack's use) and dtypes
        assert means.shape == (N, 3) and quats.shape == (N, 4) and scales.shape == (N, 3)
        assert opacities.shape == (N,)
        assert viewmats.shape == (C, 4, 4) and Ks.shape == (C, 3, 3)
        for name in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"):
            assert a[name].dtype == torch.float32, f"{name} must be float32, got {a[name].dtype}"
            assert a[name].device == means.device
        assert isinstance(W, int) and isinstance(H, int) and W > 0 and H > 0
        if a["sh_degree"] is None:
            assert colors.shape in ((N, colors.shape[-1]), (C, N, colors.shape[-1]))
        else:
            assert isinstance(a["sh_degree"], int) and 0 <= a["sh_degree"] <= 4
            K = colors.shape[-2]
            assert colors.shape == (N, K, 3) and K >= (a["sh_degree"] + 1) ** 2
        assert (scales > 0).all() and ((opacities >= 0) & (opacities <= 1)).all()
        assert a["render_mode"] in ("RGB", "D", "ED", "RGB+D", "RGB+ED")
        assert a["rasterize_mode"] in ("classic", "antialiased")
        assert a["camera_model"] == "pinhole" and a["distributed"] is False
        assert 0 < a["near_plane"] < a["far_plane"]
        assert a["backgrounds"] is None or a["backgrounds"].shape[:-1] == (C,)
        colors_out, alphas, meta = rasterize_cpu(
            means, quats, scales, opacities, colors, viewmats, Ks, W, H,
            near_plane=a["near_plane"], far_plane=a["far_plane"], radius_clip=a["radius_clip"], eps2d=a["eps2d"],
            sh_degree=a["sh_degree"], tile_size=a["tile_size"], backgrounds=a["backgrounds"],
            render_mode=a["render_mode"], rasterize_mode=a["rasterize_mode"],
        )
        full = meta["means2d"]  # [C, N, 2], in the graph of colors_out
        absgrad = a["absgrad"]
        if a["packed"]:
            # gsplat's packed info: one row per visible (camera, Gaussian) pair; its gradient is the full one's rows
            vis = (meta["radii"] > 0).all(dim=-1)  # [C, N]
            cam, gid = vis.nonzero(as_tuple=True)
            meta = dict(meta)
            packed = full.detach()[cam, gid].requires_grad_(full.requires_grad)
            meta["means2d"] = packed
            meta["radii"] = meta["radii"][cam, gid]
            meta["depths"] = meta["depths"][cam, gid]
            meta["camera_ids"], meta["gaussian_ids"] = cam, gid
        if full.requires_grad and (a["packed"] or absgrad):
            target = meta["means2d"]

            def _fill(g, target=target, cam=cam if a["packed"] else None, gid=gid if a["packed"] else None):
                rows = g if cam is None else g[cam, gid]
                if a["packed"]:
                    target.grad = rows.clone()
                if absgrad:
                    target.absgrad = rows.abs()  # gsplat accumulates |∂L/∂means2d| per pixel; the stand-in's proxy

            full.register_hook(_fill)
        return colors_out, alphas, meta


@pytest.fixture
def standin(monkeypatch):
    from scoredistill.renderer import gsplat_render

    s = GsplatStandIn()
    monkeypatch.setattr(gsplat, "rasterization", s)
    monkeypatch.setattr(gsplat_render, "_on_cuda", lambda t: True)  # take the CUDA branch with CPU tensors
    return s


def _renderer(ts, sh_degree, **rcfg):
    geo = ts.find("gsplat-gaussian-splatting")({"init": "sphere", "num_points": 64, "sh_degree": sh_degree, "init_radius": 0.4})
    geo.active_sh_degree = sh_degree
    material = ts.find("no-material")({})
    bg = ts.find("solid-color-background")({"color": [1.0, 1.0, 1.0]})
    return geo, ts.find("gsplat-rasterizer")(dict(backend="cuda", **rcfg), geometry=geo, material=material, background=bg)


def _cameras(n):
    c2ws = []
    for k in range(n):
        a = 2 * torch.pi * k / n
        eye = torch.tensor([2.0 * torch.cos(torch.tensor(a)), 2.0 * torch.sin(torch.tensor(a)), 0.3])
        fwd = -eye / eye.norm()
        right = torch.linalg.cross(fwd, torch.tensor([0.0, 0.0, 1.0]))
        right = right / right.norm()
        up = torch.linalg.cross(right, fwd)
        m = torch.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, -fwd, eye  # OpenGL camera-to-world (threestudio)
        c2ws.append(m)
    return torch.stack(c2ws)


MODES = [
    dict(sh_degree=0, cameras=1),
    dict(sh_degree=1, cameras=2),
    dict(sh_degree=2, cameras=1),
    dict(sh_degree=3, cameras=4),
    dict(sh_degree=3, cameras=2, rasterize_mode="antialiased"),
    dict(sh_degree=0, cameras=2, packed=True),
    dict(sh_degree=1, cameras=2, absgrad=True),
    dict(sh_degree=2, cameras=3, packed=True, absgrad=True, rasterize_mode="antialiased"),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_renderer_call_binds_to_gsplat_signature_and_densifier_reads_its_info(threestudio_module, standin, mode):
    from scoredistill.geometry.densify import GaussianDensifier, group_views

    mode = dict(mode)
    sh, n_cam = mode.pop("sh_degree"), mode.pop("cameras")
    geo, renderer = _renderer(threestudio_module, sh, **mode)
    H, W = 16, 24
    out = renderer(c2w=_cameras(n_cam), fovy=torch.full((n_cam,), 0.8), height=H, width=W)
    assert len(standin.calls) == 1
    call = standin.calls[0]
    assert call["render_mode"] == "RGB+ED" and call["sh_degree"] == sh
    assert call["packed"] is mode.get("packed", False) and call["absgrad"] is mode.get("absgrad", False)
    assert call["rasterize_mode"] == mode.get("rasterize_mode", "classic")
    assert out["comp_rgb"].shape == (n_cam, H, W, 3) and out["depth"].shape == (n_cam, H, W, 1)
    assert torch.isfinite(out["comp_rgb"]).all() and out["opacity"].max() > 0.1
    # backward, then the densifier consumes gsplat's info in this mode (packed layout / absgrad)
    params = geo.params
    adam = torch.optim.Adam([{"params": [v], "name": f"geometry.{k}"} for k, v in params.items()], lr=1e-3)
    opts = group_views(adam, {k: f"geometry.{k}" for k in params})
    strat = GaussianDensifier(dict(type="default", refine_start_iter=0, refine_every=1, grow_grad2d=0.0,
                                       absgrad=mode.get("absgrad", False), packed=mode.get("packed", False)))
    info = out["gsplat_info"]
    strat.pre_backward(params, None, 1, info)
    out["comp_rgb"].mean().backward()
    if mode.get("absgrad"):
        assert info["means2d"].absgrad.shape == info["means2d"].shape
    n0 = params["means"].shape[0]
    counts = strat.post_backward(params, opts, 1, info)
    assert counts["before"] == n0 and counts["after"] > n0  # grow_grad2d=0: visible Gaussians with a gradient grow


def test_an_unknown_keyword_fails_the_contract(standin):
    """The check can fail: a keyword gsplat does not have is refused by the binding."""
    with pytest.raises(TypeError):
        standin(torch.zeros(1, 3), torch.zeros(1, 4), torch.ones(1, 3), torch.ones(1), torch.ones(1, 3),
                torch.eye(4)[None], torch.eye(3)[None], 8, 8, sh_degree_typo=0)
