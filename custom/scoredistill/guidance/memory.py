"""Memory / speed options of the pack's Stable Diffusion guidances (applied by ``guidance/base.py`` at load time).

The names are threestudio's (``stable-diffusion-guidance`` in ``threestudio/models/guidance/``) where it has
them, so a threestudio config's ``system.guidance`` block carries over unchanged:

=================================== ===== ===============================================================
setting                             exact effect
=================================== ===== ===============================================================
``enable_memory_efficient_attention`` yes   attention through ``torch.nn.functional.scaled_dot_product_attention``
                                            (diffusers ``AttnProcessor2_0``) or xformers
                                            (``memory_efficient_attention_backend``: ``auto`` | ``sdpa`` |
                                            ``xformers``; ``auto`` = xformers on CUDA when installed, else SDPA)
``enable_attention_slicing``        yes   attention computed one head-slice at a time (``set_attention_slice``,
                                            slice size ``attention_slice_size``, threestudio uses 1)
``enable_channels_last_format``     yes   UNet weights in ``torch.channels_last`` memory format
``enable_sequential_cpu_offload``   yes   UNet and VAE weights stay on the CPU, moved to the GPU one sub-module
                                            at a time (``accelerate.cpu_offload``; CUDA only)
``token_merging``                   no    tomesd token merging (``token_merging_params`` → ``tomesd.apply_patch``)
``compile_unet`` (pack only)        yes*  ``torch.compile`` of the UNet (``compile_unet_params`` →
                                            ``nn.Module.compile``); *up to kernel-fusion rounding
``unet_activation_checkpointing``   yes   (pack only, default ``auto``) UNet blocks recompute their activations
                                            in the backward instead of keeping them, where a gradient flows
                                            through the UNet (LODS' Eq. 8/10 loss); no effect on no-grad calls
``vae_activation_checkpointing``    yes   (pack only, default ``auto``) the same for the VAE encoder's blocks in
                                            the render → latents backward (one more encoder forward per step)
=================================== ===== ===============================================================

Activation checkpointing, ``auto``: on for a CUDA device with less than
:data:`AUTO_CHECKPOINTING_BELOW_GIB` (24) GiB of memory, off on larger GPUs and on the CPU
(:func:`resolve_activation_checkpointing`).  Measured on an H200 (2026-12-04, SD 2.1-base architecture, fp16,
the configs' own settings; ``docs/speed.md``): with both on, peak allocated memory fell from 19.6 to 11.1 GiB
(lods-embedding-gs) and 15.0 to 10.9 GiB (uds-edit-gs), so every Gaussian config fits a 16 GB card, but
steps were 14-36% slower (the recomputed forwards: lods-embedding-gs 0.279 -> 0.379 s/it, vdm-gs 0.154 ->
0.193, uds-gs 0.140 -> 0.159, uds-edit-gs 0.205 -> 0.250).  A card that has the memory does not pay that.

Channels-last and CUDA: cuDNN's convolutions use TF32 when ``torch.backends.cudnn.allow_tf32`` is true
(PyTorch's default), and channels-last picks other kernels, so in float32 on CUDA the UNet output moves by
~1.6e-3 of its max (measured on an H200); with ``allow_tf32 = False`` it is exact.  The pack does not change
the process-wide TF32 settings; in fp16 (the default ``half_precision_weights``) TF32 does not apply.

"exact" = the same function up to floating-point rounding (tests/test_guidance_memory.py bounds the change of
the guidance gradient on the tiny model); token merging changes the function (measured error in the README).

:func:`validate_memory_options` runs in ``validate_config`` (before any model loads) and raises ``ValueError``
naming the setting: xformers or offload requested on a CPU device, xformers not installed, slicing together
with memory-efficient attention (both set the attention processor; the last would silently win), offload with
``torch.compile``, unknown ``token_merging_params`` / ``compile_unet_params`` keys, a merge ratio outside [0, 1).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch

MEMORY_EFFICIENT_ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")
_COMPILE_KEYS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def _xformers_available() -> bool:
    from diffusers.utils.import_utils import is_xformers_available

    return bool(is_xformers_available())


def _to_dict(value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return dict(value)


def _device_type(device: Any) -> str:
    return torch.device(device).type if device is not None else "cpu"


#: ``auto`` activation checkpointing is on for CUDA devices with less memory than this (GiB)
AUTO_CHECKPOINTING_BELOW_GIB = 24.0
ACTIVATION_CHECKPOINTING_VALUES = (True, False, "auto")


def device_total_gib(device: Any) -> Optional[float]:
    """Total memory of a CUDA ``device`` in GiB (``torch.cuda.get_device_properties``); ``None`` off CUDA."""
    if _device_type(device) != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30


def resolve_activation_checkpointing(value: Any, device: Any, name: str = "system.guidance.unet_activation_checkpointing") -> bool:
    """``true`` / ``false`` as given; ``"auto"``: on exactly when ``device`` is a CUDA device with less than
    :data:`AUTO_CHECKPOINTING_BELOW_GIB` GiB (a 16 GB card needs it for lods-embedding-gs / uds-edit-gs; an
    H200 does not, and would pay 14-36% per step).  Raises ``ValueError`` naming ``name`` for anything else."""
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ValueError(f"{name} must be true, false or 'auto', got {value!r}")
    total = device_total_gib(device)
    return total is not None and total < AUTO_CHECKPOINTING_BELOW_GIB


def validate_memory_options(cfg: Any, device: Any, prefix: str = "system.guidance") -> None:
    """Check the memory options of a guidance ``cfg`` for ``device``; raise ``ValueError`` naming the setting.

    Runs before anything loads (called from ``ScoreDistillationGuidance.validate_config``).
    """
    dev = _device_type(device)
    for key in ("unet_activation_checkpointing", "vae_activation_checkpointing"):
        value = getattr(cfg, key, False)
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"{prefix}.{key} must be true, false or 'auto', got {value!r}")
    backend = getattr(cfg, "memory_efficient_attention_backend", "auto")
    if backend not in MEMORY_EFFICIENT_ATTENTION_BACKENDS:
        raise ValueError(
            f"{prefix}.memory_efficient_attention_backend must be one of {MEMORY_EFFICIENT_ATTENTION_BACKENDS}, "
            f"got {backend!r}"
        )
    if cfg.enable_memory_efficient_attention and backend == "xformers":
        if dev != "cuda":
            raise ValueError(
                f"{prefix}.memory_efficient_attention_backend=xformers needs a CUDA device (this run uses {dev!r}); "
                "use 'sdpa' or 'auto'"
            )
        if not _xformers_available():
            raise ValueError(
                f"{prefix}.memory_efficient_attention_backend=xformers but xformers is not installed; "
                "pip install xformers, or use 'sdpa' / 'auto'"
            )
    if cfg.enable_attention_slicing and cfg.enable_memory_efficient_attention:
        raise ValueError(
            f"{prefix}.enable_attention_slicing and {prefix}.enable_memory_efficient_attention both choose the "
            "attention processor; enable only one (with PyTorch 2 SDPA is already memory-efficient)"
        )
    size = getattr(cfg, "attention_slice_size", 1)
    if not (size == "auto" or size == "max" or (isinstance(size, int) and not isinstance(size, bool) and size >= 1)):
        raise ValueError(f"{prefix}.attention_slice_size must be an integer >= 1, 'auto' or 'max', got {size!r}")
    if cfg.enable_sequential_cpu_offload:
        if dev != "cuda":
            raise ValueError(
                f"{prefix}.enable_sequential_cpu_offload needs a CUDA device (weights are offloaded from the GPU "
                f"to the CPU); this run uses {dev!r}: set it to false"
            )
        if getattr(cfg, "compile_unet", False):
            raise ValueError(
                f"{prefix}.enable_sequential_cpu_offload and {prefix}.compile_unet cannot be combined "
                "(the offload hooks move weights inside the forward)"
            )
    params = _to_dict(cfg.token_merging_params)
    if params:
        import tomesd

        allowed = [p for p in inspect.signature(tomesd.apply_patch).parameters if p != "model"]
        bad = sorted(set(params) - set(allowed))
        if bad:
            raise ValueError(f"{prefix}.token_merging_params: unknown keys {bad}; allowed {allowed}")
        ratio = params.get("ratio", 0.5)
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"{prefix}.token_merging_params.ratio must be in [0, 1), got {ratio!r}")
    if cfg.token_merging:
        try:
            import tomesd  # noqa: F401
        except ImportError:
            raise ValueError(f"{prefix}.token_merging needs the tomesd package (pip install tomesd)") from None
    cparams = _to_dict(getattr(cfg, "compile_unet_params", None))
    bad = sorted(set(cparams) - set(_COMPILE_KEYS))
    if bad:
        raise ValueError(f"{prefix}.compile_unet_params: unknown keys {bad}; allowed {list(_COMPILE_KEYS)}")


def pipeline_component_class(path: str, name: str, default):
    """The class of pipeline component ``name`` (``"unet"``, ``"vae"``) of a local diffusers folder ``path``.

    diffusers pipelines name each component's ``[library, class]`` in ``model_index.json``; for ``diffusers`` /
    ``transformers`` components (every Stable Diffusion checkpoint) and hub ids this returns ``default``, so the
    loading is unchanged.  A folder may name a model class of this pack instead (the ground-truth prior of
    :mod:`scoredistill.testing.gt_prior3d`), which ``StableDiffusionPipeline.from_pretrained`` also honours.

    Raises:
        ValueError: the folder names a class outside ``diffusers`` / ``transformers`` / ``scoredistill``.
    """
    import importlib
    import json
    import os

    index = os.path.join(path, "model_index.json") if os.path.isdir(str(path)) else None
    if index is None or not os.path.isfile(index):
        return default
    with open(index) as fh:
        entry = json.load(fh).get(name)
    if not entry or entry[0] in (None, "diffusers", "transformers"):
        return default
    library, cls_name = entry
    if not (library == "scoredistill" or str(library).startswith("scoredistill.")):
        raise ValueError(f"{index}: component {name!r} names {library}.{cls_name}; the pack loads diffusers models "
                         "or its own (scoredistill.*) only")
    return getattr(importlib.import_module(library), cls_name)


def load_models(cfg: Any, unet_cls, vae_cls, path: str, device: Any, dtype: torch.dtype, log=None):
    """Load ``(unet, vae)`` from ``path`` in ``dtype`` and apply the memory options; both frozen, eval mode.

    ``unet_cls`` / ``vae_cls`` are the defaults; a local folder's ``model_index.json`` may name other classes
    (:func:`pipeline_component_class`).  Without offload they are moved to ``device``; with
    ``enable_sequential_cpu_offload`` they stay on the CPU behind ``accelerate.cpu_offload`` hooks that execute
    on ``device``.
    """
    unet_cls = pipeline_component_class(path, "unet", unet_cls)
    vae_cls = pipeline_component_class(path, "vae", vae_cls)
    unet = unet_cls.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    vae = vae_cls.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    apply_memory_options(cfg, unet, vae, device, log=log)
    return unet, vae


def apply_memory_options(cfg: Any, unet, vae, device: Any, log=None) -> None:
    """Apply the options of :func:`validate_memory_options` to a loaded, frozen ``unet`` / ``vae`` (in place)."""
    log = log or (lambda msg: None)
    dev = _device_type(device)
    if cfg.enable_memory_efficient_attention:
        backend = cfg.memory_efficient_attention_backend
        if backend == "auto":
            backend = "xformers" if (dev == "cuda" and _xformers_available()) else "sdpa"
        if backend == "xformers":
            unet.enable_xformers_memory_efficient_attention()
            vae.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor2_0())
            vae.set_attn_processor(AttnProcessor2_0())
        log(f"memory-efficient attention: {backend}")
    if cfg.enable_attention_slicing:
        unet.set_attention_slice(cfg.attention_slice_size)
        log(f"attention slicing: slice size {cfg.attention_slice_size}")
    if cfg.enable_channels_last_format:
        unet.to(memory_format=torch.channels_last)
        log("UNet in channels-last memory format")
    if cfg.token_merging:
        import tomesd

        tomesd.apply_patch(unet, **_to_dict(cfg.token_merging_params))
        log(f"token merging (tomesd) {_to_dict(cfg.token_merging_params)}")
    if cfg.enable_sequential_cpu_offload:
        from accelerate import cpu_offload

        exec_device = torch.device(device)
        cpu_offload(unet, execution_device=exec_device)
        cpu_offload(vae, execution_device=exec_device)
        log(f"sequential CPU offload (execution device {exec_device})")
    else:
        unet.to(device)
        vae.to(device)
    if resolve_activation_checkpointing(getattr(cfg, "unet_activation_checkpointing", False), device):
        n = enable_activation_checkpointing(unet_blocks(unet))
        log(f"UNet activation checkpointing ({n} blocks, where a gradient flows through the UNet; "
            f"setting {getattr(cfg, 'unet_activation_checkpointing', False)!r})")
    if resolve_activation_checkpointing(getattr(cfg, "vae_activation_checkpointing", False), device,
                                        "system.guidance.vae_activation_checkpointing"):
        n = enable_activation_checkpointing(vae_encoder_blocks(vae))
        log(f"VAE encoder activation checkpointing ({n} blocks; setting "
            f"{getattr(cfg, 'vae_activation_checkpointing', False)!r})")
    if getattr(cfg, "compile_unet", False):
        unet.compile(**_to_dict(cfg.compile_unet_params))
        log(f"torch.compile(UNet, {_to_dict(cfg.compile_unet_params)})")


def _needs_grad(args, kwargs, module) -> bool:
    if not torch.is_grad_enabled():
        return False
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return True
        if isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) and x.requires_grad for x in v):
            return True
    return any(p.requires_grad for p in module.parameters())  # e.g. LODS' LoRA tensors


def enable_activation_checkpointing(blocks) -> int:
    """Activation checkpointing (``torch.utils.checkpoint``, non-reentrant) of each module in ``blocks``: its
    forward keeps only its inputs and recomputes its activations in the backward -- the same values (the same
    kernels on the same inputs), less memory.  Applied only when a gradient flows through the call (grad mode on
    and an input or a parameter of the block requires grad); a no-grad call is the plain forward.  Returns the
    number of blocks wrapped (idempotent).  A block with ``_scoredistill_checkpoint_off = True`` runs plainly (code
    whose forward depends on state outside the inputs that changes before the backward, e.g. LODS' LoRA branch
    switching peft adapters on for the call only: a recomputation would not see the adapter)."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for block in blocks:
        if block is None or getattr(block, "_scoredistill_checkpointed", False):
            continue
        orig = block.forward

        def forward(*args, _orig=orig, _block=block, **kwargs):
            if _needs_grad(args, kwargs, _block) and not getattr(_block, "_scoredistill_checkpoint_off", False):
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
            return _orig(*args, **kwargs)

        block.forward = forward
        block._scoredistill_checkpointed = True
        n += 1
    return n


def unet_blocks(unet) -> list:
    """The UNet's down / mid / up blocks (diffusers ``UNet2DConditionModel``; other classes: none)."""
    return list(getattr(unet, "down_blocks", [])) + [getattr(unet, "mid_block", None)] + list(getattr(unet, "up_blocks", []))


def vae_encoder_blocks(vae) -> list:
    """The VAE encoder's down blocks and mid block (diffusers ``AutoencoderKL``)."""
    enc = getattr(vae, "encoder", None)
    return [] if enc is None else list(getattr(enc, "down_blocks", [])) + [getattr(enc, "mid_block", None)]


def weights_device(module) -> Optional[torch.device]:
    """Device of a module's first parameter (``cpu`` under sequential offload); ``None`` without parameters."""
    p = next(module.parameters(), None)
    return None if p is None else p.device
