"""The suite report as a user meets it (issue 28, item 5; issue 24, ``report --clip-model /nonexistent``): a CLIP
model that cannot be loaded is one line naming it and how to get it, after the CSV, summary and gallery were
written; confidence intervals only where n >= 3; CLIP R-Precision (DreamFusion's protocol) beside the CLIP
score, with exact expectations on constructed embeddings and on the tiny random CLIP."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from scoredistill import cli
from scoredistill.bench import clip_score
from scoredistill.suite import report, spec
from test_suite import fake_suite


@pytest.fixture(scope="module")
def tiny_clip():
    from harness import tiny_clip_path

    return tiny_clip_path()


def _run_suite(tmp_path, prompts, configs=("a",)):
    path = fake_suite(tmp_path, prompts, configs=configs)
    cli.main(["suite", "run", path])
    return spec.load_suite(path)


# ------------------------------------------------------------------------------------------ missing CLIP model
@pytest.mark.parametrize("kind", ["folder", "hub"])
def test_missing_clip_model_is_one_line_and_everything_else_is_written(tmp_path, capsys, monkeypatch, kind):
    suite = _run_suite(tmp_path, ["a cat", "a dog", "a FAIL"])
    capsys.readouterr()
    if kind == "folder":
        model = str(tmp_path / "no-such-clip")
        how = "pass --clip-model a folder written by CLIPModel.save_pretrained"
        rc = cli.main(["suite", "report", suite.output_dir, "--clip-model", model])
        err = capsys.readouterr().err
    else:  # a Hub name not in the cache, offline (as on a machine without the weights): the real command
        model = "scoredistill-test/no-such-clip-model"
        how = f"huggingface-cli download {model}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
        proc = subprocess.run([sys.executable, "-m", "scoredistill.cli", "suite", "report", suite.output_dir,
                               "--clip-model", model], env=env, capture_output=True, text=True, timeout=300)
        rc, err = proc.returncode, proc.stderr
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"scoredistill suite: CLIP model {model!r} cannot be loaded (") and how in lines[0]
    out = os.path.join(suite.output_dir, "report")
    rows = list(csv.DictReader(open(os.path.join(out, "runs.csv"))))
    assert sorted(r["status"] for r in rows) == ["done", "done", "failed"]
    col = report.clip_col(model)
    assert all(r[col] == "" and r[report.rprec_col(model)] == "" for r in rows)
    page = open(os.path.join(out, "index.html")).read()
    assert "<video" in page and "cannot be loaded" in page  # the gallery is there, with the error on it
    data = json.load(open(os.path.join(out, "report.json")))
    assert list(data["clip_errors"]) == [model] and data["clip_errors"][model] == lines[0][len("scoredistill suite: "):]
    assert "cannot be loaded" in open(os.path.join(out, "summary.md")).read()
    # status needs no CLIP either
    assert cli.main(["suite", "status", suite.output_dir]) == 0


def test_one_missing_model_keeps_the_others_numbers(tmp_path, tiny_clip):
    suite = _run_suite(tmp_path, ["a cat", "a dog"])
    missing = str(tmp_path / "no-such-clip")
    with pytest.raises(clip_score.ClipModelError, match="no-such-clip"):
        report.write_report(suite.output_dir, clip_models=[missing, tiny_clip], log=lambda *a: None)
    rows = list(csv.DictReader(open(os.path.join(suite.output_dir, "report", "runs.csv"))))
    assert all(r[report.clip_col(missing)] == "" for r in rows)
    assert all(r[report.clip_col(tiny_clip)] != "" and r[report.rprec_col(tiny_clip)] != "" for r in rows)


def test_clip_score_command_names_a_missing_model(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as e:
        clip_score.main([str(tmp_path), "--prompt", "a cat", "--model", str(tmp_path / "nope")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"CLIP model '{tmp_path / 'nope'}' cannot be loaded" in err


# ------------------------------------------------------------------------------------------ intervals
def test_confidence_interval_only_for_three_or_more_runs(tmp_path):
    # method a: 3 finished runs -> mean ± t-interval; method b: 2 finished (one failed) -> the values themselves
    path = fake_suite(tmp_path, ["a cat", "a dog", "a fish"], configs=("a",))
    cli.main(["suite", "run", path])
    suite = spec.load_suite(path)
    paths = report.write_report(suite.output_dir, clip_models=[], log=lambda *a: None)
    rows = json.load(open(paths["json"]))["runs"]
    walls = [r["wall_time_s"] for r in rows]
    mean, hw = report.t_interval(walls)
    md = open(paths["markdown"]).read()
    assert f"| a | 3 / 3 | 0 | {mean:.1f} ± {hw:.1f} | n/a |" in md
    s = json.load(open(paths["json"]))["summary"][0]["wall_time_s"]
    assert s["n"] == 3 and s["ci95"] == pytest.approx(hw) and s["values"] == walls

    path2 = fake_suite(tmp_path / "two", ["a cat", "a dog", "a FAIL"], configs=("b",)) if (tmp_path / "two").mkdir() \
        is None else None
    cli.main(["suite", "run", path2])
    paths2 = report.write_report(spec.load_suite(path2).output_dir, clip_models=[], log=lambda *a: None)
    rows2 = [r for r in json.load(open(paths2["json"]))["runs"] if r["status"] == "done"]
    md2 = open(paths2["markdown"]).read()
    vals = ", ".join(f"{r['wall_time_s']:.1f}" for r in rows2)
    assert f"| b | 2 / 3 | 1 | [{vals}] (n = 2) | n/a |" in md2 and "±" not in md2.split("\n\n")[0]
    assert json.load(open(paths2["json"]))["summary"][0]["wall_time_s"]["ci95"] is None


def test_format_of_small_samples():
    assert report._fmt_ci(report.stat([14.1, 15.16])) == "[14.10, 15.16] (n = 2)"
    assert report._fmt_ci(report.stat([3.0])) == "[3.00] (n = 1)"
    assert report._fmt_ci(report.stat([])) == "n/a"
    assert report._fmt_ci(report.stat([1.0, 2.0, 3.0])) == f"2.00 ± {4.302652729696 / 3 ** 0.5:.2f}"


# ------------------------------------------------------------------------------------------ R-Precision
def test_retrieval_hits_on_constructed_embeddings():
    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    images = torch.tensor([[2.0, 0.1, 0], [0.1, 1.0, 0], [0.5, 0.5, 0], [0.9, 0, 1.0], [3.0, 0, 0.2]])
    # image 0: caption 0; 1: caption 1; 2: a tie of 0 and 1 (a miss); 3: caption 2; 4: caption 0 (norm irrelevant)
    assert report_hits(images, text, 0) == [True, False, False, False, True]
    assert report_hits(images, text, 1) == [False, True, False, False, False]
    assert report_hits(images, text, 2) == [False, False, False, True, False]
    with pytest.raises(ValueError, match="at least 2 captions"):
        clip_score.retrieval_hits(images, text[:1], 0)
    with pytest.raises(ValueError, match=r"true_index must be in \[0, 2\]"):
        clip_score.retrieval_hits(images, text, 3)


def report_hits(images, text, i):
    return [bool(h) for h in clip_score.retrieval_hits(images, text, i)]


class _ColourClip:
    """A stand-in CLIP with known embeddings: an image's embedding is its mean RGB, a caption's the one-hot of
    its colour word (red, green, blue)."""

    WORDS = ("red", "green", "blue")

    def get_text_features(self, input_ids):
        return torch.nn.functional.one_hot(input_ids[:, 0], 3).float()

    def get_image_features(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))


class _ColourProcessor:
    def __call__(self, text=None, images=None, **kw):
        import numpy as np

        if text is not None:
            return {"input_ids": torch.tensor([[next(i for i, w in enumerate(_ColourClip.WORDS) if w in t)]
                                               for t in text])}
        return {"pixel_values": torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)
                                             for im in images])}


def test_clip_metrics_r_precision_is_exact_on_known_embeddings():
    from PIL import Image

    red, green, reddish = (Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0), (200, 90, 30)))
    m = clip_score.clip_metrics([red, green, reddish, red], "a red ball", ["a red ball", "a green ball", "a blue ball"],
                                _ColourClip(), _ColourProcessor())
    assert m["hits"] == [True, False, True, True] and m["r_precision"] == 75.0 and m["num_prompts"] == 3
    cos_reddish = 200 / (200 ** 2 + 90 ** 2 + 30 ** 2) ** 0.5
    assert m["per_image"] == pytest.approx([100.0, 0.0, 100 * cos_reddish, 100.0])
    # the run's own prompt is always a candidate; one candidate only: no R-Precision
    assert clip_score.clip_metrics([red], "a red ball", None, _ColourClip(), _ColourProcessor())["r_precision"] is None
    assert clip_score.clip_metrics([green], "a green ball", ["a red ball"], _ColourClip(),
                                   _ColourProcessor())["hits"] == [True]


def test_report_r_precision_matches_independent_retrieval_on_tiny_clip(tmp_path, tiny_clip):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    suite = _run_suite(tmp_path, ["a cat", "a dog", "a hamburger"], configs=("a", "b"))
    paths = report.write_report(suite.output_dir, clip_models=[tiny_clip], log=lambda *a: None)
    data = json.load(open(paths["json"]))
    prompts = ["a cat", "a dog", "a hamburger"]
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        t = model.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True))
        t = getattr(t, "pooler_output", t)
        t = torch.nn.functional.normalize(t, dim=-1)
        per_method = {}
        for r in data["runs"]:
            hits = []
            for f in r["images"]:
                img = Image.open(f).convert("RGB").crop((0, 0, 32, 32))
                v = model.get_image_features(pixel_values=proc(images=[img], return_tensors="pt")["pixel_values"])
                v = torch.nn.functional.normalize(getattr(v, "pooler_output", v), dim=-1)
                sims = (v @ t.T)[0].tolist()
                own = sims[prompts.index(r["prompt"])]
                hits.append(all(own > s for j, s in enumerate(sims) if j != prompts.index(r["prompt"])))
            expected = 100.0 * sum(hits) / len(hits)
            assert r[report.rprec_col(tiny_clip)] == pytest.approx(expected, abs=1e-9)
            per_method.setdefault(r["method"], []).append(expected)
    for s in data["summary"]:
        got = s[report.rprec_col(tiny_clip)]
        assert got["n"] == 3 and got["mean"] == pytest.approx(sum(per_method[s["method"]]) / 3)
    assert "among the suite's 3 distinct prompts" in data["protocol"] and "chance level 33.3 %" in data["protocol"]
    md = open(paths["markdown"]).read()
    assert f"R-Precision {report.model_key(tiny_clip)}" in md.splitlines()[0] and "DreamFusion" in md
    # cached with the candidate prompts; a report of a suite with other prompts recomputes
    cache = json.load(open(os.path.join(data["runs"][0]["run_dir"], f"clip-{report.model_key(tiny_clip)}.json")))
    assert cache["prompts"] == prompts and len(cache["hits"]) == 2


def test_default_models_are_b32_and_l14():
    assert report.DEFAULT_CLIPS == ("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14")


# ------------------------------------------------------------------------------------------ 3D viewer in the gallery
def _add_plys(suite):
    """Give every finished run of a stand-in suite a Gaussians PLY (the ground-truth cube, 3000 Gaussians)."""
    import shutil

    from scoredistill.bench import gt_scenes

    gt_scenes.scene_params("cube")
    src = os.path.join(gt_scenes.SCENE_DIR, "cube.ply")
    n = 0
    for r in suite.runs():
        if os.path.isdir(os.path.join(r.trial_dir, "save")):
            shutil.copyfile(src, os.path.join(r.trial_dir, "save", "gaussians.ply"))
            n += 1
    return n


def test_gallery_says_how_to_get_the_viewer_when_it_is_missing(tmp_path, monkeypatch):
    from scoredistill import splat_viewer

    suite = _run_suite(tmp_path, ["a cat", "a dog"])
    assert _add_plys(suite) == 2
    monkeypatch.setattr(splat_viewer, "find_viewer", lambda: None)
    paths = report.write_report(suite.output_dir, clip_models=[], log=lambda *a: None)
    page = open(paths["html"]).read()
    assert "id='viewer-missing'" in page and "@mkkellogg/gaussian-splats-3d@0.4.7" in page
    assert "splat-link" not in page and json.load(open(paths["json"]))["splat_viewer"]["missing"]


def _viewer_or_skip():
    from scoredistill import splat_viewer

    nm = splat_viewer.find_viewer()
    if nm is None:
        pytest.skip(f"needs the splat viewer from npm: {splat_viewer.INSTALL_HINT}")
    return nm


def test_gallery_shows_each_runs_gaussians_in_a_3d_viewer_in_headless_chromium(tmp_path):
    """The gallery links a viewer page per run; the page loads the run's PLY into gaussian-splats-3d (its own
    count of Gaussians equals the PLY's), draws it (a screenshot with the cube's colours in the viewer's box)
    and shows the test video beside it."""
    from test_suite import chromium

    if not chromium():
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    _viewer_or_skip()
    import re
    import subprocess as sp

    import numpy as np
    from PIL import Image

    suite = _run_suite(tmp_path, ["a cat", "a dog", "a FAIL"])
    assert _add_plys(suite) == 2
    paths = report.write_report(suite.output_dir, clip_models=[], log=lambda *a: None)
    data = json.load(open(paths["json"]))
    done = [r for r in data["runs"] if r["status"] == "done"]
    assert data["splat_viewer"]["pages"] == 2 and data["splat_viewer"]["gaussian-splats-3d"] == "0.4.7"
    page = open(paths["html"]).read()
    assert len(re.findall(r"<a class='splat-link' href='viewer/[^']+\.html'>3D view</a>", page)) == 2
    flags = [chromium(), "--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             "--virtual-time-budget=20000"]
    viewer = done[0]["viewer"]
    vpage = open(viewer).read()
    assert os.path.relpath(done[0]["video"], os.path.dirname(viewer)) in vpage  # the test video beside it
    dom = sp.run(flags + [f"--user-data-dir={tmp_path / 'p1'}", "--dump-dom", "file://" + viewer],
                 capture_output=True, text=True, timeout=180).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-ready="1"' in body and 'data-splat-count="3000"' in body and "data-error" not in body, body
    shot = tmp_path / "viewer.png"
    sp.run(flags + [f"--user-data-dir={tmp_path / 'p2'}", "--window-size=900,700", f"--screenshot={shot}",
                    "file://" + viewer], capture_output=True, text=True, timeout=180)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    box = img[80:480, 20:440]  # the viewer's 420 px box under the title
    coloured = (box.max(axis=-1) - box.min(axis=-1)) > 80  # saturated pixels: the cube's faces, not white/grey
    assert coloured.mean() > 0.2, coloured.mean()
    # the red front face and the blue side face are visible from the start camera (threestudio's +Z up)
    for ch in (0, 2):
        dominant = (box[..., ch] > 150) & (np.delete(box, ch, axis=-1).max(axis=-1) < 120)
        assert dominant.mean() > 0.005, (ch, dominant.mean())
