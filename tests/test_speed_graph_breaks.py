"""Issue 26: the UNet-call path of the pack's guidances compiles as ONE graph (no graph break), so that
``torch.compile`` / CUDA graphs can capture it.  Counted with ``torch._dynamo.explain`` on the tiny UNet (CPU).

Covered: ``forward_unet`` on a CFG pair (every guidance's UNet call: GE3D's trajectory, UDS, VDM and HiFA go
through it), and LODS' embedding variant (``learner.predict``: the batched [cond; α] call; ``learnable_branch``: the Eq. 8 call).
Not covered: LODS' LoRA variant (``lora_branch`` toggles peft adapters and ``requires_grad_``: 2 graph breaks,
measured; not a Gaussian config), and ``predict_noise_cfg`` as a whole (measured: 2 graphs, the UNet call and the
CFG combination, with a break between them that dynamo gives no reason for) -- see README "Speed".
"""
import pytest
import torch

from harness import make_prompt_utils, one_thread_fixture, tiny_guidance_config

_one_thread = one_thread_fixture()


def _explain(fn, *args):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)(*args)
    finally:
        torch._dynamo.reset()


def _assert_one_graph(ex):
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(b.reason)[:300] for b in ex.break_reasons]


@pytest.mark.threestudio
@pytest.mark.slow
def test_unet_call_path_has_no_graph_break(tiny_sd, threestudio_module, tmp_path):
    pu = make_prompt_utils(threestudio_module, tiny_sd, tmp_path)
    g = threestudio_module.find("vdm-guidance")(tiny_guidance_config(tiny_sd, image_size=16))
    B = 2
    x = torch.randn(B, 4, 8, 8)
    t = torch.tensor([10, 700])
    el, az, d = torch.tensor([10.0, 20.0]), torch.tensor([0.0, 90.0]), torch.tensor([2.0, 2.0])
    emb = g.text_embeddings_for(pu, el, az, d)
    _assert_one_graph(_explain(g.forward_unet, torch.cat([x, x]), torch.cat([t, t]), emb[0]))  # the CFG pair


@pytest.mark.threestudio
@pytest.mark.slow
def test_lods_embedding_unet_calls_have_no_graph_break(tiny_sd, threestudio_module):
    g = threestudio_module.find("lods-guidance")(tiny_guidance_config(tiny_sd, image_size=16))
    E = g.unet.config.cross_attention_dim
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 20])
    c, u = torch.randn(2, 77, E), torch.randn(2, 77, E)
    g.learner.initialise_alpha(u)
    _assert_one_graph(_explain(g.learner.predict, x, t, c, u))
    _assert_one_graph(_explain(g.learner.learnable_branch, x, t, u))
