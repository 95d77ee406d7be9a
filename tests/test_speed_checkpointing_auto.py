"""Issue 26 after the H200 run: activation checkpointing ``auto`` (the default) is on only where it is needed.

Measured on the H200 (benchmarks/results/gpu_suite/): with UNet + VAE checkpointing on, every Gaussian config
fits 12 GiB (lods-embedding-gs 19.6 -> 11.1 GiB) but steps are 14-36% slower; so ``auto`` = on for a CUDA
device with < 24 GiB, off on larger ones and on the CPU.  On main (f3fb70f) the settings are booleans,
default true: ``resolve_activation_checkpointing`` does not exist and ``"auto"`` is no accepted value.
"""
import pytest
import torch

from harness import one_thread_fixture

_one_thread = one_thread_fixture()


@pytest.mark.parametrize("value,device,total_gib,expect", [
    ("auto", "cuda", 15.6, True),      # a 16 GB card: needs it
    ("auto", "cuda:0", 23.9, True),
    ("auto", "cuda", 23.6, True),      # a "24 GB" card reports a little less: on
    ("auto", "cuda", 24.0, False),     # the threshold itself: off
    ("auto", "cuda", 139.8, False),    # the H200: would pay 14-36% per step for nothing
    ("auto", "cpu", None, False),
    (True, "cuda", 139.8, True),
    (False, "cuda", 15.6, False),
    (True, "cpu", None, True),
])
def test_auto_checkpointing_follows_the_device_memory(monkeypatch, value, device, total_gib, expect):
    from scoredistill.guidance import memory

    seen = []
    monkeypatch.setattr(memory, "device_total_gib", lambda d: (seen.append(str(d)), total_gib)[1])
    assert memory.resolve_activation_checkpointing(value, device) is expect
    assert seen == ([] if isinstance(value, bool) else [device])


def test_device_total_gib_reads_cuda_properties(monkeypatch):
    from scoredistill.guidance import memory

    class Props:
        total_memory = 16 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    assert memory.device_total_gib("cuda") == 16.0
    assert memory.device_total_gib("cpu") is None


def test_bad_checkpointing_value_is_refused_naming_the_setting():
    from types import SimpleNamespace

    from scoredistill.guidance import memory

    with pytest.raises(ValueError, match=r"^system.guidance.vae_activation_checkpointing must be true, false or 'auto', got 'yes'$"):
        memory.resolve_activation_checkpointing("yes", "cpu", "system.guidance.vae_activation_checkpointing")
    cfg = SimpleNamespace(unet_activation_checkpointing="on", vae_activation_checkpointing="auto",
                          memory_efficient_attention_backend="auto", enable_memory_efficient_attention=False,
                          enable_attention_slicing=False)
    with pytest.raises(ValueError, match=r"system.guidance.unet_activation_checkpointing must be true, false or 'auto', got 'on'"):
        memory.validate_memory_options(cfg, "cpu")


def test_apply_memory_options_uses_the_resolved_choice(monkeypatch):
    """The default ``auto`` wraps the UNet / VAE blocks on a (mocked) 16 GB card and not on a (mocked) H200."""
    from types import SimpleNamespace

    from scoredistill.guidance import memory

    for gib, expect in ((15.6, True), (139.8, False)):
        monkeypatch.setattr(memory, "device_total_gib", lambda d, g=gib: g)
        unet = torch.nn.Module()
        unet.down_blocks, unet.mid_block, unet.up_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)]), None, torch.nn.ModuleList()
        vae = torch.nn.Module()
        vae.encoder = torch.nn.Module()
        vae.encoder.down_blocks, vae.encoder.mid_block = torch.nn.ModuleList([torch.nn.Linear(2, 2)]), None
        cfg = SimpleNamespace(enable_memory_efficient_attention=False, enable_attention_slicing=False,
                              enable_channels_last_format=False, token_merging=False,
                              enable_sequential_cpu_offload=False, unet_activation_checkpointing="auto",
                              vae_activation_checkpointing="auto", compile_unet=False)
        memory.apply_memory_options(cfg, unet, vae, "cpu")
        assert getattr(unet.down_blocks[0], "_scoredistill_checkpointed", False) is expect
        assert getattr(vae.encoder.down_blocks[0], "_scoredistill_checkpointed", False) is expect
