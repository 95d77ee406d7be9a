"""LODS embedding rows of the exact-score benchmark: does α move, and how much of the result is α's doing?

For each LODS row (paper settings) and seed: the Eq. 8 gradient w.r.t. α's selection channels at step 0, α's
selection weights (prompt 0, prompt 1, marginal) after the run, and the final metrics -- with α learning (the
benchmark row) and with α frozen at ∅ (``aux_update=False``: normalised SDS at the same CFG, same noise draws
for the θ step).  Same loop as ``exact_score_bench.run_one``.
"""
import sys

import torch

from scoredistill.bench import exact_score_bench as esb
from scoredistill.bench.methods import make_method
from scoredistill.maths.diffusion import grad_to_loss

torch.set_num_threads(1)
cfg = esb.ExactScoreConfig()
prior = esb.build_prior(cfg)
seeds = [int(s) for s in sys.argv[1:]] or list(cfg.seeds)


def run_sds(scale, seed):
    spec = esb.MethodSpec("sds", "sds", {"guidance_scale": scale})
    return esb.run_one(prior, spec, cfg, seed)["final"]


def run(spec, seed, aux_update):
    torch.manual_seed(seed)
    ctx = esb.make_context(prior, cfg)
    m = make_method(spec.name, ctx, **{**spec.options, "aux_update": aux_update})
    x = torch.randn(cfg.particles, *cfg.latent_shape, generator=torch.Generator().manual_seed(10_000 + seed)).requires_grad_(True)
    opt = esb.make_optimizer(x, spec, cfg)
    m.learner.initialise_alpha(ctx.uncond)
    probe_rng = torch.Generator().manual_seed(99)  # not the global RNG: the run's draws stay the benchmark's
    g0 = torch.autograd.grad(m.learner.aux_loss(x.detach(), ctx.uncond.expand(cfg.particles, -1, -1), generator=probe_rng),
                             m.learner.alpha)[0]
    for step in range(cfg.steps):
        grad = m.grad(x, step)
        opt.zero_grad(set_to_none=True)
        (grad_to_loss(x, grad.to(x.dtype)) * x.shape[0]).backward()
        opt.step()
    w = m.learner.alpha.detach()[0, : prior.num_prompts + 1]
    return g0[0, : prior.num_prompts + 1], w, esb.measure(prior, x.detach(), cfg)


for spec in esb.select_specs(["LODS (embedding, 2D setting)", "LODS (embedding, NeRF setting)"]):
    for seed in seeds:
        g0, w, learn = run(spec, seed, True)
        _, _, frozen = run(spec, seed, False)
        s_eff = 1.0 / (1.0 - float(w.sum()))
        sds = run_sds(s_eff, seed)
        fmt = lambda d: {k: round(v, 3) for k, v in d.items()}  # noqa: E731
        print(f"{spec.label} seed {seed}: |dEq8/dα| at step 0 {[f'{v:.2f}' for v in g0.abs().tolist()]}; "
              f"α after {cfg.steps} steps {[round(v, 4) for v in w.tolist()]}; learning {fmt(learn)}; α frozen {fmt(frozen)}; "
              f"SDS at CFG 1/(1-Σα) = {s_eff:.1f}: {fmt(sds)}",
              flush=True)
