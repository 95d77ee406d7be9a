"""threestudio exporter ``gsplat-mesh-exporter``: a textured triangle mesh from the Gaussians (``launch.py --export``).

Thin adapter over :mod:`scoredistill.exporter.gaussian_mesh` (density grid -> marching cubes -> cleanup -> xatlas ->
texture baked from the Gaussians' colours, no nvdiffrast: runs on CPU and CUDA, on the geometry's device)::

    python launch.py --config <trial>/configs/parsed.yaml --export --gpu 0 resume=<trial>/ckpts/last.ckpt \
        system.exporter_type=gsplat-mesh-exporter [system.exporter.resolution=256 ...]

writes ``<trial>/save/it<step>-export/<mesh_name>.obj/.mtl/.png`` and ``.glb`` (and ``.ply`` with vertex colours
when ``formats`` lists ``ply``) and ``<mesh_name>.json`` (watertight, components, surface offset, timings), with
vertex normals, +Y up by default (glTF's axis; ``up_axis: z`` keeps threestudio's frame), replaced as one set.  All settings are
validated in ``configure`` (errors name ``system.exporter.<key>``), before the mesh is computed.

With ``gsplat-system`` the files are written by the system's ``save_gsplat_mesh`` saver (``save_type:
gsplat_mesh``: temporary file + rename in the trial folder).  With a system that lacks it (e.g. threestudio's
``dreamfusion-system`` on ``gsplat-gaussian-splatting``) set ``system.exporter.save_via_file=true``: the files are
written to a temporary folder and threestudio's ``SaverMixin.save_file`` copies each one (a plain copy).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any, List

from threestudio.models.exporters.base import Exporter, ExporterOutput

from scoredistill._registry import register
from scoredistill.exporter import gaussian_mesh as GM

PREFIX = "system.exporter."


@register("gsplat-mesh-exporter")
class GsplatMeshExporter(Exporter):
    @dataclass
    class Config(Exporter.Config):
        #: file stem: <mesh_name>.obj / .mtl / .png / .glb / .ply
        mesh_name: str = "model"
        #: not used: accepted so that configs written for gsplat-ply-exporter (gs-sds.yaml sets
        #: save_name: gaussians.ply) switch to this exporter with one override (system.exporter_type)
        save_name: str = ""
        save_via_file: bool = False
        #: the settings of gaussian_mesh.MeshSettings (same names and defaults)
        resolution: int = 256
        bounds: Any = "auto"
        crop_to_bounds: bool = False
        isosurface_threshold: Any = "auto"
        auto_level_ratio: float = 0.25
        min_opacity: float = 0.005
        cutoff_sigma: float = 3.0
        chunk_size: int = 4_194_304
        fill_interior: bool = True
        fill_threshold_ratio: float = 0.5
        density_min_sigma_voxels: float = 1.5
        min_component_fraction: float = 0.05
        smooth_iterations: int = 0
        decimate_target: int = 30_000
        texture_size: int = 1024
        color_mode: str = "dc"
        color_knn: int = 16
        uv_padding: int = 2
        formats: List[str] = field(default_factory=lambda: ["obj", "glb"])
        up_axis: str = "y"

    cfg: Config

    def configure(self, geometry, material, background) -> None:
        name = self.cfg.mesh_name
        if not name or "/" in name or os.sep in name or name.startswith(".") or os.path.splitext(name)[1].lower() in (".obj", ".glb", ".ply", ".png", ".mtl"):
            raise ValueError(f"{PREFIX}mesh_name must be a plain file stem (no folder, no extension, not starting with '.'), got {name!r}")
        names = [f.name for f in fields(GM.MeshSettings)]
        raw = {k: getattr(self.cfg, k) for k in names}
        raw["bounds"] = _plain(raw["bounds"])
        raw["formats"] = list(_plain(raw["formats"]))
        self.settings = GM.MeshSettings(**raw).check(PREFIX)
        if not hasattr(geometry, "export_params"):
            raise ValueError(
                f"gsplat-mesh-exporter needs a Gaussian geometry (gsplat-gaussian-splatting), got {type(geometry).__name__}"
            )
        super().configure(geometry, material, background)

    def __call__(self) -> List[ExporterOutput]:
        import threestudio

        device = self.geometry.params["means"].device
        params = {k: v.detach() for k, v in self.geometry.params.items()}
        result = GM.gaussians_to_mesh(params, self.settings, device=device, prefix=PREFIX, progress=True)
        threestudio.info(
            "gsplat-mesh-exporter: {gaussians:.0f} Gaussians, grid {grid_x:.0f}x{grid_y:.0f}x{grid_z:.0f}: ".format(**result.stats)
            + GM.summary_line(result.stats)
        )
        files = GM.mesh_file_bytes(result, self.cfg.mesh_name, self.settings.formats, self.settings.up_axis, self.settings)
        if self.cfg.save_via_file:
            folder = tempfile.mkdtemp(prefix="gsplat-mesh-")
            outs = []
            for name in sorted(files, key=lambda k: (k.endswith(".obj"), k)):
                src = GM._atomic_write_bytes(os.path.join(folder, name), files[name])
                outs.append(ExporterOutput(save_name=name, save_type="file", params={"src_path": src}))
            return outs
        return [ExporterOutput(save_name=self.cfg.mesh_name, save_type="gsplat_mesh", params={"files": files})]


def _plain(value):
    """OmegaConf containers -> Python lists."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value
