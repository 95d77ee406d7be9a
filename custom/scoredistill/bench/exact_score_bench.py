"""Exact-score benchmark: distil a known Gaussian-mixture distribution with each guidance and measure the result.

The "diffusion model" is :class:`~scoredistill.testing.exact_score_prior.ExactScorePrior`, whose noise prediction
is the exact MMSE noise of a Gaussian mixture (so every difference between methods is the method's, not a
network's error).  ``P`` prompts each own ``K`` components ``N(mu_k, s^2 I)`` in a latent space ``(C, H, W)``; the
unconditional model is the mixture of all prompts.  ``N`` particles (latents, the 2D stand-in for ``N``
independent 3D scenes) start from ``N(0, I)`` and are optimised with Adam (or a row's own optimiser,
:attr:`MethodSpec.optimizer`) on the guidance's loss
(:func:`scoredistill.maths.diffusion.grad_to_loss`, i.e. gradient = the guidance's update) for a number of
steps.  Measured, per method and seed (:mod:`scoredistill.bench.metrics`):

* fidelity: mean RMS distance of the particles to the nearest component mean of the prompt (a data sample
  sits at ``s``);
* saturation: RMS norm of the particles / exact RMS norm of the prompt's data (1 = as the data);
* diversity: share of the prompt's ``K`` components with a particle within ``reach_factor·s`` of their mean;
* steps to converge: first logged step after which the fidelity curve stays within 5 % (of its initial value)
  of its final value.

Command (prints the table, writes ``exact_score.csv``, ``exact_score.md`` and ``exact_score.png``)::

    python -m scoredistill.bench.exact_score_bench --out benchmarks/results
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import metrics
from .counting import CountingUNet
from .methods import DistillContext, MethodSpec, MethodUnavailable, default_specs, make_method


@dataclass
class ExactScoreConfig:
    """Benchmark settings (defaults: the published table)."""

    num_prompts: int = 2
    num_components: int = 4
    latent_shape: tuple = (4, 8, 8)
    mean_scale: float = 1.0
    std: float = 0.1
    prior_seed: int = 0
    prompt: int = 0
    particles: int = 16
    steps: int = 400
    lr: float = 0.03
    seeds: tuple = (0, 1, 2)
    log_every: int = 10
    reach_factor: float = 3.0
    converge_rtol: float = 0.05

    def validate(self) -> None:
        """Raises ValueError naming the bad setting."""
        if self.num_prompts < 2:
            raise ValueError(f"num_prompts must be >= 2 (CFG needs another prompt), got {self.num_prompts}")
        if not 0 <= self.prompt < self.num_prompts:
            raise ValueError(f"prompt must be in [0, {self.num_prompts - 1}], got {self.prompt}")
        for name in ("num_components", "particles", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("std", "lr", "mean_scale", "reach_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if len(self.seeds) < 1:
            raise ValueError("seeds must name at least one seed")


def build_prior(cfg: ExactScoreConfig):
    from scoredistill.testing.exact_score_prior import ExactScorePrior

    return ExactScorePrior.random(
        num_prompts=cfg.num_prompts, num_components=cfg.num_components, latent_shape=cfg.latent_shape,
        mean_scale=cfg.mean_scale, std=cfg.std, seed=cfg.prior_seed,
    )


def make_context(prior, cfg: ExactScoreConfig) -> DistillContext:
    return DistillContext(
        unet=CountingUNet(prior), alphas_cumprod=prior.alphas_cumprod.float(),
        cond=prior.embedding(cfg.prompt), uncond=prior.embedding(None), total_steps=cfg.steps, uses_real_unet=False,
    )


def measure(prior, x: torch.Tensor, cfg: ExactScoreConfig) -> Dict[str, float]:
    """Fidelity, saturation and diversity of particles ``x`` ``(N, C, H, W)`` for the prompt."""
    means, stds, w = prior.means[cfg.prompt], prior.stds[cfg.prompt], prior.weights[cfg.prompt]
    return {
        "fidelity": float(metrics.fidelity_distance(x, means).mean()),
        "saturation": metrics.saturation_ratio(x, means, stds, w),
        "diversity": metrics.diversity(x, means, cfg.reach_factor * stds),
    }


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(x: torch.Tensor, spec: MethodSpec, cfg: ExactScoreConfig) -> torch.optim.Optimizer:
    """Adam at ``cfg.lr`` (default) or the spec's own ``optimizer=(kind, lr)``, kind in :data:`OPTIMIZERS`
    (``"sgd"``: plain gradient descent ``x <- x - lr * grad``).

    Raises:
        ValueError: unknown kind or lr <= 0.
    """
    kind, lr = spec.optimizer if spec.optimizer is not None else ("adam", cfg.lr)
    if kind not in OPTIMIZERS:
        raise ValueError(f"{spec.label}: optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    if not lr > 0:
        raise ValueError(f"{spec.label}: optimizer lr must be > 0, got {lr!r}")
    return torch.optim.Adam([x], lr=lr) if kind == "adam" else torch.optim.SGD([x], lr=lr)


def run_one(prior, spec: MethodSpec, cfg: ExactScoreConfig, seed: int) -> Dict:
    """Optimise ``cfg.particles`` particles with one method and seed; returns the curves and final metrics."""
    torch.manual_seed(seed)
    ctx = make_context(prior, cfg)
    method = make_method(spec.name, ctx, **spec.options)
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(cfg.particles, *cfg.latent_shape, generator=g).requires_grad_(True)
    opt = make_optimizer(x, spec, cfg)
    from scoredistill.maths.diffusion import grad_to_loss

    steps, curves = [], {"fidelity": [], "saturation": [], "diversity": []}

    def log(step):
        m = measure(prior, x.detach(), cfg)
        steps.append(step)
        for k in curves:
            curves[k].append(m[k])

    log(0)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        grad = method.grad(x, step)
        opt.zero_grad(set_to_none=True)
        # grad_to_loss averages over the batch; multiply back so each particle gets its own update
        (grad_to_loss(x, grad.to(x.dtype)) * x.shape[0]).backward()
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log(step + 1)
    seconds = time.perf_counter() - t0
    final = measure(prior, x.detach(), cfg)
    cost = ctx.unet.snapshot().per(cfg.steps)
    return {
        "label": spec.label, "seed": seed, "steps": steps, "curves": curves, "final": final,
        "steps_to_converge": metrics.steps_to_converge(curves["fidelity"], steps, cfg.converge_rtol),
        "seconds": seconds, "unet_samples_per_step": cost["samples"], "particles": x.detach(),
    }


def run(specs: Sequence[MethodSpec], cfg: ExactScoreConfig, log=print) -> Dict[str, Dict]:
    """Run every spec over ``cfg.seeds``; returns ``label -> {"runs": [...], "unavailable": reason or None}``."""
    cfg.validate()
    prior = build_prior(cfg)
    out: Dict[str, Dict] = {}
    for spec in specs:
        runs, reason = [], None
        for seed in cfg.seeds:
            try:
                runs.append(run_one(prior, spec, cfg, seed))
            except MethodUnavailable as e:
                reason = str(e)
                break
        out[spec.label] = {"spec": spec, "runs": runs, "unavailable": reason}
        if log is not None:
            if reason:
                log(f"[exact-score] {spec.label}: not run ({reason})")
            else:
                s = summarize(runs)
                log(f"[exact-score] {spec.label}: fidelity {s['fidelity'][0]:.4f}  saturation {s['saturation'][0]:.3f}  "
                    f"diversity {s['diversity'][0]:.2f}  ({sum(r['seconds'] for r in runs):.1f} s)")
    return out


def _mean_std(v: Sequence[float]):
    t = torch.tensor(list(v), dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(v) > 1 else 0.0


def summarize(runs: List[Dict]) -> Dict[str, tuple]:
    """Mean and std over seeds of the final metrics and of the steps to converge."""
    s = {k: _mean_std([r["final"][k] for r in runs]) for k in ("fidelity", "saturation", "diversity")}
    s["steps_to_converge"] = _mean_std([r["steps_to_converge"] for r in runs])
    s["unet_samples_per_step"] = _mean_std([r["unet_samples_per_step"] for r in runs])
    return s


BASELINE = "SDS (CFG 100)"


def table_rows(results: Dict[str, Dict], cfg: ExactScoreConfig) -> List[Dict]:
    """One dict per method with the summary and the comparison with SDS at CFG 100."""
    base = summarize(results[BASELINE]["runs"]) if results.get(BASELINE, {}).get("runs") else None
    rows = []
    for label, res in results.items():
        if not res["runs"]:
            rows.append({"method": label, "status": "not run: " + (res["unavailable"] or "?")})
            continue
        s = summarize(res["runs"])
        row = {"method": label, "status": "ok"}
        for k in ("fidelity", "saturation", "diversity", "steps_to_converge", "unet_samples_per_step"):
            row[k], row[k + "_std"] = s[k]
        if base is not None and label != BASELINE:
            row["beats_sds100_fidelity"] = s["fidelity"][0] < base["fidelity"][0]
            # saturation: closer to the data's norm (ratio 1) is better
            row["beats_sds100_saturation"] = abs(s["saturation"][0] - 1) < abs(base["saturation"][0] - 1)
        rows.append(row)
    return rows


def format_table(results: Dict[str, Dict], cfg: ExactScoreConfig) -> str:
    """Markdown table (mean ± std over seeds) with the verdict against SDS at CFG 100."""
    rows = table_rows(results, cfg)
    base = next((r for r in rows if r["method"] == BASELINE and r["status"] == "ok"), None)
    head = ("| method | fidelity: RMS dist. to prompt (↓) | saturation: norm / data norm (→1) | diversity: "
            "components reached (↑) | steps to converge | UNet samples / step | vs SDS CFG 100: fidelity | "
            "vs SDS CFG 100: saturation |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']} | | | | | | |")
            continue
        if base is None or r["method"] == BASELINE:
            vf = vs = "(baseline)" if r["method"] == BASELINE else "n/a"
        else:
            vf = (f"{'**better**' if r['beats_sds100_fidelity'] else 'worse'}: {r['fidelity']:.4f} vs {base['fidelity']:.4f}")
            vs = (f"{'**better**' if r['beats_sds100_saturation'] else 'worse'}: |{r['saturation']:.3f}−1| vs "
                  f"|{base['saturation']:.3f}−1|")
        lines.append(
            f"| {r['method']} | {r['fidelity']:.4f} ± {r['fidelity_std']:.4f} | {r['saturation']:.3f} ± "
            f"{r['saturation_std']:.3f} | {r['diversity']:.2f} ± {r['diversity_std']:.2f} | "
            f"{r['steps_to_converge']:.0f} ± {r['steps_to_converge_std']:.0f} | {r['unet_samples_per_step']:.0f} | {vf} | {vs} |"
        )
    K = cfg.num_components
    lines.append("")
    lines.append(
        f"Prior: {cfg.num_prompts} prompts × {K} components, latent {tuple(cfg.latent_shape)} "
        f"(D = {math.prod(cfg.latent_shape)}), means ~ N(0, {cfg.mean_scale}²), component std s = {cfg.std} "
        f"(a data sample's fidelity distance ≈ {cfg.std}); {cfg.particles} particles from N(0, I), Adam lr {cfg.lr} "
        f"(rows marked 'plain GD': x ← x − step·grad), "
        f"{cfg.steps} steps, seeds {list(cfg.seeds)}; diversity radius {cfg.reach_factor}·s; "
        f"CFG in the ε(∅)+s·(ε(y)−ε(∅)) convention."
    )
    return "\n".join(lines)


def write_csv(results: Dict[str, Dict], cfg: ExactScoreConfig, path: str) -> None:
    rows = table_rows(results, cfg)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def plot(results: Dict[str, Dict], cfg: ExactScoreConfig, path: str) -> None:
    """Fidelity and saturation curves (mean over seeds) and the final particles projected on the prompt's means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for label, res in results.items():
        if not res["runs"]:
            continue
        steps = res["runs"][0]["steps"]
        for ax, key in zip(axes[:2], ("fidelity", "saturation")):
            v = torch.tensor([r["curves"][key] for r in res["runs"]]).mean(0)
            ax.plot(steps, v.numpy(), label=label)
    axes[0].axhline(cfg.std, color="k", ls=":", lw=1, label="data sample (s)")
    axes[0].set(title="fidelity: RMS distance to the prompted mixture", xlabel="step", yscale="log")
    axes[1].axhline(1.0, color="k", ls=":", lw=1, label="data")
    axes[1].set(title="saturation: RMS norm / data RMS norm", xlabel="step")
    axes[0].legend(fontsize=7)
    # 2-D projection: the plane through the prompt's first three component means
    prior = build_prior(cfg)
    mu = prior.means[cfg.prompt].reshape(cfg.num_components, -1)
    others = prior.means.reshape(-1, mu.shape[1])
    basis_src = mu[1:3] - mu[0] if cfg.num_components >= 3 else torch.randn(2, mu.shape[1], dtype=mu.dtype)
    q, _ = torch.linalg.qr(basis_src.T)
    proj = lambda v: ((v.reshape(v.shape[0], -1).double() - mu[0]) @ q).numpy()  # noqa: E731
    ax = axes[2]
    pm = proj(others)
    ax.scatter(pm[:, 0], pm[:, 1], marker="x", c="lightgray", s=60, label="other prompts' means")
    pm = proj(mu)
    ax.scatter(pm[:, 0], pm[:, 1], marker="*", c="k", s=140, label="prompt's means", zorder=5)
    for label, res in results.items():
        if res["runs"]:
            p = proj(res["runs"][0]["particles"])
            ax.scatter(p[:, 0], p[:, 1], s=10, label=label, alpha=0.7)
    ax.set(title="final particles (seed 0), plane of 3 prompted means")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: the prior's latents are 8x8: the paper-size U-Lite (5 down-samplings) would pad them to 64x64 and dominate the
#: run time, so the exact-score benchmark uses a 2-level U-Lite (same blocks, widths 16-32-64)
EXACT_SCORE_OVERRIDES = {"vdm": {"operator_widths": (16, 32, 64)}}


def select_specs(names: Optional[Sequence[str]]) -> List[MethodSpec]:
    specs = []
    for s in default_specs():
        if s.name in EXACT_SCORE_OVERRIDES:
            s = MethodSpec(s.label, s.name, {**s.options, **EXACT_SCORE_OVERRIDES[s.name]},
                           s.note + "; here a 2-level U-Lite (widths 16-32-64) for the 8x8 latents", s.optimizer)
        specs.append(s)
    if not names:
        return specs
    chosen = [s for s in specs if s.label in names or s.name in names]
    if not chosen:
        raise ValueError(f"--methods must name some of {[s.label for s in specs]}, got {list(names)}")
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scoredistill.bench.exact_score_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for exact_score.{csv,md,png}")
    p.add_argument("--methods", nargs="*", help="method names or labels (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(ExactScoreConfig.seeds))
    p.add_argument("--steps", type=int, default=ExactScoreConfig.steps)
    p.add_argument("--particles", type=int, default=ExactScoreConfig.particles)
    p.add_argument("--lr", type=float, default=ExactScoreConfig.lr)
    p.add_argument("--components", type=int, default=ExactScoreConfig.num_components)
    p.add_argument("--std", type=float, default=ExactScoreConfig.std)
    p.add_argument("--latent-shape", type=int, nargs=3, default=list(ExactScoreConfig.latent_shape))
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    cfg = ExactScoreConfig(num_components=a.components, latent_shape=tuple(a.latent_shape), std=a.std,
                           particles=a.particles, steps=a.steps, lr=a.lr, seeds=tuple(a.seeds))
    try:
        cfg.validate()
        specs = select_specs(a.methods)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(1)  # tiny tensors: one thread is ~100x faster than two contended ones
    results = run(specs, cfg)
    table = format_table(results, cfg)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "exact_score.md"), "w") as f:
        f.write(table + "\n")
    write_csv(results, cfg, os.path.join(a.out, "exact_score.csv"))
    if not a.no_plot:
        plot(results, cfg, os.path.join(a.out, "exact_score.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
