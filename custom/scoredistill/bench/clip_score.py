"""CLIP score of a finished run's test renders against its prompt (the papers' evaluation), written as JSON.

CLIP score (Hessel et al. 2021, as torchmetrics' ``CLIPScore``): ``100 · max(cos(E_img(x), E_txt(y)), 0)`` per
image, with transformers' ``CLIPModel`` / ``CLIPProcessor`` (default ``openai/clip-vit-large-patch14``, ViT-L/14,
as in the papers); the JSON holds the mean, std, min, max and the per-image scores.

CLIP R-Precision (DreamFusion, Poole et al. 2022, Sec. 4, after Park et al. 2021): the share of renders from which
CLIP retrieves the scene's own caption, top-1, among a set of candidate captions (DreamFusion: 153 COCO prompts;
the suite report: the suite's prompts), with CLIP B/32 and L/14 as DreamFusion reports: :func:`retrieval_hits`,
:func:`clip_metrics`, used by ``scoredistill suite report`` (:mod:`scoredistill.suite.report`).

Inputs:

* a threestudio trial folder (``outputs/<name>/<tag>@<time>``): the images of the last ``save/it*-test`` folder
  (threestudio's test renders, one PNG per view) and the prompt from ``configs/parsed.yaml``
  (``system.prompt_processor.prompt``) unless ``--prompt`` is given;
* or any folder of images (``--prompt`` required), or image files.

threestudio saves each test view as a row of panels (RGB, then normal / opacity ...) side by side; by default
(``--panel first``) only the first, square panel (the RGB render) is scored when the image is a horizontal strip
of square panels (width a multiple of the height); ``--panel full`` scores the whole image.

Command::

    python -m scoredistill.bench.clip_score outputs/ge3d-gs/a_corgi@20250101-000000 --out clip.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

import torch

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PANELS = ("first", "full")


class ClipModelError(RuntimeError):
    """A CLIP model that cannot be loaded; the message is one line naming the model and how to get it."""


def clip_model_error(model_name: str, exc: BaseException) -> ClipModelError:
    """The one-line error for a CLIP model that failed to load with ``exc``."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(reason) > 160:
        reason = reason[:157] + "..."
    looks_local = os.path.isabs(model_name) or model_name.startswith(".") or os.path.exists(model_name)
    if looks_local:
        how = ("pass --clip-model a folder written by CLIPModel.save_pretrained + CLIPProcessor.save_pretrained "
               "(config.json, weights, tokenizer and preprocessor files) or a Hub name")
    else:
        how = (f"download it once with `huggingface-cli download {model_name}` (network needed; afterwards it loads "
               "offline from the Hugging Face cache) or pass --clip-model a local CLIPModel folder")
    return ClipModelError(f"CLIP model {model_name!r} cannot be loaded ({type(exc).__name__}: {reason}); {how}")


def load_clip(model_name: str, device: str = "cpu"):
    """``(CLIPModel in eval mode on device, CLIPProcessor)``.

    Raises:
        ClipModelError: the model or its processor cannot be loaded (missing, not downloaded, not a CLIP folder).
    """
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(model_name).to(device).eval()
        processor = CLIPProcessor.from_pretrained(model_name)
    except Exception as e:  # OSError (missing / offline), ValueError / KeyError (not a CLIP folder), ...
        raise clip_model_error(model_name, e) from e
    return model, processor


def _it(path: str) -> int:
    m = re.search(r"it(\d+)-test$", os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else -1


def find_test_images(run_dir: str) -> List[str]:
    """Images of a run: the latest ``save/it<N>-test`` folder of a trial folder, else the folder's own images.

    Raises:
        FileNotFoundError: no images found.
    """
    if os.path.isfile(run_dir):
        return [run_dir]
    tests = [d for d in glob.glob(os.path.join(run_dir, "save", "it*-test")) if os.path.isdir(d)]
    folder = max(tests, key=_it) if tests else run_dir
    files = sorted(
        (f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTS)),
        key=lambda f: (int(re.sub(r"\D", "", os.path.basename(f)) or 0), f),
    )
    if not files:
        raise FileNotFoundError(f"no test renders found in {folder} (expected save/it<N>-test/*.png or images)")
    return files


def read_prompt(run_dir: str) -> Optional[str]:
    """``system.prompt_processor.prompt`` from ``<run_dir>/configs/parsed.yaml``, or ``None``."""
    path = os.path.join(run_dir, "configs", "parsed.yaml")
    if not os.path.isfile(path):
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    prompt = OmegaConf.select(cfg, "system.prompt_processor.prompt", default=None)
    return None if prompt is None else str(prompt)


def load_image(path: str, panel: str = "first"):
    """PIL RGB image; with ``panel="first"`` the first square panel of a horizontal strip of square panels."""
    from PIL import Image

    if panel not in PANELS:
        raise ValueError(f"panel must be one of {PANELS}, got {panel!r}")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if panel == "first" and w > h and w % h == 0:
        img = img.crop((0, 0, h, h))
    return img


@torch.no_grad()
def text_embeddings(prompts: Sequence[str], model, processor, device: str = "cpu") -> torch.Tensor:
    """``(P, D)`` unit-norm CLIP text embeddings of ``prompts``."""
    text = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
    t = model.get_text_features(**{k: v.to(device) for k, v in text.items()})
    t = getattr(t, "pooler_output", t)  # transformers versions differ in what they return
    return (t / t.norm(dim=-1, keepdim=True)).float()


@torch.no_grad()
def image_embeddings(images: Sequence, model, processor, device: str = "cpu", batch_size: int = 16) -> torch.Tensor:
    """``(N, D)`` unit-norm CLIP image embeddings of PIL images."""
    out = []
    for i in range(0, len(images), batch_size):
        pix = processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"].to(device)
        v = model.get_image_features(pixel_values=pix)
        v = getattr(v, "pooler_output", v)
        out.append((v / v.norm(dim=-1, keepdim=True)).float())
    return torch.cat(out)


@torch.no_grad()
def clip_scores(images: Sequence, prompt: str, model, processor, device: str = "cpu", batch_size: int = 16) -> torch.Tensor:
    """``(N,)`` CLIP scores ``100·max(cos, 0)`` of PIL images against one prompt."""
    t = text_embeddings([prompt], model, processor, device)
    v = image_embeddings(images, model, processor, device, batch_size)
    return (100.0 * (v @ t.T).squeeze(-1).clamp_min(0)).double().cpu()


def retrieval_hits(image_emb: torch.Tensor, text_emb: torch.Tensor, true_index: int) -> torch.Tensor:
    """CLIP R-Precision's retrieval (DreamFusion, Poole et al. 2022, Sec. 4; Park et al. 2021): each image
    ``(N, D)`` retrieves the caption of highest cosine similarity among ``text_emb`` ``(P, D)``; returns the
    ``(N,)`` bool hits, ``True`` where the retrieved caption is ``true_index``.  A tie with another caption is
    a miss (the image did not single out its caption).  Embeddings need not be normalised."""
    if text_emb.shape[0] < 2:
        raise ValueError(f"R-Precision needs at least 2 captions to retrieve among, got {text_emb.shape[0]}")
    if not 0 <= true_index < text_emb.shape[0]:
        raise ValueError(f"true_index must be in [0, {text_emb.shape[0] - 1}], got {true_index}")
    v = image_emb / image_emb.norm(dim=-1, keepdim=True)
    t = text_emb / text_emb.norm(dim=-1, keepdim=True)
    sim = v @ t.T
    own = sim[:, true_index]
    others = torch.cat([sim[:, :true_index], sim[:, true_index + 1:]], dim=1)
    return own > others.max(dim=1).values


@torch.no_grad()
def clip_metrics(images: Sequence, prompt: str, prompts: Optional[Sequence[str]], model, processor,
                 device: str = "cpu", batch_size: int = 16) -> Dict:
    """CLIP score and CLIP R-Precision of one run's test views, with one pass of the image encoder.

    ``prompts``: the candidate captions of R-Precision (the suite's distinct prompts; ``prompt`` among them);
    ``None`` or fewer than 2 distinct: no R-Precision (``r_precision`` ``None``).  Returns ``clip_score`` (mean
    over views of ``100·max(cos, 0)``), ``per_image`` scores, ``r_precision`` (percent of views whose retrieved
    caption is ``prompt``), ``hits`` per view, ``num_prompts``."""
    v = image_embeddings(images, model, processor, device, batch_size)
    cands = list(dict.fromkeys(prompts or []))
    if prompt not in cands:
        cands = [prompt] + cands
    t = text_embeddings(cands, model, processor, device)
    scores = (100.0 * (v @ t[cands.index(prompt)]).clamp_min(0)).double().cpu()
    res = {"clip_score": float(scores.mean()), "per_image": [float(s) for s in scores], "num_prompts": len(cands),
           "r_precision": None, "hits": None}
    if len(cands) >= 2:
        hits = retrieval_hits(v, t, cands.index(prompt)).cpu()
        res["r_precision"] = 100.0 * float(hits.double().mean())
        res["hits"] = [bool(h) for h in hits]
    return res


def evaluate(run_dir: str, prompt: Optional[str] = None, model_name: str = DEFAULT_MODEL, device: str = "cpu",
             panel: str = "first", batch_size: int = 16) -> Dict:
    """CLIP score of ``run_dir``'s test renders against ``prompt`` (default: the run's own prompt).

    Raises:
        ValueError: no prompt given and none found in the run's ``configs/parsed.yaml``; bad ``panel``.
        FileNotFoundError: no images.
        ClipModelError: the CLIP model cannot be loaded.
    """
    if panel not in PANELS:
        raise ValueError(f"panel must be one of {PANELS}, got {panel!r}")
    files = find_test_images(run_dir)
    if prompt is None:
        prompt = read_prompt(run_dir)
    if not prompt:
        raise ValueError(f"no prompt: pass --prompt (none found in {os.path.join(run_dir, 'configs', 'parsed.yaml')})")
    model, processor = load_clip(model_name, device)
    images = [load_image(f, panel) for f in files]
    s = clip_scores(images, prompt, model, processor, device, batch_size)
    return {
        "run": os.path.abspath(run_dir), "prompt": prompt, "model": model_name, "panel": panel,
        "num_images": len(files), "clip_score_mean": float(s.mean()),
        "clip_score_std": float(s.std(unbiased=False)), "clip_score_min": float(s.min()),
        "clip_score_max": float(s.max()),
        "per_image": {os.path.relpath(f, run_dir) if os.path.isdir(run_dir) else os.path.basename(f): float(v)
                      for f, v in zip(files, s)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scoredistill.bench.clip_score", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="threestudio trial folder, folder of images, or an image")
    p.add_argument("--prompt", default=None, help="default: the run's system.prompt_processor.prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help="CLIPModel name or folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--panel", default="first", choices=PANELS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="JSON path (default: <run>/clip_score.json, or stdout for a file)")
    a = p.parse_args(argv)
    try:
        result = evaluate(a.run, a.prompt, a.model, a.device, a.panel, a.batch_size)
    except (ValueError, FileNotFoundError, ClipModelError) as e:
        p.error(str(e))
    text = json.dumps(result, indent=2)
    out = a.out or (os.path.join(a.run, "clip_score.json") if os.path.isdir(a.run) else None)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(f"CLIP score {result['clip_score_mean']:.2f} ± {result['clip_score_std']:.2f} over {result['num_images']} "
          f"images ({result['model']}, prompt {result['prompt']!r})" + (f" -> {out}" if out else ""))
    if not out:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
