"""Suite report: CLIP score, wall time, UNet samples and status per run; a CSV, a markdown table of method
means with confidence intervals, and a static HTML gallery.

* CLIP score: :mod:`scoredistill.bench.clip_score` (``100 · max(cos, 0)`` of each test view's RGB panel
  against the run's prompt, averaged over the views), with ``openai/clip-vit-large-patch14`` (ViT-L/14) by
  default; more models can be given (e.g. ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``, the ViT-bigG-14 that
  DreamMapping Table 2 and GE3D also report).  Each model is loaded once; a run's score is cached in
  ``RUN_DIR/clip-<model>.json`` (recomputed when the run finished again).
* wall time: launch.py's wall-clock seconds, measured by the runner; UNet samples: forward samples counted
  in the run (:mod:`.count_launch`; empty when the launcher did not count).
* method means: over the finished runs of each method (all prompts and seeds), with a two-sided 95 %
  Student-t interval ``mean ± t_{0.975, n-1} · s / √n`` (``n/a`` for fewer than 2 runs).

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

from .runner import load_runs
from .spec import Run
from .state import atomic_write_json, atomic_write_text, csv_safe, find_test_video, read_json, safe_read_state

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
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


class _Clip:
    def __init__(self, model: str, device: str):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model)
        self.device = device


def clip_for_run(run: Run, state: Dict[str, Any], model: str, loaded: Dict[str, _Clip], device: str = "cpu",
                 panel: str = "first") -> Optional[Dict[str, Any]]:
    """CLIP score of a finished run (cached in ``RUN_DIR/clip-<model>.json``); ``None`` if not finished."""
    if state.get("status") != "done":
        return None
    from ..bench import clip_score as cs

    cache = os.path.join(run.run_dir, f"clip-{model_key(model)}.json")
    hit = read_json(cache)
    if hit and hit.get("finished") == state.get("finished") and hit.get("panel") == panel and hit.get("model") == model:
        return hit
    files = cs.find_test_images(run.trial_dir)
    if model not in loaded:
        loaded[model] = _Clip(model, device)
    c = loaded[model]
    scores = cs.clip_scores([cs.load_image(f, panel) for f in files], run.prompt, c.model, c.processor, device)
    res = {"model": model, "panel": panel, "finished": state.get("finished"), "num_images": len(files),
           "clip_score": float(scores.mean()), "per_image": [float(s) for s in scores]}
    atomic_write_json(cache, res)
    return res


def _test_images(trial_dir: str) -> List[str]:
    from ..bench.clip_score import find_test_images

    try:
        return find_test_images(trial_dir) if os.path.isdir(os.path.join(trial_dir, "save")) else []
    except FileNotFoundError:
        return []


def collect(output_dir: str, clip_models: Sequence[str] = (DEFAULT_CLIP,), device: str = "cpu",
            panel: str = "first") -> List[Dict[str, Any]]:
    """One row per run: ids, status, attempts, exit code, wall time, UNet samples, CLIP score per model,
    test video, test images, log."""
    rows = []
    loaded: Dict[str, _Clip] = {}
    for run in load_runs(output_dir):
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
        }
        for m in clip_models:
            try:
                res = clip_for_run(run, st, m, loaded, device, panel)
            except FileNotFoundError as e:  # finished, but its test renders were removed since
                res, row["reason"] = None, str(e)
            row[f"clip_{model_key(m)}"] = None if res is None else res["clip_score"]
        rows.append(row)
    return rows


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
            s[col] = t_interval(vals) + (len(vals),)
        out.append(s)
    return out


def _fmt_ci(v, digits=2) -> str:
    mean, hw, n = v
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {hw:.{digits}f}" if hw is not None else f"{mean:.{digits}f} (n = 1, no CI)"


def to_markdown(summary: List[Dict[str, Any]], clip_cols: Sequence[str]) -> str:
    head = ["method", "finished / runs", "failed"] + [f"CLIP {c[5:]} (95 % CI)" for c in clip_cols] + \
           ["wall time s (95 % CI)", "UNet samples (95 % CI)"]
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
            title: str) -> str:
    e = html.escape
    cols = [("run_id", "run"), ("method", "method"), ("prompt", "prompt"), ("seed", "seed"), ("status", "status")]
    cols += [(c, f"CLIP {c[5:]}") for c in clip_cols]
    cols += [("wall_time_s", "wall time (s)"), ("unet_samples", "UNet samples"), ("attempts", "attempts"),
             ("log", "log")]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}</h1>"]
    parts.append("<h2>Method means</h2><table id='summary'><thead><tr><th>method</th><th>finished / runs</th>"
                 "<th>failed</th>" + "".join(f"<th>CLIP {e(c[5:])} (95 % CI)</th>" for c in clip_cols) +
                 "<th>wall time s (95 % CI)</th><th>UNet samples (95 % CI)</th></tr></thead><tbody>")
    for s in summary:
        parts.append(f"<tr><td>{e(s['method'])}</td><td>{s['done']} / {s['runs']}</td><td>{s['failed']}</td>" +
                     "".join(f"<td>{e(_fmt_ci(s[c]))}</td>" for c in clip_cols) +
                     f"<td>{e(_fmt_ci(s['wall_time_s'], 1))}</td><td>{e(_fmt_ci(s['unet_samples'], 0))}</td></tr>")
    parts.append("</tbody></table>")
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
    parts.append("<h2>Gallery</h2><table class='gallery'><thead><tr><th>prompt</th>" +
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
                if not r.get("video") and not r.get("images"):
                    log = _rel(r.get("log"), out_dir)
                    cell.append("<div class='missing'>" + (f"<a href='{log}'>{e(r['status'])}: log</a>" if log
                                                           else e(r["status"])) + "</div>")
                cell.append("</div>")
            parts.append("<td>" + "".join(cell) + "</td>")
        parts.append("</tr>")
    parts.append(f"</tbody></table><script>{_JS}</script></body></html>\n")
    return "".join(parts)


def write_report(output_dir: str, out_dir: Optional[str] = None, clip_models: Sequence[str] = (DEFAULT_CLIP,),
                 device: str = "cpu", panel: str = "first", log=print) -> Dict[str, str]:
    """Write ``runs.csv``, ``summary.md``, ``report.json`` and ``index.html``; returns their paths."""
    output_dir = os.path.abspath(output_dir)
    out_dir = os.path.abspath(out_dir or os.path.join(output_dir, "report"))
    rows = collect(output_dir, clip_models, device, panel)
    clip_cols = [f"clip_{model_key(m)}" for m in clip_models]
    summary = method_summary(rows, clip_cols)
    manifest = read_json(os.path.join(output_dir, "suite.json")) or {}
    title = f"Suite {manifest.get('name', os.path.basename(output_dir))}"
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("csv", "runs.csv"), ("markdown", "summary.md"), ("json", "report.json"), ("html", "index.html"))}
    atomic_write_text(paths["csv"], to_csv(rows, clip_cols))
    md = to_markdown(summary, clip_cols)
    atomic_write_text(paths["markdown"], md)
    atomic_write_json(paths["json"], {"runs": rows, "summary": summary, "clip_models": list(clip_models)})
    atomic_write_text(paths["html"], to_html(rows, summary, clip_cols, out_dir, title))
    log(md)
    for r in rows:
        if r["status"] in ("failed", "killed", "preempted"):
            log(f"{r['status']}: {r['run_id']} ({r.get('reason')}); log: {r.get('log')}")
    log("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return paths
