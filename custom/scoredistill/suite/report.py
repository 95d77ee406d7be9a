"""Suite report: CLIP score, CLIP R-Precision, wall time, UNet samples and status per run; a CSV, a markdown
table of method means (with confidence intervals where n >= 3), and a static HTML gallery.

* CLIP score: :mod:`scoredistill.bench.clip_score` (``100 · max(cos, 0)`` of each test view's RGB panel
  against the run's prompt, averaged over the views).
* CLIP R-Precision (DreamFusion's protocol, Poole et al. 2022, Sec. 4): each test view (threestudio's test
  cameras: evenly spaced azimuths at the evaluation elevation) retrieves, top-1 by CLIP cosine similarity, one
  caption among the suite's distinct prompts; a run's R-Precision is the percentage of its views that retrieve
  its own prompt (a tie is a miss), a method's the mean over its finished runs.  Needs at least 2 distinct
  prompts (else blank).  With the suite's few prompts as the candidates the chance level is ``100 / P`` %
  (DreamFusion retrieves among 153 COCO captions): the report states ``P``.
* CLIP models: ``openai/clip-vit-base-patch32`` (B/32) and ``openai/clip-vit-large-patch14`` (L/14) by default,
  as DreamFusion reports; more can be given (e.g. ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``, the ViT-bigG-14
  that DreamMapping Table 2 and GE3D also report).  Each model is loaded once; a run's numbers are cached in
  ``RUN_DIR/clip-<model>.json`` (recomputed when the run finished again or the suite's prompts changed).  A
  model that cannot be loaded (not downloaded, offline, a wrong folder) is reported in one line naming it and
  how to get it (:class:`ClipModelError`), after everything that does not need it (CSV, summary, JSON,
  gallery, status) has been written with its columns blank.
* wall time: launch.py's wall-clock seconds, measured by the runner; UNet samples: forward samples counted
  in the run (:mod:`.count_launch`; empty when the launcher did not count).
* method means: over the finished runs of each method (all prompts and seeds), with a two-sided 95 %
  Student-t interval ``mean ± t_{0.975, n-1} · s / √n`` where n >= 3; for n = 1 or 2 an interval means
  nothing (n = 2: ``t = 12.7``), so the values themselves are shown (``[14.10, 15.16] (n = 2)``).

Outputs in ``OUTPUT_DIR/report/`` (or ``--out``): ``runs.csv``, ``summary.md``, ``report.json`` and
``index.html``: a sortable table (click a header; ``index.html#sort=<column>:desc`` sorts on load) and a
gallery, prompt × method, of test videos and the first test view of every run.  It references the runs'
files by relative path, so it opens from disk in a browser, no server needed.
"""
from __future__ import annotations

import csv
import html
import io
import math
import os
import re
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence

from ..bench.clip_score import ClipModelError, load_clip
from .runner import load_runs
from .spec import Run
from .state import atomic_write_json, atomic_write_text, csv_safe, find_test_video, read_json, safe_read_state

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
B32_CLIP = "openai/clip-vit-base-patch32"
#: the report's default models: CLIP B/32 and L/14, as DreamFusion reports R-Precision
DEFAULT_CLIPS = (B32_CLIP, DEFAULT_CLIP)
#: a confidence interval is shown only for at least this many values (else the values themselves)
MIN_N_FOR_CI = 3
BIGG_CLIP = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


def model_key(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(model.rstrip("/")) or model)


def t_interval(values: Sequence[float], level: float = 0.95):
    """``(mean, half_width)`` of the two-sided Student-t interval; half width ``None`` for n < 2."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    from scipy import stats

    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * s / math.sqrt(n)


def clip_for_run(run: Run, state: Dict[str, Any], model: str, loaded: Dict[str, Any], device: str = "cpu",
                 panel: str = "first", prompts: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """CLIP score and CLIP R-Precision (among ``prompts``) of a finished run, cached in
    ``RUN_DIR/clip-<model>.json``; ``None`` if not finished.

    Raises:
        ClipModelError: the model is needed (no valid cache) and cannot be loaded (also remembered in
            ``loaded[model]``, so that it is tried once per report).
        FileNotFoundError: the run's test renders are gone.
    """
    if state.get("status") != "done":
        return None
    from ..bench import clip_score as cs

    prompts = list(dict.fromkeys(prompts or [run.prompt]))
    cache = os.path.join(run.run_dir, f"clip-{model_key(model)}.json")
    hit = read_json(cache)
    if (hit and hit.get("finished") == state.get("finished") and hit.get("panel") == panel
            and hit.get("model") == model and hit.get("prompts") == prompts):
        return hit
    files = cs.find_test_images(run.trial_dir)
    if model not in loaded:
        try:
            loaded[model] = load_clip(model, device)
        except ClipModelError as e:
            loaded[model] = e
    if isinstance(loaded[model], ClipModelError):
        raise loaded[model]
    clip_model, processor = loaded[model]
    m = cs.clip_metrics([cs.load_image(f, panel) for f in files], run.prompt, prompts, clip_model, processor, device)
    res = {"model": model, "panel": panel, "finished": state.get("finished"), "num_images": len(files),
           "clip_score": m["clip_score"], "per_image": m["per_image"], "prompts": prompts,
           "r_precision": m["r_precision"], "hits": m["hits"]}
    atomic_write_json(cache, res)
    return res


def _test_images(trial_dir: str) -> List[str]:
    from ..bench.clip_score import find_test_images

    try:
        return find_test_images(trial_dir) if os.path.isdir(os.path.join(trial_dir, "save")) else []
    except FileNotFoundError:
        return []


def clip_col(model: str) -> str:
    return f"clip_{model_key(model)}"


def rprec_col(model: str) -> str:
    return f"rprec_{model_key(model)}"


def metric_cols(clip_models: Sequence[str]) -> List[str]:
    """The per-model metric columns: CLIP score then R-Precision for each model."""
    return [c for m in clip_models for c in (clip_col(m), rprec_col(m))]


def _col_label(col: str) -> str:
    return f"CLIP {col[5:]}" if col.startswith("clip_") else f"R-Precision {col[6:]}"


def collect(output_dir: str, clip_models: Sequence[str] = DEFAULT_CLIPS, device: str = "cpu",
            panel: str = "first", clip_errors: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """One row per run: ids, status, attempts, exit code, wall time, UNet samples, CLIP score and CLIP
    R-Precision per model, test video, test images, Gaussians PLY, log.

    A model that cannot be loaded leaves its columns blank (cached numbers are still used) and its one-line
    error in ``clip_errors[model]``."""
    rows = []
    loaded: Dict[str, Any] = {}
    clip_errors = {} if clip_errors is None else clip_errors
    runs = load_runs(output_dir)
    prompts = list(dict.fromkeys(r.prompt for r in runs))
    for run in runs:
        st = safe_read_state(run.run_dir)  # an unreadable state.json: that run is reported failed
        unet = st.get("unet") or read_json(os.path.join(run.run_dir, "unet_samples.json")) or {}
        row: Dict[str, Any] = {
            "run_id": run.run_id, "method": run.method, "prompt": run.prompt, "prompt_source": run.prompt_source,
            "seed": run.seed, "status": st.get("status", "pending"), "attempts": st.get("attempt", 0),
            "exit_code": st.get("exit_code"), "reason": st.get("reason"), "wall_time_s": st.get("wall_time_s"),
            "unet_samples": unet.get("unet_samples"), "unet_calls": unet.get("unet_calls"),
            "log": st.get("log"), "run_dir": run.run_dir, "trial_dir": run.trial_dir,
            "video": find_test_video(run.trial_dir) if st.get("status") == "done" else None,
            "images": _test_images(run.trial_dir) if st.get("status") == "done" else [],
            "ply": find_gaussians_ply(run.trial_dir) if st.get("status") == "done" else None,
        }
        for m in clip_models:
            try:
                res = clip_for_run(run, st, m, loaded, device, panel, prompts)
            except FileNotFoundError as e:  # finished, but its test renders were removed since
                res, row["reason"] = None, str(e)
            except ClipModelError as e:
                res, clip_errors[m] = None, str(e)
            row[clip_col(m)] = None if res is None else res["clip_score"]
            row[rprec_col(m)] = None if res is None else res.get("r_precision")
        rows.append(row)
    return rows


def find_gaussians_ply(trial_dir: str) -> Optional[str]:
    """The Gaussians of a finished run: the newest ``save/*.ply`` (the gsplat-ply-exporter's file), else ``None``."""
    import glob

    plys = [p for p in glob.glob(os.path.join(trial_dir, "save", "**", "*.ply"), recursive=True) if os.path.isfile(p)]
    return max(plys, key=lambda p: (os.path.getmtime(p), p)) if plys else None


CSV_FIELDS = ["run_id", "method", "prompt", "prompt_source", "seed", "status", "attempts", "exit_code",
              "wall_time_s", "unet_samples", "unet_calls", "reason", "log", "trial_dir", "video"]


def to_csv(rows: List[Dict[str, Any]], clip_cols: Sequence[str]) -> str:
    buf = io.StringIO()
    fields = CSV_FIELDS[:6] + list(clip_cols) + CSV_FIELDS[6:]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else csv_safe(r.get(k))) for k in fields})  # no formula cells
    return buf.getvalue()


def stat(values: Sequence[float]) -> Dict[str, Any]:
    """``{"n", "mean", "ci95", "values"}``; ``ci95`` (Student-t half width) only for n >= ``MIN_N_FOR_CI``."""
    mean, hw = t_interval(values)
    return {"n": len(values), "mean": mean, "ci95": hw if len(values) >= MIN_N_FOR_CI else None,
            "values": list(values)}


def method_summary(rows: List[Dict[str, Any]], clip_cols: Sequence[str]) -> List[Dict[str, Any]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        done = [r for r in rs if r["status"] == "done"]
        s: Dict[str, Any] = {"method": m, "runs": len(rs), "done": len(done),
                             "failed": sum(r["status"] in ("failed", "killed", "preempted") for r in rs)}
        for col in list(clip_cols) + ["wall_time_s", "unet_samples"]:
            vals = [float(r[col]) for r in done if r.get(col) is not None]
            s[col] = stat(vals)
        out.append(s)
    return out


def _fmt_ci(v: Dict[str, Any], digits=2) -> str:
    """``mean ± ci95`` for n >= 3; the values themselves for n = 1, 2 (``[a, b] (n = 2)``); ``n/a`` for none."""
    if not v["n"]:
        return "n/a"
    if v["ci95"] is not None:
        return f"{v['mean']:.{digits}f} ± {v['ci95']:.{digits}f}"
    return "[" + ", ".join(f"{x:.{digits}f}" for x in v["values"]) + f"] (n = {v['n']})"


CI_NOTE = ("Method means over finished runs with a two-sided 95 % Student-t interval where n >= 3; for n < 3 the "
           "values themselves, in brackets.")


def protocol_note(clip_models: Sequence[str], num_prompts: int) -> str:
    """The evaluation protocol in words (written under the tables)."""
    if not clip_models:
        return "No CLIP model given: no CLIP score, no CLIP R-Precision."
    rp = (f"CLIP R-Precision (DreamFusion's protocol): each test view retrieves, top-1 by CLIP cosine similarity, "
          f"one caption among the suite's {num_prompts} distinct prompts; percentage of views retrieving their own "
          f"prompt (a tie is a miss), mean over runs; chance level {100.0 / num_prompts:.1f} %."
          if num_prompts >= 2 else "CLIP R-Precision: not computed (needs at least 2 distinct prompts in the suite).")
    return ("CLIP score: 100 · max(cos, 0) of each test view (threestudio's test cameras, RGB panel) against the "
            "run's prompt, mean over views. " + rp + " Models: " + ", ".join(clip_models) + ".")


def to_markdown(summary: List[Dict[str, Any]], clip_cols: Sequence[str]) -> str:
    head = ["method", "finished / runs", "failed"] + [_col_label(c) for c in clip_cols] + \
           ["wall time s", "UNet samples"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["method"], f"{s['done']} / {s['runs']}", str(s["failed"])]
        cells += [_fmt_ci(s[c]) for c in clip_cols] + [_fmt_ci(s["wall_time_s"], 1), _fmt_ci(s["unet_samples"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- HTML
def _rel(path: Optional[str], start: str) -> Optional[str]:
    if not path:
        return None
    return urllib.parse.quote(os.path.relpath(path, start).replace(os.sep, "/"))


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .5em;font-size:.9em;vertical-align:top}
#runs th{cursor:pointer;background:#f2f2f2;user-select:none}
#runs th.sorted-asc::after{content:" \\25B2"} #runs th.sorted-desc::after{content:" \\25BC"}
.status-done{color:#1a7f37}.status-failed,.status-killed,.status-preempted{color:#cf222e;font-weight:bold}
.gallery td{text-align:center} .gallery video,.gallery img{width:160px;display:block;margin:.2em auto}
.gallery .missing{width:160px;height:60px;background:#f6f6f6;color:#888;display:flex;align-items:center;
justify-content:center;margin:.2em auto;font-size:.8em}
.src{color:#666;font-size:.8em}
"""

_JS = r"""
(function(){
  var body=document.body, media=document.querySelectorAll('.gallery video, .gallery img');
  var loaded=0, failed=0;
  body.dataset.mediaTotal=media.length;
  function upd(){body.dataset.mediaLoaded=loaded;body.dataset.mediaFailed=failed;}
  upd();
  media.forEach(function(el){
    var ok=function(){if(!el.dataset.state){el.dataset.state='loaded';
      el.dataset.w=(el.tagName==='IMG'?el.naturalWidth:el.videoWidth);loaded++;upd();}};
    var bad=function(){if(!el.dataset.state){el.dataset.state='failed';failed++;upd();}};
    if(el.tagName==='IMG'){ if(el.complete&&el.naturalWidth>0){ok();} else {el.addEventListener('load',ok);el.addEventListener('error',bad);} }
    else { if(el.readyState>=1){ok();} else {el.addEventListener('loadedmetadata',ok);el.addEventListener('error',bad,true);
           var s=el.querySelector('source'); if(s){s.addEventListener('error',bad);} } }
  });
  var table=document.getElementById('runs'), tbody=table.tBodies[0], ths=table.tHead.rows[0].cells;
  function key(td){var v=td.getAttribute('data-v'); if(v===null){v=td.textContent;}
    var n=parseFloat(v); return (v!==''&&!isNaN(n)&&isFinite(v))?n:v.toLowerCase();}
  function sortBy(i,desc){
    var rows=Array.prototype.slice.call(tbody.rows);
    rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
      var ex=(x===''), ey=(y===''); if(ex||ey){return ex&&ey?0:(ex?1:-1);}   // empty cells last
      if(typeof x!==typeof y){x=String(x);y=String(y);}
      return (x<y?-1:x>y?1:0)*(desc?-1:1);});
    rows.forEach(function(r){tbody.appendChild(r);});
    for(var j=0;j<ths.length;j++){ths[j].classList.remove('sorted-asc','sorted-desc');}
    ths[i].classList.add(desc?'sorted-desc':'sorted-asc'); table.dataset.sortedBy=ths[i].dataset.col+(desc?':desc':':asc');
  }
  for(var i=0;i<ths.length;i++){(function(i){ths[i].addEventListener('click',function(){
    sortBy(i,ths[i].classList.contains('sorted-asc'));});})(i);}
  var m=/sort=([^:&]+)(?::(asc|desc))?/.exec(location.hash);
  if(m){for(var k=0;k<ths.length;k++){if(ths[k].dataset.col===m[1]){sortBy(k,m[2]==='desc');}}}
  body.dataset.ready='1';
})();
"""


def to_html(rows: List[Dict[str, Any]], summary: List[Dict[str, Any]], clip_cols: Sequence[str], out_dir: str,
            title: str, note: str = "", errors: Sequence[str] = (), viewer: Optional[Dict[str, Any]] = None) -> str:
    e = html.escape
    cols = [("run_id", "run"), ("method", "method"), ("prompt", "prompt"), ("seed", "seed"), ("status", "status")]
    cols += [(c, _col_label(c)) for c in clip_cols]
    cols += [("wall_time_s", "wall time (s)"), ("unet_samples", "UNet samples"), ("attempts", "attempts"),
             ("log", "log")]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}</h1>"]
    parts.append("<h2>Method means</h2><table id='summary'><thead><tr><th>method</th><th>finished / runs</th>"
                 "<th>failed</th>" + "".join(f"<th>{e(_col_label(c))}</th>" for c in clip_cols) +
                 "<th>wall time s</th><th>UNet samples</th></tr></thead><tbody>")
    for s in summary:
        parts.append(f"<tr><td>{e(s['method'])}</td><td>{s['done']} / {s['runs']}</td><td>{s['failed']}</td>" +
                     "".join(f"<td>{e(_fmt_ci(s[c]))}</td>" for c in clip_cols) +
                     f"<td>{e(_fmt_ci(s['wall_time_s'], 1))}</td><td>{e(_fmt_ci(s['unet_samples'], 0))}</td></tr>")
    parts.append(f"</tbody></table><p class='src'>{e(CI_NOTE)}<br>{e(note)}</p>")
    for msg in errors or ():
        parts.append(f"<p class='error'>{e(msg)}</p>")
    parts.append("<h2>Runs</h2><p class='src'>Click a header to sort.</p><table id='runs'><thead><tr>" +
                 "".join(f"<th data-col='{c}'>{e(label)}</th>" for c, label in cols) + "</tr></thead><tbody>")
    for r in rows:
        cells = []
        for c, _ in cols:
            v = r.get(c)
            if c == "log":
                link = _rel(v, out_dir)
                cells.append(f"<td data-v=''>{f'<a href={chr(39)}{link}{chr(39)}>log</a>' if link else ''}</td>")
            elif c == "status":
                cells.append(f"<td class='status-{e(str(v))}' data-v='{e(str(v))}'>{e(str(v))}"
                             + (f"<br><span class='src'>{e(r['reason'])}</span>" if r.get("reason") else "") + "</td>")
            elif isinstance(v, float):
                cells.append(f"<td data-v='{v!r}'>{v:.2f}</td>")
            else:
                cells.append(f"<td data-v='{e('' if v is None else str(v))}'>{e('' if v is None else str(v))}</td>")
        parts.append(f"<tr data-run='{e(r['run_id'])}'>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    parts.append("<h2>Gallery</h2>")
    if viewer and viewer.get("missing"):
        parts.append(f"<p class='src' id='viewer-missing'>3D viewers of the Gaussians: not written, the splat viewer "
                     f"is not installed ({e(viewer['missing'])}).</p>")
    elif viewer:
        parts.append(f"<p class='src'>“3D view”: each run's Gaussians in an interactive viewer (@mkkellogg/"
                     f"gaussian-splats-3d {e(viewer['gaussian-splats-3d'])}, three.js {e(viewer['three'])}) "
                     "beside its test video.</p>")
    parts.append("<table class='gallery'><thead><tr><th>prompt</th>" +
                 "".join(f"<th>{e(m)}</th>" for m in methods) + "</tr></thead><tbody>")
    for p in prompts:
        src = next((r["prompt_source"] for r in rows if r["prompt"] == p and r.get("prompt_source")), None)
        parts.append(f"<tr><td>{e(p)}" + (f"<br><span class='src'>{e(src)}</span>" if src else "") + "</td>")
        for m in methods:
            cell = []
            for r in (r for r in rows if r["prompt"] == p and r["method"] == m):
                cell.append(f"<div class='run' data-run='{e(r['run_id'])}'><span class='src'>seed {r['seed']}"
                            f" · {e(r['status'])}</span>")
                if r.get("video"):
                    cell.append(f"<video controls muted loop preload='metadata' "
                                f"src='{_rel(r['video'], out_dir)}'></video>")
                if r.get("images"):
                    cell.append(f"<img alt='first test view' src='{_rel(r['images'][0], out_dir)}'>")
                if r.get("viewer"):
                    cell.append(f"<a class='splat-link' href='{_rel(r['viewer'], out_dir)}'>3D view</a>")
                if not r.get("video") and not r.get("images"):
                    log = _rel(r.get("log"), out_dir)
                    cell.append("<div class='missing'>" + (f"<a href='{log}'>{e(r['status'])}: log</a>" if log
                                                           else e(r["status"])) + "</div>")
                cell.append("</div>")
            parts.append("<td>" + "".join(cell) + "</td>")
        parts.append("</tr>")
    parts.append(f"</tbody></table><script>{_JS}</script></body></html>\n")
    return "".join(parts)


def gallery_viewer(out_dir: str, rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Per finished run with a Gaussians PLY, an interactive 3D viewer page with its test video beside it
    (:mod:`scoredistill.splat_viewer`): ``OUT/viewer/<run>.html``, the run's row gets ``viewer``.  Returns the
    vendored versions and page count, ``{"missing": how to install}`` when the viewer is not installed, or
    ``None`` when no run has a PLY."""
    from .. import splat_viewer

    with_ply = [r for r in rows if r.get("ply")]
    if not with_ply:
        return None
    vdir = os.path.join(out_dir, "viewer")
    versions = splat_viewer.vendor(os.path.join(vdir, "lib"))
    if versions is None:
        return {"missing": splat_viewer.INSTALL_HINT}
    for r in with_ply:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", r["run_id"])
        r["viewer"] = splat_viewer.write_page(os.path.join(vdir, f"{slug}.html"), r["ply"], os.path.join(vdir, "lib"),
                                              f"{r['method']} · {r['prompt']} · seed {r['seed']}", r.get("video"),
                                              versions)
    return {"three": versions["three"], "gaussian-splats-3d": versions["gaussian-splats-3d"], "pages": len(with_ply)}


def write_report(output_dir: str, out_dir: Optional[str] = None, clip_models: Sequence[str] = DEFAULT_CLIPS,
                 device: str = "cpu", panel: str = "first", log=print) -> Dict[str, str]:
    """Write ``runs.csv``, ``summary.md``, ``report.json`` and ``index.html``; returns their paths.

    Raises:
        ClipModelError: a CLIP model could not be loaded -- after every file was written (its columns blank);
            one line per model, naming it and how to get it.
    """
    output_dir = os.path.abspath(output_dir)
    out_dir = os.path.abspath(out_dir or os.path.join(output_dir, "report"))
    clip_models = list(dict.fromkeys(clip_models))
    clip_errors: Dict[str, str] = {}
    rows = collect(output_dir, clip_models, device, panel, clip_errors)
    clip_cols = metric_cols(clip_models)
    summary = method_summary(rows, clip_cols)
    manifest = read_json(os.path.join(output_dir, "suite.json")) or {}
    title = f"Suite {manifest.get('name', os.path.basename(output_dir))}"
    num_prompts = len(dict.fromkeys(r["prompt"] for r in rows))
    note = protocol_note(clip_models, num_prompts)
    errors = [clip_errors[m] for m in clip_models if m in clip_errors]
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("csv", "runs.csv"), ("markdown", "summary.md"), ("json", "report.json"), ("html", "index.html"))}
    viewer = gallery_viewer(out_dir, rows)
    atomic_write_text(paths["csv"], to_csv(rows, clip_cols))
    md = to_markdown(summary, clip_cols) + f"\n{CI_NOTE}\n\n{note}\n" + "".join(f"\n**{m}**\n" for m in errors)
    atomic_write_text(paths["markdown"], md)
    atomic_write_json(paths["json"], {"runs": rows, "summary": summary, "clip_models": clip_models,
                                      "protocol": note, "num_prompts": num_prompts, "clip_errors": clip_errors,
                                      "splat_viewer": viewer})
    atomic_write_text(paths["html"], to_html(rows, summary, clip_cols, out_dir, title, note, errors, viewer))
    log(md)
    for r in rows:
        if r["status"] in ("failed", "killed", "preempted"):
            log(f"{r['status']}: {r['run_id']} ({r.get('reason')}); log: {r.get('log')}")
    log("\n".join(f"{k}: {v}" for k, v in paths.items()))
    if errors:
        raise ClipModelError("; ".join(errors) if len(errors) > 1 else errors[0])
    return paths
