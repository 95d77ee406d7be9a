"""threestudio exporter ``gsplat-ply-exporter``: the Gaussians as a standard 3DGS PLY (``launch.py --export``).

With ``gsplat-system`` the PLY is written atomically by the system's ``save_gaussian_ply`` saver
(``save_type: gaussian_ply``).  With a system that lacks it (e.g. threestudio's ``dreamfusion-system``) set
``save_via_file: true``: the exporter writes the PLY atomically to a temporary file and returns it as
``save_type: file`` (threestudio's ``SaverMixin.save_file`` then copies it into the trial folder).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import List

from threestudio.models.exporters.base import Exporter, ExporterOutput

from scoredistill._registry import register
from scoredistill.geometry.gaussian_ply import save_gaussians_ply
from scoredistill.settings import parse_settings


@register("gsplat-ply-exporter")
class GsplatPlyExporter(Exporter):
    @dataclass
    class Config(Exporter.Config):
        save_name: str = "gaussians.ply"
        save_via_file: bool = False

    cfg: Config

    @classmethod
    def validate_settings(cls, cfg, prefix: str = "system.exporter") -> "GsplatPlyExporter.Config":
        """Parse and check the exporter's config; returns the parsed ``Config``.

        ``save_name``: a relative file name ending in ``.ply`` (no ``..``, not absolute).
        """
        c = parse_settings(cls.Config, cfg, prefix)
        name = c.save_name
        if not isinstance(name, str) or not name.endswith(".ply") or len(name) <= 4:
            raise ValueError(f"{prefix}.save_name must be a file name ending with .ply, got {name!r}")
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise ValueError(f"{prefix}.save_name must be relative to the trial's save folder, got {name!r}")
        return c

    def configure(self, geometry, material, background) -> None:
        self.validate_settings(self.cfg)
        if not hasattr(geometry, "export_params"):
            raise ValueError(
                f"gsplat-ply-exporter needs a Gaussian geometry (gsplat-gaussian-splatting), got {type(geometry).__name__}"
            )
        super().configure(geometry, material, background)

    def __call__(self) -> List[ExporterOutput]:
        params = self.geometry.export_params()
        if self.cfg.save_via_file:
            # threestudio's save_file copies src_path into the trial after this returns; the folder is removed
            # at the next call and when the process exits (it used to be left in /tmp)
            self._remove_temp_folder()
            folder = tempfile.mkdtemp(prefix="gsplat-ply-")
            self._temp_folder = folder
            atexit.register(shutil.rmtree, folder, True)
            src = save_gaussians_ply(os.path.join(folder, os.path.basename(self.cfg.save_name)), params)
            return [ExporterOutput(save_name=self.cfg.save_name, save_type="file", params={"src_path": src})]
        return [ExporterOutput(save_name=self.cfg.save_name, save_type="gaussian_ply", params={"params": params})]

    def _remove_temp_folder(self) -> None:
        folder = getattr(self, "_temp_folder", None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
            self._temp_folder = None

    def __del__(self):
        try:
            self._remove_temp_folder()
        except Exception:
            pass
