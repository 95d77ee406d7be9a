"""The pack's guidances behind one small interface, outside threestudio (for the benchmarks and the playground).

A :class:`DistillContext` holds what a guidance needs from its surroundings: a counted UNet
(:class:`~scoredistill.bench.counting.CountingUNet`; a real/tiny ``UNet2DConditionModel`` or the exact-score
prior), the noise schedule ``alphas_cumprod``, the prompt's conditional and unconditional text embeddings and the
length of the optimisation.  :func:`make_method` builds a :class:`Method` from a name; ``method.grad(latents,
step)`` returns the guidance's update on the latents (``(B, C, H, W)``, detached), exactly what the pack's
threestudio adapters turn into ``loss_sds`` with :func:`scoredistill.maths.diffusion.grad_to_loss`.  Methods that
learn something alongside (LODS's embedding or LoRA, VDM's degradation operator) do that inside ``grad``; it is
part of the step's cost.

The maths is never re-implemented here: SDS is :func:`scoredistill.maths.diffusion.sds_grad`; every other method
calls the public functions of its own module in ``scoredistill.guidance`` (imported lazily; a method whose module
is not available raises :class:`MethodUnavailable`, and the benchmarks list it as not run).

Conventions: CFG scales are in :func:`scoredistill.maths.diffusion.cfg_combine`'s convention
``ε(∅) + s·(ε(y) − ε(∅))`` (threestudio's ``guidance_scale`` g corresponds to ``s = g + 1``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .counting import CountingUNet


class MethodUnavailable(RuntimeError):
    """The method's module is not importable (not written yet, or a dependency missing)."""


@dataclass
class DistillContext:
    """Surroundings of a guidance outside threestudio.

    Attributes:
        unet: counted UNet (``unet.eps(x, t, emb)`` is the noise prediction).
        alphas_cumprod: ``(T,)`` schedule on the latents' device (float32 or float64).
        cond, uncond: ``(1, L, E)`` embeddings of the prompt and of the empty/negative prompt.
        total_steps: number of optimisation steps (for schedules such as GE3D's DBC or timestep annealing).
        uses_real_unet: whether ``unet`` is a diffusers UNet (LoRA can be attached) or a stand-in.
    """

    unet: CountingUNet
    alphas_cumprod: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    total_steps: int
    uses_real_unet: bool = True

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def embeddings(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cond, uncond)`` expanded to ``(batch_size, L, E)``."""
        return self.cond.expand(batch_size, -1, -1), self.uncond.expand(batch_size, -1, -1)


class Method:
    """A guidance outside threestudio: ``grad(latents (B,C,H,W), step) -> (B,C,H,W)`` (detached)."""

    name: str = "method"

    def __init__(self, ctx: DistillContext):
        self.ctx = ctx

    def grad(self, latents: torch.Tensor, step: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# ----------------------------------------------------------------------------- SDS (baseline)
class SDS(Method):
    """threestudio-style SDS (DreamFusion): ``w(t)·(ε̃(x_t, t, y) − ε)``, ``t ~ U[min_step, max_step]`` per view,
    ``w(t) = 1 − ᾱ_t``, CFG ``s`` (:func:`scoredistill.maths.diffusion.sds_grad`; one UNet call on ``2B``
    samples, no UNet backward)."""

    name = "sds"

    def __init__(self, ctx: DistillContext, guidance_scale: float = 100.0, min_step_percent: float = 0.02,
                 max_step_percent: float = 0.98, weighting_strategy: str = "sds"):
        from scoredistill.maths.diffusion import step_range

        super().__init__(ctx)
        self.guidance_scale = float(guidance_scale)
        self.min_step, self.max_step = step_range(min_step_percent, max_step_percent, ctx.num_train_timesteps)
        self.weighting_strategy = weighting_strategy

    def grad(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        from scoredistill.maths.diffusion import sample_timesteps, sds_grad

        B = latents.shape[0]
        t = sample_timesteps(B, self.min_step, self.max_step, device=latents.device)
        cond, uncond = self.ctx.embeddings(B)
        return sds_grad(self.ctx.unet.eps, latents.detach(), t, cond, uncond, self.ctx.alphas_cumprod,
                        guidance_scale=self.guidance_scale, weighting_strategy=self.weighting_strategy)


# ----------------------------------------------------------------------------- UDS
class UDS(Method):
    """UDS generation (:func:`scoredistill.maths.uds.uds_generation_grad`, Eq. 16/19), ``t`` uniform on
    ``[min_step, max_step]`` (paper: ``t ~ U(1, 1000)``, i.e. all of ``[0, T)``); every other option is passed
    through (``guidance_scale``, ``interval``, ``x0_estimator``, ``ddim_steps``, ``recon_sign``, ...)."""

    name = "uds"

    def __init__(self, ctx: DistillContext, min_step_percent: float = 0.0, max_step_percent: float = 1.0, **options):
        from scoredistill.maths.diffusion import step_range
        from scoredistill.maths import uds

        super().__init__(ctx)
        self._uds = uds
        self.min_step, self.max_step = step_range(min_step_percent, max_step_percent, ctx.num_train_timesteps)
        self.options = options
        uds.validate_uds_options("generation", **{k: v for k, v in options.items() if k in (
            "x0_estimator", "ddim_steps", "interval", "guidance_scale", "recon_sign", "weighting_strategy")})

    def grad(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        from scoredistill.maths.diffusion import sample_timesteps

        B = latents.shape[0]
        t = sample_timesteps(B, self.min_step, self.max_step, device=latents.device)
        cond, uncond = self.ctx.embeddings(B)
        return self._uds.uds_generation_grad(self.ctx.unet.eps, latents.detach(), t, cond, uncond,
                                             self.ctx.alphas_cumprod, **self.options).grad


# ----------------------------------------------------------------------------- GE3D
class GE3D(Method):
    """GE3D (:func:`scoredistill.maths.ge3d.ge3d_grad`, Alg. 1, Eq. 9-11) with ``ge3d-guidance``'s trajectory
    code (:func:`~scoredistill.maths.ge3d.random_trajectory` after
    :func:`~scoredistill.maths.ge3d.annealed_trajectory_params`): a random trajectory redrawn every step, ``n``
    intervals i.i.d. uniform on the integers ``[jump_min, jump_max)`` back from the farthest node ``t_n``, each
    bound linearly annealed over ``ctx.total_steps`` -- by default the authors' reference-code schedule
    (``jump_min`` 60→30, ``jump_max`` 80→50, ``t_n`` 480→300; ``ge3d-guidance``'s own defaults are the paper's
    constant 60 / 80 / 480) -- or fixed ``timesteps``; the clean latents are ``x_{t_0}`` (Alg. 1, no added
    noise); DBC weights over ``ctx.total_steps``; CFG ``guidance_scale`` (7.5) on the denoising calls.
    Cost: ``n`` unconditional calls of ``B`` + ``n`` CFG calls of ``2B``."""

    name = "ge3d"

    def __init__(self, ctx: DistillContext, guidance_scale: float = 7.5, n_steps: int = 6, timesteps=None,
                 jump_min=(60, 30), jump_max=(80, 50), max_timestep=(480, 300), dbc: bool = True,
                 dbc_sigma: float = 1000.0):
        from scoredistill.maths import ge3d

        super().__init__(ctx)
        self._ge3d = ge3d
        T = ctx.num_train_timesteps
        self.fixed = None if timesteps is None else ge3d.validate_timesteps(timesteps, T)
        if self.fixed is None:
            ge3d.validate_random_trajectory(n_steps, jump_min, jump_max, max_timestep, T)
        self.n = n_steps if self.fixed is None else len(self.fixed) - 1
        self.guidance_scale, self.jumps = float(guidance_scale), (jump_min, jump_max, max_timestep)
        self.dbc, self.dbc_sigma = bool(dbc), float(dbc_sigma)

    def timesteps(self, step: int):
        if self.fixed is not None:
            return list(self.fixed)
        jmin, jmax, tmax = self._ge3d.annealed_trajectory_params(step, self.ctx.total_steps, *self.jumps)
        return self._ge3d.random_trajectory(self.n, jmin, max(jmax, jmin + 1), tmax)

    def grad(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        from scoredistill.maths.diffusion import cfg_combine

        B = latents.shape[0]
        cond, uncond = self.ctx.embeddings(B)
        eps = self.ctx.unet.eps

        def tvec(t: int, n: int = B) -> torch.Tensor:
            return torch.full((n,), int(t), dtype=torch.long, device=latents.device)

        def eps_uncond(x, t):
            return eps(x, tvec(t), uncond)

        def eps_guided(x, t):
            e_c, e_u = eps(torch.cat([x, x]), tvec(t, 2 * B), torch.cat([cond, uncond])).chunk(2)
            return cfg_combine(e_c, e_u, self.guidance_scale)

        w = self._ge3d.dbc_weights(self.n, step, self.ctx.total_steps, self.dbc_sigma, self.dbc)
        with torch.no_grad():
            grad, _ = self._ge3d.ge3d_grad(eps_uncond, eps_guided, latents.detach(), self.timesteps(step),
                                           self.ctx.alphas_cumprod, weights=w)
        return grad


# ----------------------------------------------------------------------------- LODS
class LODS(Method):
    """LODS (:class:`scoredistill.maths.lods.LODSLearner`, Alg. 1-3, Eq. 7-10): step (a) normalised SDS with the
    learnable unconditional branch (α or LoRA ψ), then step (b) one update of it.  ``t`` of (a) uniform on
    ``[min_step, max_step]``; every other option goes to the learner.  The LoRA variant needs a diffusers UNet
    (``ctx.uses_real_unet``): peft adds the adapter to the wrapped UNet, calls still go through the counter."""

    name = "lods"

    def __init__(self, ctx: DistillContext, variant: str = "embedding", min_step_percent: float = 0.02,
                 max_step_percent: float = 0.98, **options):
        from scoredistill.maths.diffusion import step_range
        from scoredistill.maths import lods

        super().__init__(ctx)
        if variant == "lora" and not ctx.uses_real_unet:
            raise MethodUnavailable("lods (lora): the LoRA variant adapts the UNet's attention projections; "
                                    "this model has none (exact-score prior) -- not applicable")
        self.min_step, self.max_step = step_range(min_step_percent, max_step_percent, ctx.num_train_timesteps)
        unet = ctx.unet.unet if variant == "lora" else None
        self.learner = lods.LODSLearner(ctx.unet.eps, variant, ctx.alphas_cumprod, unet=unet, **options)

    def grad(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        from scoredistill.maths.diffusion import sample_timesteps

        B = latents.shape[0]
        t = sample_timesteps(B, self.min_step, self.max_step, device=latents.device)
        cond, uncond = self.ctx.embeddings(B)
        return self.learner.step(latents.detach(), t, cond, uncond)["grad"]


# ----------------------------------------------------------------------------- VDM
class VDM(Method):
    """DreamMapping VDM + DCA (:func:`scoredistill.maths.vdm.vdm_step`, Eq. 17-19): one CFG UNet call, one
    update of the degradation operator ``M_ψ`` (U-Lite by default, Adam lr 0.01), ``t ~ U[min_step, max_step]``
    (paper: ``U(0, 1000)``).  Operator options: ``operator_type``, ``operator_lr``, ``operator_widths``;
    every other option goes to ``vdm_step`` (``guidance_scale`` 7.5, ``operator_input``, ``dca`` ...)."""

    name = "vdm"

    def __init__(self, ctx: DistillContext, latent_shape=None, operator_type: str = "ulite",
                 operator_lr: Optional[float] = None, operator_widths=None, min_step_percent: float = 0.0,
                 max_step_percent: float = 1.0, **options):
        from scoredistill.maths.diffusion import step_range
        from scoredistill.maths import vdm

        super().__init__(ctx)
        self._vdm = vdm
        self.min_step, self.max_step = step_range(min_step_percent, max_step_percent, ctx.num_train_timesteps)
        kw = {} if operator_widths is None else {"widths": tuple(operator_widths)}
        shape = tuple(latent_shape) if latent_shape is not None else (4, 64, 64)
        model = vdm.build_degradation_model(operator_type, shape, **kw).to(ctx.alphas_cumprod.device)
        self.mapping = vdm.VariationalDistributionMapping(model, lr=vdm.DEFAULT_OPERATOR_LR if operator_lr is None else operator_lr)
        self.options = options

    def grad(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        from scoredistill.maths.diffusion import sample_timesteps

        B = latents.shape[0]
        t = sample_timesteps(B, self.min_step, self.max_step, device=latents.device)
        cond, uncond = self.ctx.embeddings(B)
        return self._vdm.vdm_step(self.ctx.unet.eps, latents.detach(), t, cond, uncond, self.ctx.alphas_cumprod,
                                  self.mapping, **self.options)["grad"]


# ----------------------------------------------------------------------------- registry
#: name -> factory(ctx, **options) -> Method
METHODS: Dict[str, Callable[..., Method]] = {"sds": SDS, "ge3d": GE3D, "lods": LODS, "vdm": VDM, "uds": UDS}


def make_method(name: str, ctx: DistillContext, **options) -> Method:
    """Build the method ``name`` (one of :data:`METHODS`) with its options.

    Raises:
        ValueError: unknown name.
        MethodUnavailable: the method's module cannot be imported.
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    try:
        return METHODS[name](ctx, **options)
    except ImportError as e:  # the method's maths module is not there
        raise MethodUnavailable(f"{name}: {e}") from e


@dataclass
class MethodSpec:
    """One row of a benchmark: a label, a method name and its options."""

    label: str
    name: str
    options: dict = field(default_factory=dict)
    note: str = ""
    #: optimiser of the latents in the exact-score benchmark: None = the benchmark's default (Adam at its lr);
    #: ``("sgd", step)`` = plain gradient descent ``x <- x - step * grad`` (GE3D's update is an edit residual
    #: ``x - x̃``, so ``step = 1`` is the fixed-point iteration ``x <- x̃`` for a single node)
    optimizer: Optional[Tuple[str, float]] = None


def default_specs() -> List[MethodSpec]:
    """The benchmarks' rows: SDS at CFG 100 and 7.5, then each of the pack's guidances at its paper defaults."""
    return [
        MethodSpec("SDS (CFG 100)", "sds", {"guidance_scale": 100.0}),
        MethodSpec("SDS (CFG 7.5)", "sds", {"guidance_scale": 7.5}),
        MethodSpec("GE3D", "ge3d", {}, "reference trajectory (n = 6, annealed), DBC on, CFG 7.5"),
        MethodSpec("GE3D (plain GD, step 1)", "ge3d", {}, "as GE3D, latents updated by x <- x - grad (no Adam)",
                   optimizer=("sgd", 1.0)),
        MethodSpec("LODS (embedding, 2D setting)", "lods", {"variant": "embedding", "guidance_scale": float("inf"), "lr": 1e-4},
                   "paper A.1 2D experiments: CFG ∞, embedding lr 1e-4"),
        MethodSpec("LODS (embedding, NeRF setting)", "lods", {"variant": "embedding", "guidance_scale": 1000.0, "lr": 1e-5},
                   "paper A.1 T3Bench: CFG 1000, embedding lr 1e-5"),
        MethodSpec("LODS (LoRA)", "lods", {"variant": "lora"}, "CFG 1000, LoRA scale 0.5, lr 5e-7"),
        MethodSpec("VDM", "vdm", {}, "U-Lite operator (paper size, 0.88 M parameters), lr 0.01, CFG 7.5, DCA cut-off 300"),
        MethodSpec("UDS", "uds", {}, "generation, module defaults (CFG 7.5, c = 80, Tweedie x̂_0, default sign)"),
        MethodSpec("UDS (printed sign)", "uds", {"recon_sign": "printed"}, "Eq. 16 as printed: x̂_0^t − x̂_0^{t−c}"),
        MethodSpec("UDS (DDIM x̂_0)", "uds", {"x0_estimator": "ddim"}, "Eq. 15 estimator, module default steps"),
    ]
