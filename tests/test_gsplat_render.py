"""Camera conversion, CPU rasterizer vs a brute-force per-pixel reference, densification on a scripted gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from scoredistill.geometry import gaussian_init, gaussian_params, spherical_harmonics
from scoredistill.geometry.densify import GaussianDensifier, GroupView, group_views, scheduled_lr
from scoredistill.renderer.gsplat_cameras import camera_ray_directions, project_points, threestudio_to_gsplat_cameras
from scoredistill.renderer.gsplat_render import rasterize, rasterize_cpu


def _threestudio_cameras(elev_deg, azim_deg, dist, fovy_deg, width, height, center=(0.0, 0.0, 0.0), up_perturb=(0.0, 0.0, 0.0)):
    """c2w and mvp exactly as threestudio's random-camera data module builds them (uncond.py, ops.py)."""
    elev = torch.tensor(elev_deg, dtype=torch.float32) * math.pi / 180
    azim = torch.tensor(azim_deg, dtype=torch.float32) * math.pi / 180
    dist = torch.tensor(dist, dtype=torch.float32)
    b = elev.shape[0]
    pos = torch.stack([dist * torch.cos(elev) * torch.cos(azim), dist * torch.cos(elev) * torch.sin(azim), dist * torch.sin(elev)], -1)
    center = torch.tensor(center, dtype=torch.float32).expand(b, 3)
    up = torch.tensor([0.0, 0.0, 1.0]).expand(b, 3) + torch.tensor(up_perturb)
    lookat = F.normalize(center - pos, dim=-1)
    right = F.normalize(torch.cross(lookat, up, dim=-1), dim=-1)
    up = F.normalize(torch.cross(right, lookat, dim=-1), dim=-1)
    c2w3x4 = torch.cat([torch.stack([right, up, -lookat], dim=-1), pos[:, :, None]], dim=-1)
    c2w = torch.cat([c2w3x4, torch.zeros_like(c2w3x4[:, :1])], dim=1)
    c2w[:, 3, 3] = 1.0
    fovy = torch.tensor(fovy_deg, dtype=torch.float32) * math.pi / 180
    near, far = 0.01, 100.0
    proj = torch.zeros(b, 4, 4)
    proj[:, 0, 0] = 1.0 / (torch.tan(fovy / 2.0) * (width / height))
    proj[:, 1, 1] = -1.0 / torch.tan(fovy / 2.0)
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    w2c = torch.zeros(b, 4, 4)
    w2c[:, :3, :3] = c2w[:, :3, :3].permute(0, 2, 1)
    w2c[:, :3, 3:] = -c2w[:, :3, :3].permute(0, 2, 1) @ c2w[:, :3, 3:]
    w2c[:, 3, 3] = 1.0
    return c2w, fovy, proj @ w2c


def test_camera_conversion_projects_like_threestudio_mvp():
    width, height = 96, 64  # non-square to exercise the aspect ratio
    c2w, fovy, mvp = _threestudio_cameras(
        [15.0, -10.0, 60.0], [0.0, 135.0, -70.0], [2.0, 1.5, 3.0], [40.0, 70.0, 55.0], width, height,
        center=(0.1, -0.2, 0.05), up_perturb=(0.02, -0.01, 0.0),
    )
    viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, width, height)
    pts = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * 0.4
    uv, depth = project_points(pts, viewmats, Ks)
    clip = torch.einsum("bij,nj->bni", mvp, torch.cat([pts, torch.ones(50, 1)], -1))
    ndc = clip[..., :2] / clip[..., 3:4]
    # nvdiffrast/threestudio: ndc -1..1 maps to the pixel edges 0..W / 0..H, proj y already flipped -> row index
    pix = torch.stack([(ndc[..., 0] + 1) * 0.5 * width, (ndc[..., 1] + 1) * 0.5 * height], -1)
    assert torch.allclose(uv, pix, atol=2e-3), (uv - pix).abs().max()
    assert torch.allclose(depth, clip[..., 3], atol=1e-5)  # OpenCV +z depth = OpenGL -z_cam = clip w
    assert (depth > 0).all()
    # rays through pixel centres match threestudio's rays_d (unit-focal directions / focal, rotated by c2w)
    d = camera_ray_directions(c2w, fovy, width, height)
    i, j = 10, 70
    f = 0.5 * height / torch.tan(0.5 * fovy)
    cam = torch.stack([(j + 0.5 - width / 2) / f, -(i + 0.5 - height / 2) / f, -torch.ones(3)], -1)
    expect = F.normalize(torch.einsum("bij,bj->bi", c2w[:, :3, :3], cam), dim=-1)
    assert torch.allclose(d[:, i, j], expect, atol=1e-6)


def test_camera_conversion_rejects_bad_input():
    with pytest.raises(ValueError, match="fovy must be in"):
        threestudio_to_gsplat_cameras(torch.eye(4)[None], torch.tensor([0.0]), 8, 8)
    with pytest.raises(ValueError, match="c2w must have shape"):
        threestudio_to_gsplat_cameras(torch.eye(3)[None], 0.5, 8, 8)
    with pytest.raises(ValueError, match="width and height"):
        threestudio_to_gsplat_cameras(torch.eye(4)[None], 0.5, 0, 8)


# ------------------------------------------------------------------------------------------------
# brute-force reference: independent EWA projection in float64 + per-pixel sequential compositing


def _reference_render(means, quats, scales, opac, colors, viewmat, K, width, height, eps2d=0.3, background=None):
    means, quats, scales, opac, colors = (t.double() for t in (means, quats, scales, opac, colors))
    viewmat, K = viewmat.double(), K.double()
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    cov3 = R @ torch.diag_embed(scales**2) @ R.transpose(1, 2)
    Rw, tw = viewmat[:3, :3], viewmat[:3, 3]
    pc = means @ Rw.T + tw
    cov_c = Rw @ cov3 @ Rw.T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    img = torch.zeros(height, width, colors.shape[1], dtype=torch.float64)
    alpha_img = torch.zeros(height, width, dtype=torch.float64)
    stopped = torch.zeros(height, width, dtype=torch.bool)
    order = torch.argsort(pc[:, 2])
    gs = []
    for n in order.tolist():
        tx, ty, tz = pc[n]
        J = torch.tensor([[fx / tz, 0, -fx * tx / tz**2], [0, fy / tz, -fy * ty / tz**2]], dtype=torch.float64)
        cov2 = J @ cov_c[n] @ J.T + eps2d * torch.eye(2, dtype=torch.float64)
        mean2 = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy])
        gs.append((mean2, torch.linalg.inv(cov2), opac[n], colors[n]))
    for i in range(height):
        for j in range(width):
            px = torch.tensor([j + 0.5, i + 0.5], dtype=torch.float64)
            T, acc = 1.0, torch.zeros(colors.shape[1], dtype=torch.float64)
            for mean2, conic, o, c in gs:
                d = px - mean2
                sigma = 0.5 * (d @ conic @ d)
                a = min(0.999, float(o * torch.exp(-sigma)))
                if sigma < 0 or a < 1 / 255:
                    continue
                if T * (1 - a) <= 1e-4:
                    stopped[i, j] = True
                    break
                acc = acc + c * a * T
                T = T * (1 - a)
            img[i, j] = acc + (0 if background is None else T * background.double())
            alpha_img[i, j] = 1 - T
    return img, alpha_img, stopped


def _scene(n=40, seed=0, opaque=False):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.8, 0.8, 0.8])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.08 + 0.02
    opac = torch.rand(n, generator=g) * (0.98 if opaque else 0.8) + (0.02 if opaque else 0.1)
    if opaque:
        opac = torch.full((n,), 0.999)
        scales = scales * 2.5
    colors = torch.rand(n, 3, generator=g)
    c2w, fovy, _ = _threestudio_cameras([20.0], [30.0], [2.0], [50.0], 20, 36)
    return means, quats, scales, opac, colors, c2w, fovy


@pytest.mark.parametrize("opaque", [False, True])
def test_cpu_rasterizer_matches_brute_force_reference(opaque):
    width, height = 20, 36  # 2 x 3 tiles, partial edge tiles
    means, quats, scales, opac, colors, c2w, fovy = _scene(opaque=opaque)
    viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, width, height)
    bg = torch.tensor([0.2, 0.4, 0.9])
    rgb, alpha, meta = rasterize_cpu(means, quats, scales, opac, colors, viewmats, Ks, width, height,
                                     backgrounds=bg[None], render_mode="RGB")
    ref_rgb, ref_alpha, stopped = _reference_render(means, quats, scales, opac, colors, viewmats[0], Ks[0], width, height, background=bg)
    assert rgb.shape == (1, height, width, 3) and alpha.shape == (1, height, width, 1)
    assert (meta["radii"] > 0).all(-1).sum() > 30  # most Gaussians visible
    err = (rgb[0].double() - ref_rgb).abs().max().item()
    assert err < 2e-4, err
    assert (alpha[0, ..., 0].double() - ref_alpha).abs().max().item() < 2e-4
    if opaque:  # the exclusive 1e-4 transmittance stop fired (without it alpha would exceed 0.999 there)
        assert stopped.sum() > 10


def test_cpu_rasterizer_depth_sh_and_gradients():
    width, height = 16, 16
    means, quats, scales, opac, colors, c2w, fovy = _scene(n=25, seed=3)
    viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, width, height)
    means = means.clone().requires_grad_(True)
    sh = torch.zeros(25, 4, 3)
    sh[:, 0] = spherical_harmonics.rgb_to_sh0(colors)
    sh = sh.requires_grad_(True)
    out, alpha, meta = rasterize_cpu(means, quats, scales, opac, sh, viewmats, Ks, width, height, sh_degree=1, render_mode="RGB+ED")
    # degree-1 bands are zero -> colour equals the DC colour; compare with post-activation colours
    out2, alpha2, _ = rasterize_cpu(means, quats, scales, opac, colors, viewmats, Ks, width, height, render_mode="RGB+D")
    assert torch.allclose(out[..., :3], out2[..., :3], atol=1e-5)
    assert torch.equal(alpha, alpha2)
    # expected depth = accumulated depth / alpha
    hit = alpha[..., 0] > 1e-3
    assert torch.allclose(out[..., 3][hit], (out2[..., 3] / alpha2[..., 0])[hit], rtol=1e-5)
    camera_depths = meta["depths"][0]
    assert out[..., 3][hit].min() >= camera_depths.min() - 1e-4 and out[..., 3][hit].max() <= camera_depths.max() + 1e-4
    meta["means2d"].retain_grad()
    (out[..., :3].sum() + alpha.sum()).backward()
    assert means.grad is not None and means.grad.abs().sum() > 0
    assert sh.grad[:, 1:].abs().sum() > 0  # view-dependent bands receive gradient
    assert meta["means2d"].grad.shape == (1, 25, 2) and meta["means2d"].grad.abs().sum() > 0


def test_cpu_rasterizer_gradient_matches_finite_differences():
    width, height = 8, 8
    means, quats, scales, opac, colors, c2w, fovy = _scene(n=6, seed=5)
    viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, width, height)
    args = [t.double() for t in (means, quats, scales, opac, colors)]
    vm, K = viewmats.double(), Ks.double()
    w = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def f(m):
        rgb, _, _ = rasterize_cpu(m, *args[1:], vm, K, width, height)
        return (rgb * w).sum()

    m = args[0].clone().requires_grad_(True)
    f(m).backward()
    num = torch.zeros_like(m)
    for idx in range(m.numel()):
        e = torch.zeros_like(m).view(-1)
        e[idx] = 1e-6
        num.view(-1)[idx] = (f(args[0] + e.view_as(m)) - f(args[0] - e.view_as(m))) / 2e-6
    assert torch.allclose(m.grad, num, atol=1e-4, rtol=1e-3)


def test_culling_rules():
    width = height = 16
    c2w, fovy, _ = _threestudio_cameras([0.0], [0.0], [2.0], [50.0], width, height)
    viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, width, height)
    means = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # 3rd behind camera (x>dist)
    scales = torch.full((4, 3), 0.05)
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1)
    opac = torch.tensor([0.5, 0.5 / 255, 0.9, 0.9])
    colors = torch.ones(4, 3)
    _, _, meta = rasterize_cpu(means, quats, scales, opac, colors, viewmats, Ks, width, height, far_plane=100.0)
    radii = meta["radii"][0]
    assert (radii[0] > 0).all()
    assert (radii[1] == 0).all()  # opacity below 1/255
    assert (radii[2] == 0).all()  # behind the camera
    o = 0.5
    cov = meta["conics"][0, 0]
    sxx = cov[2] / (cov[0] * cov[2] - cov[1] ** 2)  # Sigma_xx from the conic
    assert radii[0, 0].item() == math.ceil(min(3.33, math.sqrt(2 * math.log(o * 255))) * math.sqrt(sxx.item()))
    with pytest.raises(ValueError, match="render_mode"):
        rasterize_cpu(means, quats, scales, opac, colors, viewmats, Ks, width, height, render_mode="RGBD")
    with pytest.raises(ValueError, match="backend"):
        rasterize(means, quats, scales, opac, colors, viewmats, Ks, width, height, backend="metal")
    with pytest.raises(ValueError, match="CUDA device"):
        rasterize(means, quats, scales, opac, colors, viewmats, Ks, width, height, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares the CPU fallback with gsplat's CUDA rasterizer")
@pytest.mark.parametrize("sh_degree,rasterize_mode", [(None, "classic"), (3, "classic"), (2, "antialiased")])
def test_cpu_fallback_matches_gsplat_cuda(sh_degree, rasterize_mode):
    width, height = 64, 48  # non-square, partial tiles
    means, quats, scales, opac, colors, c2w, fovy = _scene(n=500, seed=7)
    if sh_degree is not None:  # SH path: gsplat's CUDA spherical_harmonics vs the torch one, + 0.5, clamp
        sh = (torch.rand(500, 16, 3, generator=torch.Generator().manual_seed(8)) - 0.5) * 0.6
        sh[:, 0] = spherical_harmonics.rgb_to_sh0(colors)
        colors = sh
    viewmats, Ks = threestudio_to_gsplat_cameras(c2w, fovy, width, height)
    bg = torch.tensor([[0.3, 0.3, 0.3]])
    kw = dict(backgrounds=bg, render_mode="RGB+ED", sh_degree=sh_degree, rasterize_mode=rasterize_mode)
    cpu = rasterize(means, quats, scales, opac, colors, viewmats, Ks, width, height, **kw)
    dev = [t.cuda() for t in (means, quats, scales, opac, colors, viewmats, Ks)]
    gpu = rasterize(*dev, width, height, **dict(kw, backgrounds=bg.cuda()))
    # same culling / opacity-aware radii (allowing a rare ceil() flip from CUDA's fast-math logf)
    assert (cpu[2]["radii"] == gpu[2]["radii"].cpu()).all(-1).float().mean().item() > 0.99
    for a, b in zip(cpu[:2], gpu[:2]):  # RGB + expected depth, alpha
        assert (a - b.cpu()).abs().max().item() < 1e-3


# ------------------------------------------------------------------------------------------------
# densification


def _params_and_optimizer(n=6):
    pts = torch.tensor([[i * 0.5, 0.0, 0.0] for i in range(n)])
    p = gaussian_init.params_from_points(pts, sh_degree=0, init_opacity=0.5, init_scale=0.005)
    p["scales"][3:] = math.log(0.2)  # Gaussians 3.. are "large" (> grow_scale3d * scene_scale)
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in p.items()})
    groups = [{"params": [params[k]], "name": f"geometry.{k}", "lr": 0.01} for k in gaussian_params.PARAM_KEYS]
    opt = torch.optim.Adam(groups)
    return params, opt


def test_densification_on_scripted_gradient():
    params, opt = _params_and_optimizer()
    # one Adam step so that the moments exist and must be carried along
    sum(v.sum() for v in params.values()).backward()
    opt.step()
    opt.zero_grad()
    dens = GaussianDensifier({"type": "default", "refine_start_iter": 0, "refine_every": 2, "grow_grad2d": 0.01,
                              "grow_scale3d": 0.01, "reset_every": 10**6, "prune_opa": 0.005})
    views = group_views(opt, {k: f"geometry.{k}" for k in gaussian_params.PARAM_KEYS})
    w, h = 10, 10
    # scripted view-space gradient: Gaussians 0 (small) and 3 (large) have |grad| * W/2 above the threshold
    means2d = torch.zeros(1, 6, 2, requires_grad=True)
    info = {"means2d": means2d, "radii": torch.full((1, 6, 2), 3, dtype=torch.int32), "width": w, "height": h,
            "n_cameras": 1, "gaussian_ids": None}
    dens.pre_backward(params, views, 1, info)
    g = torch.zeros(1, 6, 2)
    g[0, 0, 0] = 0.05  # normalised: 0.05 * 10 / 2 = 0.25 > 0.01
    g[0, 3, 1] = 0.05
    g[0, 1, 0] = 0.001  # 0.005 < 0.01: not grown
    (means2d * g).sum().backward()
    old_means = params["means"].detach().clone()
    old_scales = params["scales"].detach().clone()
    old_exp_avg = opt.state[params["means"]]["exp_avg"].clone()
    counts = dens.post_backward(params, views, 1, info)  # step 1: state updated, no refinement (1 % 2 != 0)
    assert counts == {"before": 6, "after": 6}
    assert torch.allclose(dens.state["grad2d"], torch.tensor([0.25, 0.005, 0, 0.25, 0, 0]))
    dens.pre_backward(params, views, 2, info)
    means2d.grad = None
    (means2d * 0).sum().backward()
    counts = dens.post_backward(params, views, 2, info)  # step 2: mean grad = 0.125 for 0 and 3
    # Gaussian 0 duplicated (+1), Gaussian 3 split into two (-1 +2): 6 -> 8
    assert counts == {"before": 6, "after": 8}
    new_means = params["means"].detach()
    assert new_means.shape == (8, 3)
    # the optimizer group now holds the new tensor and its moments were carried / zero-extended
    assert opt.param_groups[0]["params"][0] is params["means"]
    st = opt.state[params["means"]]["exp_avg"]
    assert st.shape == (8, 3)
    # gsplat order: duplicate appends a copy of 0; split removes parent 3 and appends its two children
    # -> [0, 1, 2, 4, 5, copy of 0, child of 3, child of 3]
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(new_means[:5], old_means[keep])
    assert torch.equal(new_means[5], old_means[0])
    assert torch.allclose(params["scales"][6:].exp(), (old_scales[3].exp() / 1.6).expand(2, 3))
    assert not any(torch.equal(new_means[k], old_means[3]) for k in range(8))  # split parent removed
    assert torch.equal(st[:5], old_exp_avg[keep]) and not st[5:].any()
    # statistics reset after refinement
    assert not dens.state["grad2d"].any() and dens.state["grad2d"].shape == (8,)


def test_pruning_and_opacity_reset():
    params, opt = _params_and_optimizer()
    with torch.no_grad():
        params["opacities"][1] = gaussian_params.inverse_sigmoid(torch.tensor(0.001))
    dens = GaussianDensifier({"refine_start_iter": 0, "refine_every": 5, "reset_every": 10, "prune_opa": 0.005, "grow_grad2d": 1.0})
    views = group_views(opt, {k: f"geometry.{k}" for k in gaussian_params.PARAM_KEYS})
    means2d = torch.zeros(1, 6, 2, requires_grad=True)
    info = {"means2d": means2d, "radii": torch.full((1, 6, 2), 3, dtype=torch.int32), "width": 8, "height": 8, "n_cameras": 1, "gaussian_ids": None}
    dens.pre_backward(params, views, 5, info)
    (means2d * 0).sum().backward()
    assert dens.post_backward(params, views, 5, info) == {"before": 6, "after": 5}  # transparent one pruned
    # opacity reset at step 10: opacities clamped to 2 * prune_opa (gsplat 1.5.3's own check never fires)
    means2d = torch.zeros(1, 5, 2, requires_grad=True)
    info = dict(info, means2d=means2d, radii=torch.full((1, 5, 2), 3, dtype=torch.int32))
    dens.pre_backward(params, views, 10, info)
    (means2d * 0).sum().backward()
    dens.post_backward(params, views, 10, info)
    assert torch.allclose(torch.sigmoid(params["opacities"]), torch.full((5,), 0.01), atol=1e-6)
    no_reset = GaussianDensifier({"opacity_reset": False, "reset_every": 10, "refine_start_iter": 10**6})
    p2, o2 = _params_and_optimizer()
    before = p2["opacities"].detach().clone()
    info = dict(info, means2d=torch.zeros(1, 6, 2, requires_grad=True), radii=torch.full((1, 6, 2), 3, dtype=torch.int32))
    (info["means2d"] * 0).sum().backward()
    no_reset.post_backward(p2, group_views(o2, {k: f"geometry.{k}" for k in gaussian_params.PARAM_KEYS}), 10, info)
    assert torch.equal(p2["opacities"].detach(), before)


def test_densifier_config_errors_and_group_view():
    with pytest.raises(ValueError, match="strategy.type must be one of"):
        GaussianDensifier({"type": "adc"})
    with pytest.raises(ValueError, match="not fields of gsplat DefaultStrategy"):
        GaussianDensifier({"grow_grad": 0.1})
    with pytest.raises(ValueError, match="needs CUDA"):
        GaussianDensifier({"type": "mcmc"}).check_device(torch.device("cpu"))
    params, opt = _params_and_optimizer()
    with pytest.raises(ValueError, match="no parameter group named"):
        group_views(opt, {"means": "geometry.xyz"})
    v = GroupView(opt, opt.param_groups[0])
    assert v.state is opt.state and len(v.param_groups) == 1


def test_position_lr_schedule():
    assert scheduled_lr(0, 1e-3, 1e-5, 100) == pytest.approx(1e-3)
    assert scheduled_lr(100, 1e-3, 1e-5, 100) == pytest.approx(1e-5)
    assert scheduled_lr(50, 1e-3, 1e-5, 100) == pytest.approx(1e-4)  # log-linear midpoint
    assert scheduled_lr(50, 1e-3, 1e-5, 100, mode="linear") == pytest.approx(0.000505)
    assert scheduled_lr(500, 1e-3, None, 100) == 1e-3
    assert scheduled_lr(0, 1e-3, 1e-5, 100, delay_steps=10, delay_mult=0.01) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="'exp' or 'linear'"):
        scheduled_lr(0, 1e-3, 1e-5, 100, mode="cosine")
