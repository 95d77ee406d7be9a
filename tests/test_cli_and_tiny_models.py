import os

import pytest
import torch

from scoredistill.cli import PACKAGE_DIR, link, main


def test_link_creates_symlink_and_is_idempotent(tmp_path):
    (tmp_path / "custom").mkdir()
    (tmp_path / "launch.py").write_text("")
    dest = link(str(tmp_path))
    assert os.path.islink(dest) and os.path.realpath(dest) == os.path.realpath(PACKAGE_DIR)
    assert link(str(tmp_path)) == dest
    assert main(["link", str(tmp_path)]) == 0


def test_link_refuses_non_checkout_and_foreign_entry(tmp_path, capsys):
    assert main(["link", str(tmp_path)]) == 2
    assert "is not a threestudio checkout" in capsys.readouterr().err
    (tmp_path / "custom" / "scoredistill").mkdir(parents=True)
    (tmp_path / "launch.py").write_text("")
    with pytest.raises(FileExistsError, match="already exists"):
        link(str(tmp_path))


def test_tiny_sd_loads_through_from_pretrained(tiny_sd):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    sched = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    assert abs(sched.config.beta_start - 0.00085) < 1e-12 and abs(sched.config.beta_end - 0.012) < 1e-12
    ids = pipe.tokenizer("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == pipe.tokenizer.bos_token_id
    emb = pipe.text_encoder(ids)[0]
    assert emb.shape == (1, 77, pipe.unet.config.cross_attention_dim)
    out = pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), encoder_hidden_states=emb.expand(2, -1, -1)).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    lat = pipe.vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latent_dist.mean
    assert lat.shape == (1, 4, 16, 16)


def test_tiny_sd_rejects_unsupported_vae_factor(tmp_path):
    from scoredistill.testing.tiny_models import build_tiny_stable_diffusion

    with pytest.raises(ValueError, match="vae_scale_factor must be 2 or 8, got 4"):
        build_tiny_stable_diffusion(str(tmp_path / "sd"), vae_scale_factor=4)
    assert not (tmp_path / "sd").exists()  # nothing written for a bad setting


def test_tiny_model_build_is_atomic(tmp_path, monkeypatch):
    """A build that fails half-way leaves neither the folder nor its temporary; a finished one is reused."""
    import transformers

    from scoredistill.testing.tiny_models import build_tiny_dpt

    def boom(self, *a, **k):
        raise RuntimeError("killed while writing")

    with monkeypatch.context() as m:
        m.setattr(transformers.DPTImageProcessor, "save_pretrained", boom)  # the weights are already written
        with pytest.raises(RuntimeError, match="killed"):
            build_tiny_dpt(str(tmp_path / "dpt"))
    assert os.listdir(tmp_path) == []
    path = build_tiny_dpt(str(tmp_path / "dpt"))
    assert sorted(os.listdir(tmp_path)) == ["dpt"] and os.path.exists(os.path.join(path, "preprocessor_config.json"))
    mtime = os.path.getmtime(os.path.join(path, "config.json"))
    assert build_tiny_dpt(path) == path and os.path.getmtime(os.path.join(path, "config.json")) == mtime
