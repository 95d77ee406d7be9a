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
from dataclasses import dataclass, fields
from typing import List

from threestudio.models.exporters.base import Exporter, ExporterOutput

from scoredistill._registry import register
from scoredistill.exporter import gaussian_mesh as GM
from scoredistill.settings import parse_settings, plain

PREFIX = "system.exporter"


@register("gsplat-mesh-exporter")
class GsplatMeshExporter(Exporter):
    @dataclass
    class Config(GM.MeshSettings, Exporter.Config):
        """The mesh settings are :class:`~scoredistill.exporter.gaussian_mesh.MeshSettings`' fields (same names,
        defaults and checks); these are the exporter's own."""

        #: file stem: <mesh_name>.obj / .mtl / .png / .glb / .ply
        mesh_name: str = "model"
        #: not used: accepted so that configs written for gsplat-ply-exporter (gs-sds.yaml sets
        #: save_name: gaussians.ply) switch to this exporter with one override (system.exporter_type)
        save_name: str = ""
        save_via_file: bool = False

    cfg: Config

    @classmethod
    def validate_settings(cls, cfg, prefix: str = "system.exporter") -> GM.MeshSettings:
        """Parse and check the exporter's config; returns its checked :class:`MeshSettings`.

        Raises:
            ValueError: naming the full dotted setting (``{prefix}.resolution``, ...) and its allowed range.
        """
        c = parse_settings(cls.Config, cfg, prefix)
        name = c.mesh_name
        if not name or "/" in name or os.sep in name or name.startswith(".") or os.path.splitext(name)[1].lower() in (".obj", ".glb", ".ply", ".png", ".mtl"):
            raise ValueError(f"{prefix}.mesh_name must be a plain file stem (no folder, no extension, not starting with '.'), got {name!r}")
        raw = {f.name: plain(getattr(c, f.name)) for f in fields(GM.MeshSettings)}
        return GM.MeshSettings(**raw).check(prefix + ".")

    def configure(self, geometry, material, background) -> None:
        self.settings = self.validate_settings(self.cfg, PREFIX)
        if not hasattr(geometry, "export_params"):
            raise ValueError(
                f"gsplat-mesh-exporter needs a Gaussian geometry (gsplat-gaussian-splatting), got {type(geometry).__name__}"
            )
        super().configure(geometry, material, background)

    def __call__(self) -> List[ExporterOutput]:
        import threestudio

        device = self.geometry.params["means"].device
        params = {k: v.detach() for k, v in self.geometry.params.items()}
        result = GM.gaussians_to_mesh(params, self.settings, device=device, prefix=PREFIX + ".", progress=True)
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

