"""Resume refuses a checkpoint of another run (issue 13, finding 5) and checkpoints are read with
``weights_only=True`` only (finding 6)."""
import os
import pickle

import pytest
import torch

from scoredistill.integrity.checkpointing import (
    CHECKPOINT_KEY,
    RUN_KEY,
    check_resume_compatible,
    load_checkpoint_file,
)

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")


# ------------------------------------------------------------------------------------------ weights_only
class _Payload:
    """Unpickling this runs code (writes a marker file): what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_with_a_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, CHECKPOINT_KEY: {"vdm-guidance": _Payload(str(marker))}}, path)
    with pytest.raises(ValueError, match=r"refusing to load checkpoint .*crafted\.ckpt.*weights_only=True"):
        load_checkpoint_file(str(path))
    assert not marker.exists()  # on main the fallback unpickled it: the file was created
    # a plain checkpoint still loads
    torch.save({"state_dict": {"w": torch.ones(2)}, CHECKPOINT_KEY: {"x": {"step": 3}}}, tmp_path / "ok.ckpt")
    assert load_checkpoint_file(str(tmp_path / "ok.ckpt"))[CHECKPOINT_KEY]["x"]["step"] == 3


def test_the_running_resume_path_uses_weights_only(tmp_path):
    from scoredistill.integrity import CheckpointedGuidanceMixin

    marker = tmp_path / "executed"
    path = tmp_path / "crafted.ckpt"
    torch.save({CHECKPOINT_KEY: {"toy": _Payload(str(marker))}}, path)

    class Toy(CheckpointedGuidanceMixin):
        checkpoint_state_key = "toy"

    class Trainer:
        ckpt_path = str(path)

    class System:
        _trainer = Trainer()

    with pytest.raises(ValueError, match="refusing to load checkpoint"):
        Toy()._restore_from_running_resume(System())
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ identity checks
class _Cfg(dict):
    __getattr__ = dict.get


def _system(**cfg):
    class S:
        pass

    s = S()
    s.cfg = _Cfg(**cfg)
    return s


def test_check_resume_compatible_names_the_checkpoint_and_each_setting():
    sys_ = _system(guidance_type="lods-guidance", geometry_type="gsplat-gaussian-splatting", geometry={"sh_degree": 1})
    ok = {RUN_KEY: {"guidance_type": "lods-guidance", "geometry_type": "gsplat-gaussian-splatting", "geometry.sh_degree": 1}}
    check_resume_compatible(sys_, ok, "a.ckpt")
    bad = {RUN_KEY: {"guidance_type": "vdm-guidance", "geometry_type": "gsplat-gaussian-splatting", "geometry.sh_degree": 3},
           CHECKPOINT_KEY: {"vdm-guidance": {}}}
    with pytest.raises(ValueError) as err:
        check_resume_compatible(sys_, bad, "/x/last.ckpt")
    msg = str(err.value)
    assert msg.startswith("resume=/x/last.ckpt: this checkpoint cannot be resumed with this config")
    assert "system.guidance_type='vdm-guidance', this config has system.guidance_type='lods-guidance'" in msg
    assert "system.geometry.sh_degree=3, this config has system.geometry.sh_degree=1" in msg
    # a checkpoint without the identity record (older): the guidance states it holds decide
    with pytest.raises(ValueError, match=r"holds the trained state of vdm-guidance .*system\.guidance_type='lods-guidance'"):
        check_resume_compatible(sys_, {CHECKPOINT_KEY: {"vdm-guidance": {}}}, "old.ckpt")
    check_resume_compatible(sys_, {CHECKPOINT_KEY: {"lods-guidance": {}}}, "old.ckpt")


# ------------------------------------------------------------------------------------------ launch.py
@pytest.fixture(scope="module")
def vdm_gs_checkpoint(tiny_sd, tmp_path_factory):
    from harness import gs_cpu_overrides, run_launch, tiny_overrides, threestudio_root

    if threestudio_root() is None:
        pytest.skip("needs THREESTUDIO_ROOT")
    common = tiny_overrides(tiny_sd, *gs_cpu_overrides(num_points=100, batch_size=1),
                            "system.guidance.operator_widths=[8,16,32]", prompt="a red ball", max_steps=1)
    trial = run_launch(os.path.join(CONFIGS, "vdm-gs.yaml"), common, exp_root=str(tmp_path_factory.mktemp("vdm")))
    return os.path.join(trial, "ckpts", "last.ckpt"), common


@pytest.mark.threestudio
@pytest.mark.slow
def test_resume_refuses_a_vdm_checkpoint_in_a_lods_config(vdm_gs_checkpoint, tmp_path):
    from harness import run_launch

    ckpt, common = vdm_gs_checkpoint
    with pytest.raises(RuntimeError) as err:
        # the VDM-only guidance overrides are left out (the early settings check would refuse them first)
        lods_common = [o for o in common if not o.startswith(("system.guidance.operator", "system.guidance.vdm"))]
        run_launch(os.path.join(CONFIGS, "lods-embedding-gs.yaml"), lods_common + [f"resume={ckpt}", "trainer.max_steps=2"],
                   exp_root=str(tmp_path))
    msg = str(err.value)
    assert f"resume={ckpt}: this checkpoint cannot be resumed with this config" in msg
    assert "system.guidance_type='vdm-guidance', this config has system.guidance_type='lods-guidance'" in msg
    assert "train/" not in msg  # refused before any step


@pytest.mark.threestudio
@pytest.mark.slow
def test_resume_refuses_a_changed_sh_degree_naming_checkpoint_and_setting(vdm_gs_checkpoint, tmp_path):
    from harness import run_launch

    ckpt, common = vdm_gs_checkpoint
    with pytest.raises(RuntimeError) as err:
        run_launch(os.path.join(CONFIGS, "vdm-gs.yaml"), common + [f"resume={ckpt}", "trainer.max_steps=2",
                   "system.geometry.sh_degree=1"], exp_root=str(tmp_path / "a"))
    assert "system.geometry.sh_degree=0, this config has system.geometry.sh_degree=1" in str(err.value)
    assert f"resume={ckpt}" in str(err.value)
    # an older checkpoint without the identity record: the Gaussians' shN shape tells the degree
    old = tmp_path / "old.ckpt"
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    del data[RUN_KEY]
    torch.save(data, old)
    with pytest.raises(RuntimeError) as err:
        run_launch(os.path.join(CONFIGS, "vdm-gs.yaml"), common + [f"resume={old}", "trainer.max_steps=2",
                   "system.geometry.sh_degree=1"], exp_root=str(tmp_path / "b"))
    assert (f"resume={old}: the checkpoint's Gaussians have SH degree 0 (geometry.params.shN of shape (100, 0, 3)), "
            "this config has system.geometry.sh_degree=1") in str(err.value)


@pytest.mark.threestudio
@pytest.mark.slow
def test_resume_refuses_a_checkpoint_with_nan_means_naming_the_tensor(vdm_gs_checkpoint, tmp_path):
    """Issue 24: a resume from a checkpoint with NaN means was accepted; every step was skipped, the run exited 0
    and wrote a PLY of NaNs that the pack's own loader refuses."""
    from harness import run_launch

    ckpt, common = vdm_gs_checkpoint
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data["state_dict"]["geometry.params.means"][7, 1] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(data, bad)
    with pytest.raises(RuntimeError) as err:
        run_launch(os.path.join(CONFIGS, "vdm-gs.yaml"), common + [f"resume={bad}", "trainer.max_steps=2"],
                   exp_root=str(tmp_path / "out"))
    msg = str(err.value)
    assert f"resume={bad}: this checkpoint cannot be resumed with this config" in msg
    assert "non-finite (NaN/inf) tensors: state_dict['geometry.params.means']: 1 of 300 values" in msg
    assert "train/" not in msg and not list((tmp_path / "out").rglob("*.ply"))  # refused before any step
