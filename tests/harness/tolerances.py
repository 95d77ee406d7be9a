"""Tolerances that follow from float32 arithmetic (tests only).

A guidance evaluates the conditional and unconditional branches in ONE UNet call of batch ``2B``
(``scoredistill.maths.diffusion.predict_cond_uncond``); an independent reference in a test usually makes two
calls of batch ``B``.  Both are exact in real arithmetic, but in float32 the convolution / attention kernels
sum in a batch-dependent order, so the two noise predictions differ by a few units in the last place of the
activations — not of the output.  A fixed absolute tolerance (``atol=1e-6``) is then a guess that fails on
some machines (seen: 4 of 2048 elements off by 1.75e-6).

Instead, measure the discrepancy δ of the compared computation on the very inputs of the test and push it
through the (linear) map from the noise prediction to the compared quantity:

* CFG ``ε̃ = ε_u + s (ε_c − ε_u)`` moves by at most ``(|1 − s| + |s|) δ`` per element;
* a quantity ``q = gain · ε̃ + (terms both sides compute identically)`` moves by at most ``|gain| · that``;
* plus ``ops`` float32 roundings (unit ``torch.finfo(float32).eps``) of the largest operand involved.
"""
from __future__ import annotations

import torch

F32_EPS = torch.finfo(torch.float32).eps


@torch.no_grad()
def batching_discrepancy(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> float:
    """Max |ε(batched 2B call) − ε(separate B calls)| over both branches, on these inputs.

    Args: ``unet`` a diffusers UNet; x ``(B, C, H, W)``; t ``(B,)``; cond, uncond ``(B, L, E)``.
    """
    B = x.shape[0]
    both = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample
    e_c = unet(x, t, encoder_hidden_states=cond).sample
    e_u = unet(x, t, encoder_hidden_states=uncond).sample
    return max(float((both[:B] - e_c).abs().max()), float((both[B:] - e_u).abs().max()))


def cfg_atol(delta: float, guidance_scale: float, gain, *operands: torch.Tensor, ops: int = 16) -> float:
    """Absolute tolerance for ``q = gain · ε̃ + ...`` compared between batched and separate CFG evaluation.

    Args:
        delta: :func:`batching_discrepancy` of the branches.
        guidance_scale: CFG scale s (``ε̃ = ε_u + s (ε_c − ε_u)``).
        gain: the largest ``|∂q/∂ε̃|`` (a number or a tensor, its max abs is used).
        operands: tensors whose largest magnitude bounds the float32 rounding of the rest of the formula.
        ops: number of float32 roundings allowed on that magnitude.
    """
    g = float(torch.as_tensor(gain).abs().max())
    s = float(guidance_scale)
    mag = max([float(o.detach().abs().max()) for o in operands] or [0.0])
    return g * (abs(1.0 - s) + abs(s)) * delta + ops * F32_EPS * max(mag, 1.0) * max(g, 1.0)
