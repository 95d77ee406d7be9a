import torch
torch.set_num_threads(1)
from scoredistill.bench.exact_score_bench import ExactScoreConfig, build_prior, make_context, measure
from scoredistill.maths.diffusion import cfg_combine
from scoredistill.maths import ge3d as G
cfg = ExactScoreConfig(seeds=(0,))
prior = build_prior(cfg)
AC = prior.alphas_cumprod.float()
B=16
cond, uncond = prior.embedding(0, B), prior.embedding(None, B)
eu = lambda x,t: prior(x, torch.full((B,),t), uncond).sample
def eg(x,t):
    tt=torch.full((B,),t); c,u = prior(torch.cat([x,x]), torch.cat([tt,tt]), torch.cat([cond,uncond])).sample.chunk(2); return cfg_combine(c,u,7.5)
g = torch.Generator().manual_seed(10_000)
x = torch.randn(B, 4,8,8, generator=g)
ts=[20,70,120,170,220,270,320]
mu = prior.means[0].reshape(4,-1).float()
xf=x.flatten(1); near = mu[torch.cdist(xf,mu).argmin(-1)].reshape(B,4,8,8)
grad, info = G.ge3d_grad(eu, eg, x, ts, AC, weights=G.dbc_weights(6,0,400))
xs, xt = info['xs'], info['xs_tilde']
rms=lambda v: float(v.flatten(1).pow(2).mean(-1).sqrt().mean())
cs=lambda a,b: float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean())
print('weights', info['weights'])
for i in range(7):
    a = AC[ts[i]].sqrt()
    print(i, ts[i], 'rms xs', round(rms(xs[i]),3), 'rms xt', round(rms(xt[i]),3), 'rms diff', round(rms(xs[i]-xt[i]),3), 'cos(-(x_i - xt_i), a mu - x_i)', round(cs(-(xs[i]-xt[i]), a*near - xs[i]),3), ' xt_i/a dist to near', round(rms(xt[i]/a-near),3), 'xs_i/a dist', round(rms(xs[i]/a - near),3))
d = torch.randn_like(x)*0.005
g2,_ = G.ge3d_grad(eu, eg, x+d, ts, AC, weights=G.dbc_weights(6,0,400))
print('g rms', rms(grad), 'perturb 0.005 -> change in g rms', rms(g2-grad), 'cos', cs(grad,g2))
# single-node contributions sensitivity
for i in range(6):
    print(i, 'term change', rms((info['xs'][i]-info['xs_tilde'][i]) - (_[ 'xs'][i]-_['xs_tilde'][i])))
