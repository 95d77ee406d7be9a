"""Multi-process (Lightning DDP) synchronisation of the pack's state that DDP does not see.

Plain torch (``torch.distributed``), no threestudio import.  Every function is a no-op in a single process
(``torch.distributed`` not initialised, or a world of one), so single-GPU / CPU behaviour is unchanged.

threestudio runs several GPUs through Lightning DDP (``launch.py --gpu 0,1``): each rank renders its own batch
of views (threestudio seeds ``seed + rank``), and DDP averages the gradients of the system's *registered*
parameters.  The target semantics of the pack under DDP is **one process with the union of the ranks' views**
(batch ``N x B``; every loss of the pack is a mean over views, so the union gradient is the mean of the ranks'
gradients).  What DDP does not cover, and how it is synchronised here:

* the guidances' own trainable state -- ``lods-guidance``'s α / LoRA ψ and ``vdm-guidance``'s operator ``M_ψ``,
  trained by the guidance's own optimizer: parameters broadcast from rank 0 when the guidance is built
  (:func:`broadcast_`), gradients averaged over the ranks before every internal optimizer step
  (:func:`all_reduce_grads_`), and the operator's BatchNorm layers normalised with the union batch's
  statistics (:class:`SyncedBatchNorm2d`, :func:`convert_batchnorm`) -- identical updates on every rank;
* ``gsplat-system``'s Gaussians, whose parameter tensors densification replaces (DDP's buckets and hooks
  would keep the old tensors): DDP's own gradient reduction is switched off for that system
  (:func:`disable_ddp_grad_sync`) and the system averages the gradients of its optimizer's *current*
  parameters itself before every step (:func:`all_reduce_grads_`); the densifier sums the per-rank
  screen-space gradient statistics (:func:`all_reduce_`) and draws its random split samples from a seed shared
  by all ranks (:func:`shared_seed`, :func:`shared_rng`), so densification decisions and new Gaussians are
  identical on every rank.

Debug switch: ``SCOREDISTILL_DDP_UNSYNC`` -- a comma-separated subset of ``guidance`` (the all-reduce of the
guidances' gradients and BatchNorm statistics), ``guidance_init`` (the initial broadcast), ``system``
(gsplat-system's gradient all-reduce), ``densify`` (union statistics, shared split seed), or ``all``, disables
that synchronisation, to demonstrate that the 2-process equality tests detect an unsynchronised run.  Never
set it for real training.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, List, Optional

import torch
import torch.nn as nn

__all__ = [
    "SyncedBatchNorm2d",
    "all_reduce_",
    "all_reduce_grads_",
    "broadcast_",
    "convert_batchnorm",
    "disable_ddp_grad_sync",
    "is_distributed",
    "rank",
    "shared_rng",
    "shared_seed",
    "sync_disabled",
    "warn_uneven_eval_views",
    "world_size",
]

UNSYNC_ENV = "SCOREDISTILL_DDP_UNSYNC"
UNSYNC_PARTS = ("guidance", "guidance_init", "system", "densify")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is active."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def sync_disabled(part: str) -> bool:
    """Whether ``SCOREDISTILL_DDP_UNSYNC`` switches off synchronisation ``part`` (debugging / tests only)."""
    value = os.environ.get(UNSYNC_ENV, "")
    parts = {p.strip() for p in value.split(",") if p.strip()}
    return part in parts or "all" in parts


def _active(part: Optional[str]) -> bool:
    return is_distributed() and not (part is not None and sync_disabled(part))


def _flat_all_reduce(tensors: List[torch.Tensor], op, divide: bool) -> None:
    """All-reduce ``tensors`` in place through one flat buffer per dtype/device (one collective each)."""
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        torch.distributed.all_reduce(flat, op=op)
        if divide:
            flat /= torch.distributed.get_world_size()
        offset = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n


@torch.no_grad()
def all_reduce_grads_(params: Iterable[torch.Tensor], part: Optional[str] = None) -> int:
    """Average the ``.grad`` of ``params`` over the ranks, in place (the union-batch gradient when every rank's
    loss is a mean over the same number of views).  Parameters without a gradient are skipped (every rank
    runs the same graph, so they agree).  Returns the number of gradients reduced (0 in a single process)."""
    if not _active(part):
        return 0
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        _flat_all_reduce(grads, torch.distributed.ReduceOp.SUM, divide=True)
    return len(grads)


@torch.no_grad()
def all_reduce_(tensors: Iterable[torch.Tensor], op: str = "sum", part: Optional[str] = None) -> bool:
    """All-reduce ``tensors`` in place with ``op`` ("sum", "max" or "mean").  Returns whether it reduced."""
    if not _active(part):
        return False
    tensors = [t for t in tensors if t is not None]
    if op not in ("sum", "max", "mean"):
        raise ValueError(f"op must be 'sum', 'max' or 'mean', got {op!r}")
    reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    if tensors:
        _flat_all_reduce(tensors, reduce_op, divide=(op == "mean"))
    return True


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0, part: Optional[str] = None) -> bool:
    """Overwrite ``tensors`` (parameters, buffers) in place with rank ``src``'s values.  Returns whether it ran."""
    if not _active(part):
        return False
    for t in tensors:
        if t is None:
            continue
        buf = t.detach()
        if not buf.is_contiguous():
            tmp = buf.contiguous()
            torch.distributed.broadcast(tmp, src)
            buf.copy_(tmp)
        else:
            torch.distributed.broadcast(buf, src)
    return True


def module_state_tensors(module: nn.Module) -> List[torch.Tensor]:
    """Parameters and buffers of ``module`` (what :func:`broadcast_` needs to make two copies identical)."""
    return list(module.parameters()) + [b for b in module.buffers()]


def shared_seed(device: Optional[torch.device] = None) -> int:
    """A 63-bit seed equal on every rank (rank 0's draw from its torch generator, broadcast); in a single
    process a draw from the torch generator."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if is_distributed():
        backend = torch.distributed.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        seed = seed.to(dev)
        torch.distributed.broadcast(seed, 0)
    return int(seed.item())


@contextlib.contextmanager
def shared_rng(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Run the block with torch's CPU generator (and ``device``'s CUDA generator) seeded with ``seed``, restoring
    the per-rank generators afterwards -- random draws inside are identical on every rank."""
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        idx = torch.device(device).index
        devices = [idx if idx is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % (2**63))
        yield


def disable_ddp_grad_sync(model) -> bool:
    """Switch off ``torch.nn.parallel.DistributedDataParallel``'s own gradient all-reduce on ``model`` (what
    ``no_sync()`` does, permanently).  For systems that replace their parameter tensors during training and
    reduce gradients themselves.  Returns whether ``model`` is a DDP wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = False
        return True
    return False


def warn_uneven_eval_views(data_cfg, warn) -> List[str]:
    """Under DDP, call ``warn(message)`` for each of ``data.n_val_views`` / ``data.n_test_views`` that is not a
    multiple of the world size (Lightning's ``DistributedSampler`` pads the remainder with duplicate views,
    which two ranks then render and write under the same file name).  Returns the messages."""
    messages = []
    n_ranks = world_size()
    if n_ranks == 1 or data_cfg is None:
        return messages
    for key in ("n_val_views", "n_test_views"):
        n = getattr(data_cfg, key, None)
        if isinstance(n, int) and n % n_ranks:
            messages.append(
                f"data.{key}={n} is not a multiple of the {n_ranks} GPUs: Lightning's DistributedSampler pads it "
                f"with duplicate views (written twice); use a multiple of {n_ranks}"
            )
    for m in messages:
        warn(m)
    return messages


# ------------------------------------------------------------------------------------------- BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks (backward: the sum of the ranks' output gradients)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the union of the ranks' batches (as
    ``torch.nn.SyncBatchNorm``, which supports only accelerator tensors; this one also runs on the CPU / gloo).

    Same parameters, buffers and ``state_dict`` as ``BatchNorm2d``; in a single process, or in eval mode with
    running statistics, it is exactly ``BatchNorm2d`` (the VDM operator's layers keep no running statistics:
    always batch statistics, so always the union's).  Running statistics are updated with the union mean and unbiased union variance.
    Gradients flow through the shared statistics to every rank (differentiable all-reduce), so the ranks'
    parameter gradients sum to the union loss's gradient.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or self.running_mean is None  # (track_running_stats=False: always batch stats)
        if not (batch_stats and _active("guidance")):
            return super().forward(x)
        self._check_input_dim(x)
        C = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(x.numel() // C), device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        stats = _AllReduceSum.apply(stats)
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C : 2 * C] / n - mean * mean).clamp_min(0.0)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xf - mean.view(1, C, 1, 1)) * torch.rsqrt(var.view(1, C, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1).float() + self.bias.view(1, C, 1, 1).float()
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> int:
    """Turn every ``nn.BatchNorm2d`` of ``module`` into :class:`SyncedBatchNorm2d` in place (same tensors, same
    state dict).  Returns the number converted."""
    n = 0
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncedBatchNorm2d
            n += 1
    return n
