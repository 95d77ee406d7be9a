"""Memory / speed options of the guidance base (scoredistill.guidance.memory) on the tiny SD.

Tolerance of the exact options (derived, not tuned): an exact option reorders floating-point work but computes
the same function, so its change of the guidance gradient must be of the order of the fp32 rounding error of
the default path itself.  That error is measured in the same test: the default fp32 gradient against the same
guidance evaluated in float64 (``e_ref = max |g32 - g64|``).  An exact option passes when
``max |g_opt - g32| <= 8 * e_ref`` (a difference of two fp32 evaluations, each off by ~``e_ref`` from the true
value, reordered rounding grows like sqrt(#reorderings): a factor 8 is ample) -- orders of magnitude below the
change a wrong function produces (token merging: ~1e-2 relative, measured below).
"""
import copy

import pytest
import torch

from harness import make_prompt_utils, one_thread_fixture, tiny_guidance_config

pytestmark = pytest.mark.threestudio
_one_thread = one_thread_fixture()

B = 2
ELEV, AZIM, DIST = torch.tensor([10.0, 70.0]), torch.tensor([0.0, 180.0]), torch.tensor([2.0, 2.0])


@pytest.fixture(scope="module")
def prompt_utils(tiny_sd, threestudio_module, tmp_path_factory):
    return make_prompt_utils(threestudio_module, tiny_sd, tmp_path_factory.mktemp("ts_cwd"))


def _subclass():
    from scoredistill.maths.diffusion import add_noise, sds_weight
    from scoredistill.guidance.base import ScoreDistillationGuidance

    class FixedSDS(ScoreDistillationGuidance):
        """SDS with fixed t and noise (seeded), so two guidances can be compared exactly."""

        def compute_grad(self, latents, prompt_utils, elevation, azimuth, camera_distances, **kwargs):
            g = torch.Generator().manual_seed(1)
            t = torch.tensor([300, 700], device=latents.device)[: latents.shape[0]]
            noise = torch.randn(latents.shape, generator=g).to(latents)
            with torch.no_grad():
                x_t = add_noise(latents, noise, self.alphas_cumprod.to(latents.dtype), t)
                pred = self.predict_noise_cfg(x_t, t, prompt_utils, elevation, azimuth, camera_distances)["noise_pred"]
            grad = sds_weight(self.alphas_cumprod, t, "sds", like=latents) * (pred - noise)
            return {"grad": grad}

        def encode_images(self, imgs):
            # the base's VAE encode with the posterior noise drawn in fp32 from a fixed generator (diffusers draws
            # it in the weights' dtype, which would differ between the fp32 and float64 evaluations)
            posterior = self.vae.encode((imgs * 2.0 - 1.0).to(self.weights_dtype)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(2)).to(posterior.mean)
            return ((posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor).to(imgs.dtype)

    return FixedSDS


def _grads(guidance, prompt_utils, dtype=torch.float32):
    """(latent gradient, render gradient) of one guidance call on a fixed render."""
    rgb = torch.rand(B, 24, 24, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    rgb.requires_grad_(True)
    pu = prompt_utils
    if dtype == torch.float64:
        pu = copy.copy(prompt_utils)
        pu.text_embeddings_vd = prompt_utils.text_embeddings_vd.double()
        pu.uncond_text_embeddings_vd = prompt_utils.uncond_text_embeddings_vd.double()
        pu.text_embeddings = prompt_utils.text_embeddings.double()
        pu.uncond_text_embeddings = prompt_utils.uncond_text_embeddings.double()
    latents_holder = {}
    orig = guidance.get_latents

    def get_latents(*a, **k):
        lat = orig(*a, **k)
        lat.retain_grad()
        latents_holder["x"] = lat
        return lat

    guidance.get_latents = get_latents
    out = guidance(rgb, pu, ELEV, AZIM, DIST)
    out["loss_sds"].backward()
    guidance.get_latents = orig
    return latents_holder["x"].grad.double() * B, rgb.grad.double()


@pytest.fixture(scope="module")
def reference(tiny_sd, prompt_utils):
    cls = _subclass()
    g32 = cls(tiny_guidance_config(tiny_sd))
    lat32, rgb32 = _grads(g32, prompt_utils)
    g64 = cls(tiny_guidance_config(tiny_sd))
    g64.unet.double()
    g64.vae.double()
    g64.weights_dtype = torch.float64
    lat64, rgb64 = _grads(g64, prompt_utils, torch.float64)
    e_lat = (lat32 - lat64).abs().max().item()
    e_rgb = (rgb32 - rgb64).abs().max().item()
    assert 0 < e_lat < 1e-3 * lat64.abs().max().item()
    return {"lat": lat32, "rgb": rgb32, "e_lat": e_lat, "e_rgb": e_rgb}


EXACT = {
    "sdpa": dict(enable_memory_efficient_attention=True, memory_efficient_attention_backend="sdpa"),
    "auto attention": dict(enable_memory_efficient_attention=True),
    "slicing 1": dict(enable_attention_slicing=True),
    "slicing auto": dict(enable_attention_slicing=True, attention_slice_size="auto"),
    "channels-last": dict(enable_channels_last_format=True),
    "compile (aot_eager)": dict(compile_unet=True, compile_unet_params={"backend": "aot_eager"}),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_option_leaves_gradient_unchanged(name, tiny_sd, prompt_utils, reference):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    opts = EXACT[name]
    guidance = _subclass()(tiny_guidance_config(tiny_sd, **opts))
    procs = set(type(p) for p in guidance.unet.attn_processors.values())
    if opts.get("enable_memory_efficient_attention"):
        assert procs == {AttnProcessor2_0}
    if opts.get("enable_attention_slicing"):
        assert procs == {SlicedAttnProcessor}
    if opts.get("enable_channels_last_format"):
        w = guidance.unet.conv_in.weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    if opts.get("compile_unet"):
        assert guidance.unet._compiled_call_impl is not None
    lat, rgb = _grads(guidance, prompt_utils)
    d_lat = (lat - reference["lat"]).abs().max().item()
    d_rgb = (rgb - reference["rgb"]).abs().max().item()
    print(f"{name}: latent-gradient change {d_lat:.2e} (fp32 error e_ref {reference['e_lat']:.2e}), "
          f"render-gradient change {d_rgb:.2e} (e_ref {reference['e_rgb']:.2e})")
    assert d_lat <= 8 * reference["e_lat"], (d_lat, reference["e_lat"])
    assert d_rgb <= 8 * reference["e_rgb"], (d_rgb, reference["e_rgb"])


def test_classic_attention_vs_sdpa_within_tolerance(tiny_sd, prompt_utils, reference):
    """The non-SDPA (explicit softmax) attention is the same function too: a check that the tolerance is not
    trivially met because every option above fell back to the default processor."""
    from diffusers.models.attention_processor import AttnProcessor

    guidance = _subclass()(tiny_guidance_config(tiny_sd))
    guidance.unet.set_attn_processor(AttnProcessor())
    lat, _ = _grads(guidance, prompt_utils)
    assert (lat - reference["lat"]).abs().max().item() <= 8 * reference["e_lat"]


def test_token_merging_runs_and_its_error(tiny_sd, prompt_utils, reference):
    """Token merging (tomesd) is approximate: it runs, its gradient is finite and its relative error on the tiny
    model is printed (README "Memory and speed options"); it must differ from the exact gradient (else the patch
    did nothing) and stay well below the gradient's own size."""
    guidance = _subclass()(tiny_guidance_config(tiny_sd, token_merging=True, token_merging_params={"ratio": 0.5, "use_rand": False}))
    assert any(type(m).__name__ == "ToMeBlock" for m in guidance.unet.modules())
    lat, rgb = _grads(guidance, prompt_utils)
    assert torch.isfinite(lat).all() and torch.isfinite(rgb).all()
    rel = ((lat - reference["lat"]).norm() / reference["lat"].norm()).item()
    print(f"token merging ratio 0.5: relative L2 error of the latent gradient {rel:.3e}")
    assert rel > 100 * reference["e_lat"] / reference["lat"].abs().max().item()
    assert rel < 0.5


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(enable_sequential_cpu_offload=True), r"system\.guidance\.enable_sequential_cpu_offload needs a CUDA device"),
        (dict(enable_memory_efficient_attention=True, memory_efficient_attention_backend="xformers"),
         r"memory_efficient_attention_backend=xformers needs a CUDA device"),
        (dict(memory_efficient_attention_backend="flash"), r"memory_efficient_attention_backend must be one of"),
        (dict(enable_attention_slicing=True, enable_memory_efficient_attention=True), r"enable only one"),
        (dict(attention_slice_size=0), r"attention_slice_size must be an integer >= 1"),
        (dict(token_merging=True, token_merging_params={"ratio": 1.5}), r"token_merging_params\.ratio must be in \[0, 1\)"),
        (dict(token_merging=True, token_merging_params={"rate": 0.5}), r"token_merging_params: unknown keys \['rate'\]"),
        (dict(compile_unet=True, compile_unet_params={"mod": "max-autotune"}), r"compile_unet_params: unknown keys"),
    ],
)
def test_bad_memory_options_raise_before_loading(threestudio_module, kw, match, monkeypatch):
    import diffusers

    def boom(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", boom)
    with pytest.raises(ValueError, match=match):
        _subclass()(dict(pretrained_model_name_or_path="/nonexistent", half_precision_weights=False, **kw))


def test_cuda_only_checks_without_cuda(monkeypatch):
    """The checks that depend on the device, with a CUDA device named (no GPU needed: nothing loads)."""
    from types import SimpleNamespace

    from scoredistill.guidance import memory

    cfg = SimpleNamespace(enable_memory_efficient_attention=True, memory_efficient_attention_backend="xformers",
                          enable_attention_slicing=False, attention_slice_size=1, enable_sequential_cpu_offload=False,
                          token_merging=False, token_merging_params={}, compile_unet=False, compile_unet_params={})
    monkeypatch.setattr(memory, "_xformers_available", lambda: False)
    with pytest.raises(ValueError, match="xformers is not installed"):
        memory.validate_memory_options(cfg, "cuda")
    monkeypatch.setattr(memory, "_xformers_available", lambda: True)
    memory.validate_memory_options(cfg, "cuda")  # accepted
    cfg.enable_sequential_cpu_offload, cfg.compile_unet = True, True
    with pytest.raises(ValueError, match="cannot be combined"):
        memory.validate_memory_options(cfg, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("opts", [dict(enable_sequential_cpu_offload=True),
                                  dict(enable_memory_efficient_attention=True),  # xformers when installed
                                  dict(enable_channels_last_format=True)])
def test_cuda_options_same_unet_output(tiny_sd, opts):
    """On CUDA: offload / memory-efficient attention / channels-last give the default UNet's output (fp32), with
    TF32 off (cuDNN's default TF32 moves channels-last's output by ~1.6e-3 of the max on an H200: the labelled
    change of scoredistill.guidance.memory's table; TF32 is a process setting the pack leaves alone)."""
    from scoredistill.guidance import memory

    fields = dict(enable_memory_efficient_attention=False, memory_efficient_attention_backend="auto",
                  enable_attention_slicing=False, attention_slice_size=1, enable_sequential_cpu_offload=False,
                  enable_channels_last_format=False, token_merging=False, token_merging_params={},
                  compile_unet=False, compile_unet_params={})
    outs = []
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _unet_outputs(memory, fields, opts, tiny_sd, outs)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (outs[1] - outs[0]).abs().max().item() <= 1e-4 * outs[0].abs().max().item()


def _unet_outputs(memory, fields, opts, tiny_sd, outs):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel

    for o in ({}, opts):
        cfg = SimpleNamespace(**{**fields, **o})
        memory.validate_memory_options(cfg, "cuda")
        unet, _ = memory.load_models(cfg, UNet2DConditionModel, AutoencoderKL, tiny_sd, "cuda", torch.float32)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 16, 16, generator=g).cuda()
        e = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).cuda()
        with torch.no_grad():
            outs.append(unet(x, torch.tensor([300, 700], device="cuda"), encoder_hidden_states=e).sample.double().cpu())


@pytest.mark.parametrize("name, kw", [
    ("ge3d-guidance", dict(trainer_max_steps=100)),
    ("lods-guidance", dict(variant="lora")),
    ("vdm-guidance", {}),
    ("uds-guidance", {}),
    ("hifa-guidance", {}),
])
def test_every_pack_guidance_runs_with_the_options(name, kw, tiny_sd, threestudio_module, prompt_utils):
    """The options are applied in the shared loading code, before the subclasses add their own parts (LODS's
    LoRA adapters, VDM's operator): one step of each guidance with the CPU options at once (compile: tested above) gives a finite loss
    and a finite gradient on the render."""
    opts = dict(enable_attention_slicing=True, enable_channels_last_format=True, token_merging=True,
                token_merging_params={"ratio": 0.5, "use_rand": False})
    g = threestudio_module.find(name)(tiny_guidance_config(tiny_sd, image_size=32, **kw, **opts))
    assert any(type(m).__name__ == "ToMeBlock" for m in g.unet.modules())
    rgb = torch.rand(1, 32, 32, 3, requires_grad=True)
    out = g(rgb, prompt_utils, ELEV[:1], AZIM[:1], DIST[:1])
    loss = sum(v for k, v in out.items() if k.startswith("loss_") and torch.is_tensor(v) and v.requires_grad)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
