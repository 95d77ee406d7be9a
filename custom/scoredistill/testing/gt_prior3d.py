"""A ground-truth "Stable Diffusion" for 3D: its data are the renders of known 3D scenes, its noise prediction is exact.

Data distribution.  ``M`` renders of ``P`` ground-truth scenes from training cameras, encoded by the linear VAE
below, are the means ``mu_k`` (``k = 1..M``, flattened latents of ``D = 4 h w`` entries) of a smoothed empirical
distribution: each *prompt key* ``q`` (a scene's prompt, optionally with threestudio's view-dependent suffix, or
the empty / negative prompt) owns a set ``S_q`` of components with equal weights and one std ``s``,

    p_q(x_0) = 1/|S_q| sum_{k in S_q} N(x_0; mu_k, s^2 I),

``S_{"<scene>, front view"}`` = that scene's renders whose camera is in threestudio's *front* range (and so on for
side / back / overhead), ``S_{"<scene>"}`` = all of that scene's renders, ``S_{""}`` = every render of every scene
(the marginal the unconditional branch of CFG needs).  Under DDPM's forward process
``x_t = a x_0 + sigma eps`` (``a = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``, Ho et al. 2020) the exact
MMSE noise (Tweedie; the same closed form as :mod:`scoredistill.testing.exact_score_prior`) is, with
``v = a^2 s^2 + sigma^2`` shared by all components,

    eps_q(x_t, t) = sigma / v * (x_t - a sum_{k in S_q} r_k mu_k),   r_k = softmax_{k in S_q}(-|x_t - a mu_k|^2 / 2v).

Conditioning (exact, hard, no leakage).  ``encoder_hidden_states`` ``(B, 77, E)`` is the CLIP text encoder's
output for the prompt, computed by threestudio's prompt processor from the folder's own tokenizer and text
encoder.  The prior stores the key embeddings ``K`` ``(Q, 77 E)`` of every prompt it knows and their dual basis
``W`` (``W K^T = I``, least squares); the selection weights of an embedding ``e`` are ``c = W e``.  ``c`` is one-hot
for every key (snapped to exactly one-hot within ``1e-3``, gradient kept), and the output is the linear
combination ``sum_q c_q eps_q`` -- for a key exactly ``eps_q``, with zero weight on every other set.  A learned
embedding (LODS) stays differentiable (straight-through at a key; every key's ``eps`` enters the gradient); the
prior sees its projection onto the span of the keys.  An embedding far from that span (relative distance >
``SPAN_TOL``: a prompt the prior was not built for) raises ``ValueError`` naming the prompts it knows.

Latent space.  :class:`GroundTruthVAE` is linear: average pooling by ``f = 2^(len(block_out_channels) - 1)``
(16 by default, so threestudio's ``stable-diffusion-guidance``, which always resizes renders to 512², gets 32²
latents) followed by a ``4 x 3`` matrix with orthonormal columns; decoding applies its transpose and bilinear
upsampling.  On renders of ``512 / f`` pixels it is near-invertible (:func:`vae_reconstruction_psnr`).

Both classes are diffusers ``ModelMixin`` / ``ConfigMixin`` models written with ``save_pretrained``; the folder of
:func:`build_gt_prior` is a Stable Diffusion pipeline folder whose ``model_index.json`` names them, so
``StableDiffusionPipeline.from_pretrained`` (threestudio's guidance) and the pack's guidances (which read the
component classes from ``model_index.json``, :func:`scoredistill.guidance.memory.pipeline_component_class`) load
it with their normal code.  Used by the ground-truth 3D benchmark (:mod:`scoredistill.bench.gt3d_bench`).
"""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .exact_score_prior import sd_alphas_cumprod

#: threestudio's view-dependent prompt suffixes (``PromptProcessor.configure``), in its override order
VIEW_DIRECTIONS = ("side", "front", "back", "overhead")
#: snap tolerance of the selection weights (max abs deviation from one-hot)
SNAP_TOL = 1e-3
#: largest relative distance of an embedding to the span of the prior's keys.  A prompt the prior was not built
#: for lies ~0.3 away (tiny CLIP); a learned embedding (LODS, updated per coordinate by AdamW) drifts slightly
#: out of the span (1e-3 after ~100 steps at lr 1e-4), and the prior sees its projection onto the span
SPAN_TOL = 0.1
#: environment variable naming the file the UNet's call / sample counts are written to at exit
COUNT_ENV = "SCOREDISTILL_GT_UNET_COUNT_FILE"


def view_direction(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, front_threshold: float = 45.0,
                   back_threshold: float = 45.0, overhead_threshold: float = 60.0) -> List[str]:
    """threestudio's view direction of each camera (``PromptProcessor``'s ``DirectionConfig`` conditions, applied
    in its order side, front, back, overhead, later ones overriding).  Azimuth in degrees, any range (wrapped to
    ``[-180, 180)``).  Returns a list of ``"side" | "front" | "back" | "overhead"``."""
    azi = (torch.as_tensor(azimuth_deg, dtype=torch.float64) + 180.0) % 360.0 - 180.0
    ele = torch.as_tensor(elevation_deg, dtype=torch.float64)
    out = []
    for e, a in zip(ele.tolist(), azi.tolist()):
        d = "side"
        if -front_threshold < a < front_threshold:
            d = "front"
        if a > 180.0 - back_threshold or a < -180.0 + back_threshold:
            d = "back"
        if e > overhead_threshold:
            d = "overhead"
        out.append(d)
    return out


def view_prompt(prompt: str, direction: str) -> str:
    """threestudio's view-dependent prompt: ``"<prompt>, <direction> view"``."""
    return f"{prompt}, {direction} view"


@dataclass
class _LatentDist:
    """Deterministic posterior (diffusers' ``DiagonalGaussianDistribution`` interface with zero variance)."""

    mean: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    @property
    def var(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclass
class _Out:
    sample: torch.Tensor = None
    latent_dist: _LatentDist = None


class GroundTruthVAE(ModelMixin, ConfigMixin):
    """Linear "VAE": ``z = P^T avgpool_f(x)`` per pixel, ``x = upsample_f(P z)``; ``P`` ``(3, 4)`` rows orthonormal.

    ``encode(x)`` takes ``(B, 3, H, W)`` in ``[-1, 1]`` (diffusers' convention) with ``H, W`` multiples of ``f`` and
    returns ``.latent_dist`` (deterministic: ``sample() == mode() == mean``, ``(B, 4, H/f, W/f)``);
    ``decode(z)`` returns ``.sample`` ``(B, 3, f h, f w)``.  Differentiable (renders get gradients through it).
    """

    @register_to_config
    def __init__(self, latent_channels: int = 4, block_out_channels: Sequence[int] = (8, 8, 8, 8, 8),
                 scaling_factor: float = 1.0, in_channels: int = 3, out_channels: int = 3, seed: int = 0):
        super().__init__()
        if latent_channels < in_channels:
            raise ValueError(f"latent_channels must be >= in_channels = {in_channels}, got {latent_channels}")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(latent_channels, in_channels, generator=g, dtype=torch.float64))
        self.register_buffer("proj", q.float().contiguous())  # (4, 3), orthonormal columns

    @property
    def factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        f = self.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"GroundTruthVAE.encode: image size {tuple(x.shape[-2:])} must be a multiple of {f}")
        pooled = F.avg_pool2d(x, f) if f > 1 else x
        z = torch.einsum("lc,bchw->blhw", self.proj.to(x.dtype), pooled)
        dist = _LatentDist(z)
        return _Out(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs):
        x = torch.einsum("lc,blhw->bchw", self.proj.to(z.dtype), z)
        if self.factor > 1:
            x = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return _Out(sample=x) if return_dict else (x,)

    # diffusers pipelines call these; a linear map has nothing to slice or tile
    def enable_slicing(self):
        pass

    def enable_tiling(self):
        pass

    def set_attn_processor(self, processor):
        """No attention layers: a no-op (the memory options stay valid)."""


class GroundTruthUNet(ModelMixin, ConfigMixin):
    """The exact noise prediction of the module docstring, with diffusers' ``UNet2DConditionModel`` call signature:
    ``unet(sample (B, 4, h, w), timestep (scalar or (B,)), encoder_hidden_states (B, 77, E)).sample``.

    Buffers (written by :func:`build_gt_prior`): ``means`` ``(M, 4 h w)``, ``key_sets`` ``(Q, M)`` (0/1 membership),
    ``prompt_keys`` ``(Q, 77 E)``, ``prompt_key_dual`` ``(Q, 77 E)``, ``alphas_cumprod`` ``(T,)``.  Config: ``prompts`` (the Q key
    strings, for messages), ``component_std`` ``s``.

    Raises ``ValueError`` for a latent of the wrong shape or an embedding the prior does not know.
    """

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: int = 4, sample_size: int = 32, cross_attention_dim: int = 32,
                 seq_len: int = 77, num_components: int = 1, prompts: Sequence[str] = ("",),
                 component_std: float = 0.05, num_train_timesteps: int = 1000):
        super().__init__()
        if component_std <= 0:
            raise ValueError(f"component_std must be > 0, got {component_std}")
        D, Q, L = in_channels * sample_size * sample_size, len(prompts), seq_len * cross_attention_dim
        self.register_buffer("means", torch.zeros(num_components, D))
        self.register_buffer("key_sets", torch.zeros(Q, num_components))
        self.register_buffer("prompt_keys", torch.zeros(Q, L))
        self.register_buffer("prompt_key_dual", torch.zeros(Q, L))
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod(num_train_timesteps).float())
        #: forward calls / samples evaluated (cost accounting); written at exit to ``$SCOREDISTILL_GT_UNET_COUNT_FILE``
        self.num_calls = 0
        self.num_samples = 0
        if os.environ.get(COUNT_ENV):
            atexit.register(self._write_counts, os.environ[COUNT_ENV])

    def _write_counts(self, path: str) -> None:
        from scoredistill.atomic_io import atomic_write_text

        atomic_write_text(path, json.dumps({"unet_calls": self.num_calls, "unet_samples": self.num_samples}))

    # ------------------------------------------------------------------ conditioning
    def selection(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Selection weights ``c`` ``(B, Q)`` of the prompt keys (module docstring): exactly one-hot for every key."""
        B = encoder_hidden_states.shape[0]
        e = encoder_hidden_states.reshape(B, -1).double()
        if e.shape[1] != self.prompt_keys.shape[1]:
            raise ValueError(f"encoder_hidden_states must have shape (B, {self.config.seq_len}, "
                             f"{self.config.cross_attention_dim}), got {tuple(encoder_hidden_states.shape)}")
        c = e @ self.prompt_key_dual.double().T
        resid = (e - c @ self.prompt_keys.double()).norm(dim=1) / e.norm(dim=1).clamp_min(1e-30)
        if bool((resid > SPAN_TOL).any()):
            raise ValueError(
                f"encoder_hidden_states is not a prompt this ground-truth prior was built for (relative distance "
                f"{resid.max().item():.3g} to the span of its prompt embeddings > {SPAN_TOL}); it knows "
                f"{list(self.config.prompts)}")
        idx = c.argmax(dim=1)
        onehot = F.one_hot(idx, c.shape[1]).double()
        snap = (c - onehot).abs().amax(dim=1, keepdim=True) < SNAP_TOL
        target = torch.where(snap, onehot, c)
        return c + (target - c).detach()

    # ------------------------------------------------------------------ the exact noise prediction
    def _abar(self, timestep, B: int) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=self.alphas_cumprod.device)
        t = t.round().long().clamp(0, self.alphas_cumprod.shape[0] - 1)
        if t.dim() == 0:
            t = t.expand(B)
        return self.alphas_cumprod.double()[t]

    def _key_means(self, q: int):
        """float64 means of key ``q``'s components and their squared norms, cached per (buffer version, device)."""
        tag = (q, self.means.data_ptr(), self.means._version, self.key_sets._version, str(self.means.device))
        cache = self.__dict__.setdefault("_means_cache", {})
        if tag not in cache:
            mu = self.means.double()[self.key_sets[q] > 0.5]
            cache[tag] = (mu, (mu**2).sum(-1))
        return cache[tag]

    def eps_for_key(self, x: torch.Tensor, abar: torch.Tensor, q: int) -> torch.Tensor:
        """``eps_q`` ``(n, D)`` float64 for flattened latents ``x`` ``(n, D)`` and ``abar`` ``(n,)``."""
        mu, mu_sq = self._key_means(q)  # (m, D), (m,)
        a, sig2 = abar.sqrt(), 1.0 - abar
        v = a**2 * self.config.component_std**2 + sig2  # (n,)
        d2 = (x**2).sum(-1, keepdim=True) - 2 * a[:, None] * (x @ mu.T) + a[:, None] ** 2 * mu_sq[None]
        r = torch.softmax(-0.5 * d2 / v[:, None], dim=-1)
        return (sig2.sqrt() / v)[:, None] * (x - a[:, None] * (r @ mu))

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs):
        B = sample.shape[0]
        c, s = self.config.in_channels, self.config.sample_size
        if tuple(sample.shape[1:]) != (c, s, s):
            raise ValueError(f"GroundTruthUNet: sample must have shape (B, {c}, {s}, {s}), got {tuple(sample.shape)}"
                             f" (the guidance's image_size / the VAE factor must give {s}x{s} latents)")
        sel = self.selection(encoder_hidden_states)  # (B, Q); raises for an unknown prompt
        self.num_calls += 1
        self.num_samples += B
        abar = self._abar(timestep, B)
        x = sample.reshape(B, -1).double()
        parts = []
        # with a learnable embedding every key's eps enters the gradient d/de sum_q c_q eps_q (the straight-through
        # value keeps the snapped one-hot); otherwise only the keys with non-zero weight are evaluated
        full = sel.requires_grad and torch.is_grad_enabled()
        active = range(sel.shape[1]) if full else torch.nonzero(sel.detach().abs().amax(0) > 0).flatten().tolist()
        for q in active:
            rows = torch.arange(B) if full else torch.nonzero(sel[:, q].detach() != 0).flatten()
            eps_q = torch.zeros_like(x)
            eps_q[rows] = self.eps_for_key(x[rows], abar[rows], q)
            parts.append(sel[:, q, None] * eps_q)
        out = torch.stack(parts).sum(0).reshape(sample.shape).to(sample.dtype)
        return _Out(sample=out) if return_dict else (out,)

    def posterior_mean_x0(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """``E[x_0 | x_t]`` by Tweedie, ``(x_t - sigma eps) / a``."""
        abar = self._abar(timestep, sample.shape[0]).view(-1, 1, 1, 1)
        eps = self.forward(sample, timestep, encoder_hidden_states).sample.double()
        return ((sample.double() - (1 - abar).sqrt() * eps) / abar.sqrt()).to(sample.dtype)

    # diffusers / threestudio call these on a UNet; there is no attention to change
    def set_attn_processor(self, processor):
        """No attention layers: a no-op."""

    def set_attention_slice(self, slice_size):
        """No attention layers: a no-op."""

    def add_adapter(self, *args, **kwargs):
        """LoRA (diffusers' / peft's ``add_adapter``, e.g. LODS in LoRA mode) attaches to attention layers; the exact
        prior has none, so a LoRA method cannot run on it: refused with the reason rather than an AttributeError."""
        raise NotImplementedError("GroundTruthUNet.add_adapter: the ground-truth prior has no attention layers, so "
                                  "a LoRA (e.g. lods-guidance mode 'lora') cannot attach to it; run LoRA methods on a "
                                  "real Stable Diffusion UNet")


# ---------------------------------------------------------------------------------------------- the folder
def _text_embeddings(folder: str, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP embeddings ``(n, 77, E)`` exactly as threestudio's ``stable-diffusion-prompt-processor`` computes them."""
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids)[0].float()


def build_gt_prior(
    folder: str,
    scene_prompts: Sequence[str],
    latents: torch.Tensor,
    component_scene: Sequence[int],
    elevation_deg: Sequence[float],
    azimuth_deg: Sequence[float],
    component_std: float = 0.05,
    extra_unconditional_prompts: Sequence[str] = (),
    text_model_folder: Optional[str] = None,
    vae: Optional[GroundTruthVAE] = None,
) -> str:
    """Write the ground-truth prior's Stable Diffusion folder (``model_index.json``, ``unet/``, ``vae/``,
    ``scheduler/``, ``tokenizer/``, ``text_encoder/``) and return its path.

    Args:
        scene_prompts: one prompt per scene (``P``).
        latents: ``(M, 4, h, w)`` VAE latents of the ground-truth renders (:func:`encode_renders`).
        component_scene: ``(M,)`` scene index of each render; elevation_deg / azimuth_deg: its camera (degrees).
        component_std: ``s`` of every component (latent units).
        extra_unconditional_prompts: more prompts (e.g. a config's negative prompt) that select the marginal.
        text_model_folder: a folder with ``tokenizer/`` and ``text_encoder/`` (default: a tiny random CLIP built here).
        vae: the VAE the latents came from (default ``GroundTruthVAE()``).

    Raises:
        ValueError: inconsistent lengths, an empty key, or prompt embeddings that are not linearly independent.
    """
    from .tiny_models import SD_SCHEDULER_CONFIG, build_tiny_stable_diffusion

    M = latents.shape[0]
    if not (len(component_scene) == len(elevation_deg) == len(azimuth_deg) == M):
        raise ValueError(f"component_scene, elevation_deg, azimuth_deg must have {M} entries (one per latent)")
    if any(not 0 <= int(p) < len(scene_prompts) for p in component_scene):
        raise ValueError(f"component_scene entries must be in 0..{len(scene_prompts) - 1}")
    vae = vae or GroundTruthVAE()
    os.makedirs(folder, exist_ok=True)
    if text_model_folder is None:
        text_model_folder = build_tiny_stable_diffusion(os.path.join(folder, ".tiny-sd"))
    for sub in ("tokenizer", "text_encoder"):
        dst = os.path.join(folder, sub)
        if os.path.abspath(dst) != os.path.abspath(os.path.join(text_model_folder, sub)):
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(os.path.join(text_model_folder, sub), dst)
    from diffusers import DDIMScheduler

    DDIMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(os.path.join(folder, "scheduler"))

    dirs = view_direction(torch.tensor(list(elevation_deg)), torch.tensor(list(azimuth_deg)))
    scene_of = [int(p) for p in component_scene]
    keys: List[str] = []
    sets: List[torch.Tensor] = []
    for p, prompt in enumerate(scene_prompts):
        keys.append(prompt)
        sets.append(torch.tensor([s == p for s in scene_of]))
        for d in VIEW_DIRECTIONS:
            member = torch.tensor([s == p and dd == d for s, dd in zip(scene_of, dirs)])
            if member.any():
                keys.append(view_prompt(prompt, d))
                sets.append(member)
    for u in ("",) + tuple(p for p in extra_unconditional_prompts if p):
        keys.append(u)
        sets.append(torch.ones(M, dtype=torch.bool))
    if len(set(keys)) != len(keys):
        raise ValueError(f"prompt keys must be distinct, got {keys}")
    emb = _text_embeddings(folder, keys)  # (Q, 77, E)
    K = emb.reshape(len(keys), -1).double()
    dual = torch.linalg.pinv(K).T  # (Q, L): dual @ K^T = I
    err = (dual @ K.T - torch.eye(len(keys), dtype=torch.float64)).abs().max().item()
    if err > 1e-6:
        raise ValueError(f"the prompt embeddings are not linearly independent enough (dual-basis error {err:.2g})")
    _, c, h, w = latents.shape
    unet = GroundTruthUNet(
        in_channels=c, out_channels=c, sample_size=h, cross_attention_dim=emb.shape[2], seq_len=emb.shape[1],
        num_components=M, prompts=list(keys), component_std=float(component_std))
    unet.means.copy_(latents.reshape(M, -1).float())
    unet.key_sets.copy_(torch.stack(sets).float())
    unet.prompt_keys.copy_(K.float())
    unet.prompt_key_dual.copy_(dual.float())
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["scoredistill.testing.gt_prior3d", "GroundTruthUNet"],
        "vae": ["scoredistill.testing.gt_prior3d", "GroundTruthVAE"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
    return folder


def encode_renders(vae: GroundTruthVAE, rgb: torch.Tensor, image_size: int = 512) -> torch.Tensor:
    """Latents ``(B, 4, image_size/f, image_size/f)`` of renders ``(B, H, W, 3)`` in ``[0, 1]``, through the path the
    guidances take (bilinear resize to ``image_size``, ``2 x - 1``, ``vae.encode``)."""
    x = rgb.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return vae.encode(x * 2.0 - 1.0).latent_dist.sample() * vae.config.scaling_factor


def decode_latents(vae: GroundTruthVAE, latents: torch.Tensor, size: int) -> torch.Tensor:
    """Images ``(B, size, size, 3)`` in ``[0, 1]`` from latents (inverse path of :func:`encode_renders`)."""
    with torch.no_grad():
        x = vae.decode(latents / vae.config.scaling_factor).sample * 0.5 + 0.5
    return F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1).permute(0, 2, 3, 1)


def vae_reconstruction_psnr(vae: GroundTruthVAE, rgb: torch.Tensor, image_size: int = 512) -> float:
    """PSNR (dB, images in [0, 1]) of ``decode(encode(render))`` at the render's resolution, over a batch
    ``(B, H, W, 3)``."""
    rec = decode_latents(vae, encode_renders(vae, rgb, image_size), rgb.shape[1])
    mse = ((rec - rgb.float()) ** 2).mean().clamp_min(1e-12)
    return float(-10.0 * math.log10(mse.item()))
