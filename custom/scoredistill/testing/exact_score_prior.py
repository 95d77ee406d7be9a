"""A diffusion "UNet" whose noise prediction is the exact MMSE noise for a Gaussian-mixture prior.

Data distribution (in latent space, shape ``(C, H, W)``, flattened to ``D = C*H*W``): for each prompt
``p = 0..P-1`` a mixture of ``K`` isotropic Gaussians

    q_p(x_0) = sum_k pi_{p,k} N(x_0; mu_{p,k}, s_{p,k}^2 I),

and the unconditional distribution is the marginal ``q(x_0) = sum_p rho_p q_p(x_0)``.

Forward process (DDPM / Stable Diffusion, variance preserving): ``x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps``
with ``abar_t = alphas_cumprod[t]`` of SD's scaled_linear schedule (betas 0.00085 -> 0.012, 1000 steps).
Then every component stays Gaussian, ``x_t | k ~ N(a mu_k, (a^2 s_k^2 + sigma^2) I)`` with ``a = sqrt(abar_t)``,
``sigma = sqrt(1 - abar_t)``, and the exact MMSE noise prediction is (Tweedie's formula; Efron 2011,
Ho et al. 2020 Eq. 11 with eps = -sigma * score):

    eps*(x_t, t) = E[eps | x_t] = -sigma * grad log q_t(x_t)
                 = sigma * sum_k r_k(x_t) (x_t - a mu_k) / (a^2 s_k^2 + sigma^2),
    r_k(x_t)     = softmax_k( log pi_k - D/2 log(a^2 s_k^2 + sigma^2) - |x_t - a mu_k|^2 / (2 (a^2 s_k^2 + sigma^2)) ).

Conditioning through the text embedding: ``encoder_hidden_states`` has shape ``(B, L, E)`` (or ``(1, L, E)``,
broadcast over the batch) with ``E >= P + 1``.  The first token's first ``P + 1`` channels are *linear selection
weights* ``w = (w_0, ..., w_P)`` over "slots": slot ``p < P`` is ``q_p``, slot ``P`` is the marginal ``q``.  The
prediction is the linear combination of the slots' exact noise predictions,

    eps(x_t, t; w) = sum_j w_j eps*_j(x_t, t),       eps*_j = the exact MMSE noise of slot j's mixture,

each ``eps*_j`` computed with the formula above over that slot's components only (the other prompts'
components have weight exactly 0).  So the one-hot embeddings of :meth:`embedding` give exactly the MMSE noise
of ``q_p`` (or of ``q``), with no leak from the other prompts, and the output is differentiable in ``w`` with
``d eps / d w_j = eps*_j`` (an O(1) gradient: a learnable embedding, e.g. LODS's α, really learns).  Any finite
``w`` is accepted -- weights that are negative or do not sum to 1 are meaningful linear combinations (e.g.
``w = (s, 0, 1 - s)`` is classifier-free guidance at scale ``s``) and a learnable embedding drifts off the
simplex under its optimiser -- but only a one-hot ``w`` is the score of a distribution: a non-one-hot ``w``
on the simplex is *not* the score of the mixture ``sum_j w_j q_j`` (that would need ``x_t``-dependent
weights), it is the corresponding combination of scores, like CFG.

The module follows the diffusers ``UNet2DConditionModel`` call signature:
``prior(sample, timestep, encoder_hidden_states) -> object with .sample`` of ``sample``'s shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import torch.nn as nn


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's ``alphas_cumprod`` (scaled_linear betas), float64, shape ``(num_train_timesteps,)``."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class _Output:
    sample: torch.Tensor


class ExactScorePrior(nn.Module):
    """Exact-score Gaussian-mixture denoiser (see module docstring for the distribution and formula).

    Args:
        means: ``(P, K, C, H, W)`` component means per prompt.
        stds: ``(P, K)`` component standard deviations (> 0).
        weights: ``(P, K)`` component weights per prompt (normalised here).
        prompt_weights: ``(P,)`` weights rho_p of the prompts in the unconditional marginal (default uniform).
        embed_dim: text-embedding width ``E`` (>= P + 1); ``seq_len``: tokens ``L``.
        alphas_cumprod: ``(T,)``; default SD's schedule.

    Raises:
        ValueError: on inconsistent shapes, non-positive stds, bad (prompt) weights, or ``embed_dim < P + 1``.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        prompt_weights: Optional[torch.Tensor] = None,
        embed_dim: int = 32,
        seq_len: int = 77,
        alphas_cumprod: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        if means.dim() != 5:
            raise ValueError(f"means must have shape (P, K, C, H, W), got {tuple(means.shape)}")
        P, K = means.shape[:2]
        if stds.shape != (P, K):
            raise ValueError(f"stds must have shape {(P, K)}, got {tuple(stds.shape)}")
        if (stds <= 0).any():
            raise ValueError("stds must be > 0")
        if weights is None:
            weights = torch.ones(P, K)
        if weights.shape != (P, K) or (weights < 0).any() or not (weights.sum(-1) > 0).all():
            raise ValueError(f"weights must be non-negative with shape {(P, K)} and a positive sum per prompt")
        if prompt_weights is None:
            prompt_weights = torch.ones(P)
        if prompt_weights.shape != (P,) or (prompt_weights < 0).any() or not prompt_weights.sum() > 0:
            raise ValueError(f"prompt_weights must be non-negative with shape {(P,)} and a positive sum")
        if embed_dim < P + 1:
            raise ValueError(f"embed_dim must be >= number of prompts + 1 = {P + 1}, got {embed_dim}")
        self.num_prompts, self.num_components = P, K
        self.latent_shape = tuple(means.shape[2:])
        self.embed_dim, self.seq_len = embed_dim, seq_len
        self.register_buffer("means", means.double())
        self.register_buffer("stds", stds.double())
        self.register_buffer("weights", (weights / weights.sum(-1, keepdim=True)).double())
        self.register_buffer("prompt_weights", (prompt_weights / prompt_weights.sum()).double())
        # (P+1, P*K) log component weights of each slot: block p for slot p < P (-inf elsewhere), the marginal in slot P
        slot_w = torch.zeros(P + 1, P, K, dtype=torch.float64)
        slot_w[torch.arange(P), torch.arange(P)] = self.weights
        slot_w[P] = self.prompt_weights[:, None] * self.weights
        self.register_buffer("slot_log_weights", torch.log(slot_w.reshape(P + 1, P * K)))
        if alphas_cumprod is None:
            alphas_cumprod = sd_alphas_cumprod()
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        self._dtype_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
        c, h, w = self.latent_shape
        self.config = SimpleNamespace(in_channels=c, out_channels=c, sample_size=h, cross_attention_dim=embed_dim)
        #: number of forward calls and total samples evaluated (cost accounting in tests/benchmarks)
        self.num_calls = 0
        self.num_samples = 0

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def random(
        cls,
        num_prompts: int = 2,
        num_components: int = 3,
        latent_shape: Sequence[int] = (4, 8, 8),
        mean_scale: float = 1.0,
        std: float = 0.1,
        seed: int = 0,
        **kwargs,
    ) -> "ExactScorePrior":
        """A prior with random component means ``N(0, mean_scale^2)`` per coordinate and a shared ``std``."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(num_prompts, num_components, *latent_shape, generator=g, dtype=torch.float64) * mean_scale
        stds = torch.full((num_prompts, num_components), float(std), dtype=torch.float64)
        return cls(means, stds, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._dtype_anchor.device

    def embedding(self, prompt: Optional[int], batch_size: int = 1) -> torch.Tensor:
        """One-hot condition ``(batch_size, L, E)``: ``prompt`` in ``0..P-1``, or ``None`` for unconditional."""
        idx = self._slot(prompt)
        emb = torch.zeros(batch_size, self.seq_len, self.embed_dim, dtype=torch.float32, device=self.device)
        emb[:, 0, idx] = 1.0
        return emb

    # ------------------------------------------------------------------ the distribution
    def _slot(self, prompt: Optional[int]) -> int:
        idx = self.num_prompts if prompt is None else int(prompt)
        if not 0 <= idx <= self.num_prompts:
            raise ValueError(f"prompt must be in 0..{self.num_prompts - 1} or None, got {prompt}")
        return idx

    def mixture(self, prompt: Optional[int]):
        """The exact mixture of ``q_prompt`` (``None``: the marginal) over all ``P*K`` components:
        ``(log_weights (P*K,), means (P*K, D), stds (P*K,))``; the other prompts' components have log weight -inf."""
        return (self.slot_log_weights[self._slot(prompt)], self.means.reshape(self.num_prompts * self.num_components, -1),
                self.stds.reshape(-1))

    def selection_weights(self, encoder_hidden_states: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """The linear selection weights ``w`` ``(B, P+1)`` (float64, differentiable): the first token's first
        ``P + 1`` channels of ``encoder_hidden_states`` (see the module docstring).

        Raises:
            ValueError: ``encoder_hidden_states`` is not ``(B, L, E)`` with ``E >= P + 1`` and ``B`` in ``{1, batch_size}``.
        """
        e = encoder_hidden_states
        if e.dim() != 3 or e.shape[1] < 1 or e.shape[2] < self.num_prompts + 1:
            raise ValueError(f"encoder_hidden_states must have shape (B, L, E) with L >= 1 and E >= {self.num_prompts + 1}"
                             f" (P + 1 selection channels), got {tuple(e.shape)}")
        if batch_size is not None and e.shape[0] not in (1, batch_size):
            raise ValueError(f"encoder_hidden_states must have batch size 1 or {batch_size} (the sample's), got {e.shape[0]}")
        w = e[:, 0, : self.num_prompts + 1].double()
        return w if batch_size is None else w.expand(batch_size, -1)

    def sample_data(self, prompt: Optional[int], n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw ``n`` samples ``(n, C, H, W)`` (float64) from ``q_p`` (or the marginal for ``None``)."""
        log_w, mu, s = self.mixture(prompt)
        k = torch.multinomial(log_w.exp().float(), n, replacement=True, generator=generator)
        x = mu[k] + s[k, None] * torch.randn(n, mu.shape[1], generator=generator, dtype=torch.float64)
        return x.reshape(n, *self.latent_shape)

    def component_posterior(self, x_t: torch.Tensor, timestep: torch.Tensor):
        """Responsibilities ``r_k(x_t)`` of every slot ``(B, P+1, P*K)`` (row ``j``: slot ``j``'s mixture; zero on
        components outside it) and the per-component variances ``(B, P*K)`` at ``t``."""
        B = x_t.shape[0]
        abar = self._abar(timestep, B)
        a, sig2 = abar.sqrt(), 1.0 - abar
        mu, s = self.means.reshape(self.num_prompts * self.num_components, -1), self.stds.reshape(-1)
        x = x_t.reshape(B, -1).double()
        var = a[:, None] ** 2 * s[None] ** 2 + sig2[:, None]  # (B, M)
        d2 = (x**2).sum(-1, keepdim=True) - 2 * a[:, None] * (x @ mu.T) + a[:, None] ** 2 * (mu**2).sum(-1)[None]
        D = x.shape[1]
        loglik = -0.5 * D * torch.log(var) - 0.5 * d2 / var  # (B, M)
        logits = self.slot_log_weights[None] + loglik[:, None, :]  # (B, P+1, M); -inf outside each slot
        return torch.softmax(logits, dim=-1), var

    def slot_eps(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Exact MMSE noise of every slot, ``(B, P+1, D)`` float64 (slot ``p < P``: ``q_p``; slot ``P``: ``q``)."""
        B = sample.shape[0]
        abar = self._abar(timestep, B)
        a, sig = abar.sqrt(), (1.0 - abar).sqrt()
        r, var = self.component_posterior(sample, timestep)
        mu = self.means.reshape(self.num_prompts * self.num_components, -1)
        x = sample.reshape(B, -1).double()
        coef = r / var[:, None, :]  # (B, P+1, M): sum_k r_k (x - a mu_k) / var_k
        return sig[:, None, None] * (coef.sum(-1, keepdim=True) * x[:, None, :] - a[:, None, None] * (coef @ mu))

    def _abar(self, timestep, batch_size: int) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=self.alphas_cumprod.device)
        t = t.round().long().clamp(0, self.alphas_cumprod.shape[0] - 1)
        if t.dim() == 0:
            t = t.expand(batch_size)
        return self.alphas_cumprod[t]

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True, **kwargs):
        """``sum_j w_j eps*_j(x_t, t)`` with ``w`` = :meth:`selection_weights` (exact ``eps*`` of ``q_p`` for a
        one-hot embedding; see the module docstring).  ``sample``: ``(B, C, H, W)``; ``timestep``: scalar or
        ``(B,)`` integer-valued in ``[0, T)``; ``encoder_hidden_states``: ``(B, L, E)`` or ``(1, L, E)``.
        Differentiable in ``sample`` and ``encoder_hidden_states``.  Returns an object with ``.sample``
        (``sample``'s shape and dtype).

        Raises:
            ValueError: ``sample`` not ``(B, C, H, W)`` of the prior's latent shape, or a bad ``encoder_hidden_states``.
        """
        B = sample.shape[0]
        if tuple(sample.shape[1:]) != self.latent_shape:
            raise ValueError(f"sample must have shape (B, {self.latent_shape}), got {tuple(sample.shape)}")
        w = self.selection_weights(encoder_hidden_states, B)
        self.num_calls += 1
        self.num_samples += B
        eps = (w[:, :, None] * self.slot_eps(sample, timestep)).sum(1)
        out = eps.reshape(sample.shape).to(sample.dtype)
        return _Output(sample=out) if return_dict else (out,)

    def posterior_mean_x0(self, x_t: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Exact ``E[x_0 | x_t]`` by Tweedie: ``(x_t - sigma eps*) / a``."""
        abar = self._abar(timestep, x_t.shape[0]).view(-1, *([1] * (x_t.dim() - 1)))
        eps = self.forward(x_t, timestep, encoder_hidden_states).sample.double()
        return ((x_t.double() - (1 - abar).sqrt() * eps) / abar.sqrt()).to(x_t.dtype)

    # ------------------------------------------------------------------ metrics for benchmarks
    def distance_to_prompt(self, x0: torch.Tensor, prompt: int) -> torch.Tensor:
        """Per-sample distance (RMS over coordinates) from ``x0`` ``(B, C, H, W)`` to the nearest component mean of ``prompt``."""
        mu = self.means[prompt].reshape(self.num_components, -1)
        x = x0.reshape(x0.shape[0], -1).double()
        d2 = torch.cdist(x, mu) ** 2 / x.shape[1]
        return d2.min(-1).values.sqrt()

    def nearest_component(self, x0: torch.Tensor, prompt: int) -> torch.Tensor:
        """Index ``(B,)`` of the nearest component mean of ``prompt``."""
        mu = self.means[prompt].reshape(self.num_components, -1)
        return torch.cdist(x0.reshape(x0.shape[0], -1).double(), mu).argmin(-1)
