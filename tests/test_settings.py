"""Settings validation (issue 25): the one number-range check (``scoredistill.settings.check_range``), each part's
own ``validate_settings`` refusing a bad value with its full setting name, and ``MeshSettings`` as the one
definition of the mesh exporter's settings."""
import dataclasses
import math
import os
import re

import pytest

from scoredistill.settings import check_range, describe_range, in_range

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs, value, message",
    [
        (dict(low=0, high=3, integer=True), 5, "s must be an integer in [0, 3], got 5"),
        (dict(low=0, high=3, integer=True), -1, "s must be an integer in [0, 3], got -1"),
        (dict(low=0.0, high=1.0, open_low=True, open_high=True), 1.0, "s must be a finite number in (0.0, 1.0), got 1.0"),
        (dict(low=0.0, high=1.0, open_low=True, open_high=True), 0.0, "s must be a finite number in (0.0, 1.0), got 0.0"),
        (dict(low=0, high=1, open_high=True), 1, "s must be a finite number in [0, 1), got 1"),
        (dict(low=0, high=1, open_low=True), 0, "s must be a finite number in (0, 1], got 0"),
        (dict(low=1, integer=True), 0, "s must be an integer >= 1, got 0"),
        (dict(low=0, open_low=True), 0, "s must be a finite number > 0, got 0"),
        (dict(low=0, open_low=True), -2.5, "s must be a finite number > 0, got -2.5"),
        (dict(high=10), 11, "s must be a finite number <= 10, got 11"),
        (dict(high=10, open_high=True), 10, "s must be a finite number < 10, got 10"),
        (dict(), NAN, "s must be a finite number, got nan"),
        (dict(), INF, "s must be a finite number, got inf"),
        (dict(), -INF, "s must be a finite number, got -inf"),
        (dict(low=0), "abc", "s must be a finite number >= 0, got 'abc'"),
        (dict(low=0), None, "s must be a finite number >= 0, got None"),
        (dict(low=1, integer=True), 2.0, "s must be an integer >= 1, got 2.0"),
        (dict(low=8, integer=True, optional=True), 4, "s must be an integer >= 8 or null, got 4"),
        (dict(low=0, high=16, note=" (0 = exact)"), 17, "s must be a finite number in [0, 16] (0 = exact), got 17"),
    ],
)
def test_check_range_refuses_with_the_setting_and_its_range(kwargs, value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check_range(value, "s", **kwargs)


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("integer", [True, False])
def test_check_range_refuses_a_bool_as_a_number(value, integer):
    # True is an int in Python; a setting written `true` is never the number 1
    with pytest.raises(ValueError, match=rf"^system.x must be (an integer|a finite number) >= 0, got {value}$"):
        check_range(value, "system.x", 0, integer=integer)
    assert not in_range(value)


@pytest.mark.parametrize(
    "kwargs, value",
    [
        (dict(low=0, high=3, integer=True), 0),
        (dict(low=0, high=3, integer=True), 3),
        (dict(low=0.0, high=1.0, open_high=True), 0.0),
        (dict(low=0.0, high=1.0, open_low=True), 1.0),
        (dict(low=0, open_low=True), 1e-30),
        (dict(), -1e300),
        (dict(low=8, integer=True, optional=True), None),
        (dict(low=8, integer=True, optional=True), 8),
    ],
)
def test_check_range_returns_an_accepted_value(kwargs, value):
    assert check_range(value, "s", **kwargs) is value


def test_describe_range_words():
    assert describe_range(0, 3, integer=True) == "an integer in [0, 3]"
    assert describe_range(0, 180, open_low=True, open_high=True) == "a finite number in (0, 180)"
    assert describe_range(1, integer=True) == "an integer >= 1"
    assert describe_range(0.0, open_low=True) == "a finite number > 0.0"
    assert describe_range(high=1) == "a finite number <= 1"
    assert describe_range() == "a finite number"
    assert in_range(math.pi, 3, 4) and not in_range(NAN, -INF, INF)


# ------------------------------------------------------------------ each part refuses a bad value, naming it
def test_densify_schedule_validates_its_own_settings():
    from scoredistill.geometry import densify

    with pytest.raises(ValueError, match=r"^system.strategy.refine_every must be an integer >= 1, got 0$"):
        densify.validate_settings({"refine_every": 0})
    with pytest.raises(ValueError, match=r"^system.strategy.refine_start_iter \(9\) must be <= system.strategy.refine_stop_iter"):
        densify.validate_settings({"refine_start_iter": 9, "refine_stop_iter": 1})
    with pytest.raises(ValueError, match=r"^s.prune_opa must be a finite number in \[0.0, 1.0\), got 1.0$"):
        densify.validate_settings({"prune_opa": 1.0}, "s")
    densify.validate_settings({"type": "none"})


def test_mesh_settings_validate_themselves():
    from scoredistill.exporter.gaussian_mesh import MeshSettings

    with pytest.raises(ValueError, match=r"^system.exporter.color_knn must be an integer in \[1, 256\], got 0$"):
        MeshSettings(color_knn=0).check("system.exporter.")
    with pytest.raises(ValueError, match=r"^system.exporter.decimate_target must be 0 \(off\) or an integer >= 4, got 2$"):
        MeshSettings(decimate_target=2).check("system.exporter.")
    with pytest.raises(ValueError, match=r"^cutoff_sigma must be a finite number in \[1, 10\], got 'x'$"):
        MeshSettings(cutoff_sigma="x").check()
    assert MeshSettings(decimate_target=0).check().decimate_target == 0


def test_validation_reaches_into_no_part():
    """validation.py calls the parts' own checks; it imports no geometry / renderer / exporter module itself."""
    import scoredistill

    src = open(os.path.join(os.path.dirname(scoredistill.__file__), "validation.py")).read()
    assert not re.search(r"scoredistill\.(geometry|renderer|exporter)\.\w+ import|from \.(geometry|renderer|exporter)", src)
    assert "densify.validate_settings(" in src and "validate_part_settings(cfg, \"renderer\")" in src


@pytest.mark.threestudio
@pytest.mark.parametrize(
    "part, cfg, match",
    [
        ("gsplat-gaussian-splatting", {"sh_degree": 5}, r"^system.geometry.sh_degree must be an integer in \[0, 3\], got 5$"),
        ("gsplat-gaussian-splatting", {"init_opacity": 1.0},
         r"^system.geometry.init_opacity must be a finite number in \(0.0, 1.0\), got 1.0$"),
        ("gsplat-gaussian-splatting", {"num_points": 0}, r"^system.geometry.num_points must be an integer >= 1, got 0$"),
        ("gsplat-rasterizer", {"tile_size": 0}, r"^system.renderer.tile_size must be an integer >= 1, got 0$"),
        ("gsplat-rasterizer", {"eps2d": -1.0}, r"^system.renderer.eps2d must be a finite number >= 0, got -1.0$"),
        ("gsplat-rasterizer", {"no_such": 1}, r"^system.renderer: unknown settings \['system.renderer.no_such'\]"),
        ("kernel-smoothed-volume-renderer", {"num_samples_per_ray": 1},
         r"^system.renderer.num_samples_per_ray must be an integer >= 2, got 1$"),
        ("kernel-smoothed-volume-renderer", {"kernel_smoothing": "gauss"}, r"^system.renderer.kernel_smoothing must be one of"),
        ("gsplat-ply-exporter", {"save_name": "x.obj"}, r"^system.exporter.save_name must be a file name ending with .ply"),
        ("gsplat-mesh-exporter", {"resolution": 4}, r"^system.exporter.resolution must be an integer in \[8, 2048\], got 4$"),
        ("gsplat-mesh-exporter", {"uv_padding": -1}, r"^system.exporter.uv_padding must be an integer in \[0, 64\], got -1$"),
        ("gsplat-mesh-exporter", {"mesh_name": "a/b"}, r"^system.exporter.mesh_name must be a plain file stem"),
    ],
)
def test_each_part_validates_its_own_settings(threestudio_module, part, cfg, match):
    import scoredistill  # noqa: F401  (registers the pack)

    cls = threestudio_module.find(part)
    prefix = "system." + ("geometry" if "splatting" in part else "renderer" if "render" in part or "raster" in part else "exporter")
    with pytest.raises(ValueError, match=match):
        cls.validate_settings(cfg, prefix)
    cls.validate_settings({}, prefix)  # the defaults pass


@pytest.mark.threestudio
def test_guidance_base_checks_its_ranges_with_the_full_setting(threestudio_module):
    import scoredistill  # noqa: F401
    from scoredistill.validation import validate_guidance_settings

    base = {"half_precision_weights": False}  # no model loads: validate_config runs on a model-free instance
    with pytest.raises(ValueError, match=r"^system.guidance.trainer_max_steps must be an integer >= 1, got 0$"):
        validate_guidance_settings("ge3d-guidance", {**base, "trainer_max_steps": 0})
    with pytest.raises(ValueError, match=r"^system.guidance.guidance_scale must be a finite number > 0, got -1.0$"):
        validate_guidance_settings("ge3d-guidance", {**base, "guidance_scale": -1.0})
    with pytest.raises(ValueError, match=r"^system.guidance.guidance_scale must be a finite number > 0 or inf, got nan$"):
        validate_guidance_settings("lods-guidance", {**base, "guidance_scale": NAN})


@pytest.mark.threestudio
def test_mesh_exporter_config_is_mesh_settings_plus_its_own(threestudio_module):
    """One definition: the exporter's Config derives from MeshSettings (same names and defaults) and adds only
    the exporter's own keys."""
    import scoredistill  # noqa: F401
    from threestudio.models.exporters.base import Exporter

    from scoredistill.exporter.gaussian_mesh import MeshSettings

    cfg_cls = threestudio_module.find("gsplat-mesh-exporter").Config
    assert issubclass(cfg_cls, MeshSettings)
    mesh = {f.name: f for f in dataclasses.fields(MeshSettings)}
    names = [f.name for f in dataclasses.fields(cfg_cls)]
    base = [f.name for f in dataclasses.fields(Exporter.Config)]
    assert sorted(set(names) - set(mesh) - set(base)) == ["mesh_name", "save_name", "save_via_file"]
    parsed = cfg_cls.__dataclass_fields__
    for name, f in mesh.items():
        assert parsed[name].default == f.default and parsed[name].default_factory == f.default_factory
    settings = threestudio_module.find("gsplat-mesh-exporter").validate_settings({"resolution": 64, "formats": ["ply"]})
    assert isinstance(settings, MeshSettings) and settings.resolution == 64 and settings.formats == ["ply"]
