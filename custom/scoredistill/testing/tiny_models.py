"""Tiny random-weight models with the real architectures' classes, for tests and CPU smoke runs.

Nothing here downloads anything: each builder constructs a model from a small config with random
weights and writes it with ``save_pretrained`` into a folder, which is then loaded back through the
same ``from_pretrained(name_or_path)`` code the pack uses for real checkpoints.

* :func:`build_tiny_stable_diffusion` -- a ``StableDiffusionPipeline`` folder (UNet, VAE, CLIP text
  encoder, a CLIP tokenizer whose byte-level vocabulary and merges are written here, DDIM scheduler
  with Stable Diffusion's ``scaled_linear`` betas 0.00085-0.012 over 1000 steps).
* :func:`build_tiny_dpt` -- a ``DPTForDepthEstimation`` folder (HiFA's disparity regulariser).
* :func:`build_tiny_clip` -- a ``CLIPModel`` folder with processor (CLIP-score evaluation).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from typing import Dict, List

import torch


def _atomic_build(marker: str):
    """Decorator for ``build_*(folder, ...)``: build into a private temporary folder next to ``folder`` and rename
    it into place, so a killed build leaves no half-written model and concurrent builders (pytest-xdist workers,
    parallel developers' runs) never read each other's partial files.  A folder holding ``marker`` is returned
    unchanged; if another process renamed first, its folder is kept and this build discarded."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(folder: str, *args, **kwargs) -> str:
            folder = os.path.abspath(folder)
            if os.path.exists(os.path.join(folder, marker)):
                return folder
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=os.path.dirname(folder))
            try:
                fn(tmp, *args, **kwargs)
                try:
                    os.rename(tmp, folder)
                except OSError:
                    if not os.path.exists(os.path.join(folder, marker)):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return folder

        return wrapper

    return deco


#: Stable Diffusion's noise schedule (v1.x / 2.x base): scaled_linear betas 0.00085 -> 0.012, 1000 steps.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
_WORD_MERGES = ["a n", "t h", "th e</w>", "o n</w>", "a n</w>", "e r", "i n", "in g</w>", "o r</w>", "e s</w>"]


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table (printable stand-ins for the 256 byte values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_clip_tokenizer_files(folder: str) -> List[str]:
    """Write ``vocab.json`` and ``merges.txt`` of a byte-level CLIP BPE tokenizer (~530 tokens).

    Every single byte (with and without the end-of-word marker ``</w>``) is a token, so any text
    tokenizes; a few merges make common English pairs single tokens.  Returns the written paths.
    """
    os.makedirs(folder, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    for merge in _WORD_MERGES:
        merged = merge.replace(" ", "")
        if merged not in vocab_list:
            vocab_list.append(merged)
    vocab_list += _SPECIAL
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(_WORD_MERGES) + "\n")
    return [vocab_path, merges_path]


@_atomic_build("model_index.json")
def build_tiny_stable_diffusion(
    folder: str, seed: int = 0, sample_size: int = 8, hidden_size: int = 32, vae_scale_factor: int = 2
) -> str:
    """Write a tiny random ``StableDiffusionPipeline`` to ``folder`` and return the folder.

    UNet: ``UNet2DConditionModel`` with block channels (32, 64), cross-attention dim ``hidden_size``,
    4 latent channels, ``sample_size`` latent resolution in the config (any multiple of 4 runs).
    VAE: ``AutoencoderKL``; ``vae_scale_factor`` 2 (two blocks: a 64x64 image has 32x32 latents, the cheap
    default) or 8 (four blocks, Stable Diffusion's factor: 512x512 -> 64x64, for code that hard-codes it,
    such as threestudio's ``stable-diffusion-guidance``).
    Text encoder: ``CLIPTextModel`` (2 layers, hidden ``hidden_size``, 77 positions).
    Already-built folders (``model_index.json`` present) are returned unchanged.

    Raises:
        ValueError: ``vae_scale_factor`` not 2 or 8.
    """
    vae_blocks = {2: (16, 32), 8: (8, 8, 16, 16)}
    if vae_scale_factor not in vae_blocks:
        raise ValueError(f"vae_scale_factor must be 2 or 8, got {vae_scale_factor}")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden_size,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks[vae_scale_factor]),
        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks[vae_scale_factor]),
        block_out_channels=vae_blocks[vae_scale_factor],
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size * vae_scale_factor,
    )
    tok_dir = os.path.join(folder, "_tokenizer_src")
    write_tiny_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(
        vocab=os.path.join(tok_dir, "vocab.json"), merges=os.path.join(tok_dir, "merges.txt"), model_max_length=77
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@_atomic_build("config.json")
def build_tiny_dpt(folder: str, seed: int = 0, image_size: int = 32) -> str:
    """Write a tiny random ``DPTForDepthEstimation`` (+ ``DPTImageProcessor``) to ``folder``."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(seed)
    config = DPTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
        head_in_index=-1,
        is_hybrid=False,
    )
    model = DPTForDepthEstimation(config)
    model.save_pretrained(folder)
    DPTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


@_atomic_build("config.json")
def build_tiny_clip(folder: str, seed: int = 0, image_size: int = 32) -> str:
    """Write a tiny random ``CLIPModel`` with a ``CLIPProcessor`` (tiny tokenizer) to ``folder``."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tokenizer_src")
    write_tiny_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(
        vocab=os.path.join(tok_dir, "vocab.json"), merges=os.path.join(tok_dir, "merges.txt"), model_max_length=77
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8,
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=16)
    model = CLIPModel(config)
    model.save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder
