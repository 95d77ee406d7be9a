import torch
torch.set_num_threads(1)
from scoredistill.bench.exact_score_bench import ExactScoreConfig, build_prior
from scoredistill.maths.uds import uds_generation_grad
from scoredistill.maths.diffusion import sds_grad
cfg = ExactScoreConfig(); prior = build_prior(cfg); AC = prior.alphas_cumprod.float()
B=16; cond, unc = prior.embedding(0,B), prior.embedding(None,B)
eps = lambda z,t,e: prior(z,t,e).sample
g = torch.Generator().manual_seed(10_000)
mu = prior.means[0].reshape(4,-1).float()
def analyse(x, tag):
    xf = x.flatten(1); near = mu[torch.cdist(xf,mu).argmin(-1)]
    acc = {k: torch.zeros_like(x) for k in ('recon','cls','uds','sds')}
    R=64
    for r in range(R):
        t = torch.randint(0, 1000, (B,), generator=g); n = torch.randn(x.shape, generator=g)
        u = uds_generation_grad(eps, x, t, cond, unc, AC, noise=n)
        acc['recon'] += u.weight*u.recon/R; acc['cls'] += u.weight*7.5*u.cls/R; acc['uds'] += u.grad/R
        ts = torch.randint(20, 981, (B,), generator=g)
        acc['sds'] += sds_grad(eps, x, ts, cond, unc, AC, guidance_scale=7.5, noise=n)/R
    for k,v in acc.items():
        v=v.flatten(1)
        print(tag, k, 'E[g] rms %.4f' % float(v.pow(2).mean().sqrt()), 'cos(-E[g], mu_near - x) %.3f' % float(torch.nn.functional.cosine_similarity(-v, near-xf).mean()))
x = torch.randn(B,4,8,8, generator=g)
analyse(x, 'start N(0,I)')
xm = (mu[torch.arange(B)%4] + 0.3*torch.randn(B,256,generator=g)).reshape(B,4,8,8)
analyse(xm, 'mean+0.3 noise')
