"""Interactive 3D Gaussian viewer pages that open from disk (``file://``), no server needed.

The viewer is Mark Kellogg's ``@mkkellogg/gaussian-splats-3d`` (MIT, npm) on three.js (MIT, npm), vendored at
report time from an npm install -- nothing is fetched by the page.  Get them once with::

    npm install --prefix ~/.cache/scoredistill/splat-viewer three@0.160.0 @mkkellogg/gaussian-splats-3d@0.4.7

and point ``SCOREDISTILL_SPLAT_VIEWER`` at that ``node_modules`` folder (also searched: ``./node_modules``,
``~/.cache/scoredistill/splat-viewer/node_modules``, ``npm root -g``).  Without them, the report and the demo
still write everything else and say how to get the viewer.

Why the page is built this way: browsers refuse ``fetch`` and ES modules on ``file://``, so the libraries are
loaded as classic scripts (the viewer's UMD build; three.js's CommonJS build wrapped to set ``window.THREE``) and
the PLY travels as base64 in a ``<script>`` file, handed to the viewer as a ``blob:`` URL with the PLY format
given explicitly; the sort worker runs without shared memory (``sharedMemoryForWorkers: false``: no
cross-origin isolation on ``file://``).  threestudio's world is +Z up: the camera starts where threestudio's test
cameras are (distance 2, elevation 15°).  Every Gaussian of the PLY is kept (``splatAlphaRemovalThreshold: 0``).  When the scene is loaded the page sets ``data-splat-count`` (the
viewer's own Gaussian count) and ``data-ready="1"`` on ``<body>``; on an error ``data-error``.
"""
from __future__ import annotations

import base64
import html
import json
import os
import shutil
import subprocess
from typing import Dict, Optional

ENV = "SCOREDISTILL_SPLAT_VIEWER"
PACKAGES = ("three@0.160.0", "@mkkellogg/gaussian-splats-3d@0.4.7")
INSTALL_HINT = ("npm install --prefix ~/.cache/scoredistill/splat-viewer " + " ".join(PACKAGES) +
                f" and set {ENV}=~/.cache/scoredistill/splat-viewer/node_modules")
_GS3D = os.path.join("@mkkellogg", "gaussian-splats-3d", "build", "gaussian-splats-3d.umd.cjs")
_THREE = os.path.join("three", "build", "three.cjs")


def _has_both(node_modules: str) -> bool:
    return os.path.isfile(os.path.join(node_modules, _GS3D)) and os.path.isfile(os.path.join(node_modules, _THREE))


def find_viewer() -> Optional[str]:
    """The ``node_modules`` folder holding three.js and gaussian-splats-3d, or ``None``."""
    cands = [os.environ.get(ENV), os.path.join(os.getcwd(), "node_modules"),
             os.path.expanduser(os.path.join("~", ".cache", "scoredistill", "splat-viewer", "node_modules"))]
    for c in cands:
        if c and _has_both(os.path.expanduser(c)):
            return os.path.abspath(os.path.expanduser(c))
    npm = shutil.which("npm")
    if npm:
        try:
            root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            root = ""
        if root and _has_both(root):
            return root
    return None


def _version(node_modules: str, package: str) -> str:
    try:
        with open(os.path.join(node_modules, package, "package.json")) as f:
            return json.load(f)["version"]
    except (OSError, ValueError, KeyError):
        return "?"


def vendor(dest: str, node_modules: Optional[str] = None) -> Optional[Dict[str, str]]:
    """Copy the viewer's scripts into ``dest`` (``three.js``, ``gaussian-splats-3d.js`` and their licences);
    returns ``{"three": version, "gaussian-splats-3d": version, "dir": dest}``, or ``None`` if not installed."""
    from .atomic_io import atomic_write_text

    node_modules = node_modules or find_viewer()
    if node_modules is None:
        return None
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(node_modules, _THREE)) as f:
        three = f.read()
    atomic_write_text(os.path.join(dest, "three.js"),
                      "(function(){var module={exports:{}};var exports=module.exports;\n" + three +
                      "\nwindow.THREE=module.exports;})();\n")
    with open(os.path.join(node_modules, _GS3D)) as f:
        atomic_write_text(os.path.join(dest, "gaussian-splats-3d.js"), f.read())
    for pkg, name in (("three", "LICENSE-three.txt"), (os.path.join("@mkkellogg", "gaussian-splats-3d"),
                                                       "LICENSE-gaussian-splats-3d.txt")):
        lic = os.path.join(node_modules, pkg, "LICENSE")
        if os.path.isfile(lic):
            shutil.copyfile(lic, os.path.join(dest, name))
    return {"three": _version(node_modules, "three"),
            "gaussian-splats-3d": _version(node_modules, os.path.join("@mkkellogg", "gaussian-splats-3d")), "dir": dest}


_PAGE = """<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;margin:1em;color:#222}} .pair{{display:flex;gap:1.5em;flex-wrap:wrap}}
#splat{{width:{size}px;height:{size}px;background:#fff;border:1px solid #ccc;position:relative}}
video{{width:{size}px;height:{size}px;background:#000;image-rendering:pixelated}} .src{{color:#666;font-size:.85em}}
</style></head><body data-ready='0'><h2>{title}</h2>
<div class='pair'><div><div id='splat'></div><p class='src'>Drag to orbit, scroll to zoom, right-drag to pan.
{count} Gaussians from <a href='{ply}'>{ply_name}</a>.</p></div>
{video}</div>
<p class='src'>Viewer: @mkkellogg/gaussian-splats-3d {gs_version} on three.js {three_version} (MIT), vendored.</p>
<script src='{lib}/three.js'></script><script src='{lib}/gaussian-splats-3d.js'></script>
<script src='{data}'></script>
<script>
(function(){{
  var body=document.body;
  function fail(e){{body.dataset.error=String(e&&e.message||e);}}
  try{{
    var GS=window['Gaussian Splats 3D'];
    var bin=atob(window.SCOREDISTILL_PLY), bytes=new Uint8Array(bin.length);
    for(var i=0;i<bin.length;i++){{bytes[i]=bin.charCodeAt(i);}}
    var url=URL.createObjectURL(new Blob([bytes],{{type:'application/octet-stream'}}));
    var viewer=new GS.Viewer({{rootElement:document.getElementById('splat'),cameraUp:[0,0,1],
      initialCameraPosition:[1.932,0,0.518],initialCameraLookAt:[0,0,0],sharedMemoryForWorkers:false,
      gpuAcceleratedSort:false,dynamicScene:false,antialiased:true,sphericalHarmonicsDegree:0}});
    viewer.addSplatScene(url,{{format:GS.SceneFormat.Ply,showLoadingUI:false,progressiveLoad:false,
      splatAlphaRemovalThreshold:0}}).then(function(){{
        viewer.start();
        body.dataset.splatCount=viewer.getSplatMesh().getSplatCount();
        setTimeout(function(){{body.dataset.ready='1';}},1000);
      }}).catch(fail);
    window.scoredistillViewer=viewer;
  }}catch(e){{fail(e);}}
}})();
</script></body></html>
"""


def write_page(page_path: str, ply_path: str, lib_dir: str, title: str, video_path: Optional[str] = None,
               versions: Optional[Dict[str, str]] = None, size: int = 420) -> str:
    """Write ``page_path`` (the viewer of ``ply_path`` with ``video_path`` beside it) and its data script
    ``<page>.ply.js``; ``lib_dir`` holds the vendored scripts (:func:`vendor`).  Returns ``page_path``."""
    from urllib.parse import quote

    from .atomic_io import atomic_write_text

    here = os.path.dirname(os.path.abspath(page_path))

    def rel(p):
        return quote(os.path.relpath(os.path.abspath(p), here).replace(os.sep, "/"))

    with open(ply_path, "rb") as f:
        raw = f.read()
    count = _vertex_count(raw)
    data_path = page_path + ".ply.js"
    atomic_write_text(data_path, "window.SCOREDISTILL_PLY='" + base64.b64encode(raw).decode("ascii") + "';\n")
    video = (f"<div><video controls muted loop autoplay src='{rel(video_path)}'></video>"
             "<p class='src'>threestudio's test video of the run.</p></div>") if video_path else ""
    versions = versions or {}
    page = _PAGE.format(title=html.escape(title), size=size, count=count, ply=rel(ply_path),
                        ply_name=html.escape(os.path.basename(ply_path)), video=video, lib=rel(lib_dir),
                        data=rel(data_path), gs_version=html.escape(versions.get("gaussian-splats-3d", "")),
                        three_version=html.escape(versions.get("three", "")))
    atomic_write_text(page_path, page)
    return page_path


def _vertex_count(raw: bytes) -> int:
    head = raw[: raw.find(b"end_header")].decode("ascii", "replace")
    for line in head.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[:2] == ["element", "vertex"]:
            return int(parts[2])
    return 0
