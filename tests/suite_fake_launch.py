"""A stand-in for threestudio's launch.py in the suite runner's fast tests (tests only).

Takes launch.py's arguments (``--config C --train --gpu N key=value ...``), writes what a finished trial
writes that the suite reads -- ``configs/parsed.yaml`` with the prompt, ``save/it2-test/{0,1}.png`` (2-panel
strips) and ``save/it2-test.mp4`` (a real H.264 video, imageio-ffmpeg) -- into ``exp_root_dir/name/tag``.
Behaviour by prompt: ``FAIL`` exits 3 after printing a traceback; ``NOVIDEO`` exits 0 without the video;
``SLEEP<s>`` sleeps s seconds first (``SLEEPONCE<s>``: only on the run's first invocation).  Every
invocation appends ``tag gpu start end`` to ``$FAKE_LAUNCH_LOG``.
"""
import os
import re
import sys
import time


def main():
    args = sys.argv[1:]
    kv = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--"))
    exp_root, name, tag = kv["exp_root_dir"], kv["name"], kv["tag"]
    prompt = kv["system.prompt_processor.prompt"]
    if prompt.startswith('"'):
        import json

        prompt = json.loads(prompt)
    trial = os.path.join(exp_root, name, tag)
    start = time.time()
    marker = os.path.join(exp_root, "fake-invocations")
    with open(marker, "a") as f:
        f.write("x\n")
    n_calls = sum(1 for _ in open(marker))
    m = re.search(r"SLEEP(ONCE)?(\d+(?:\.\d+)?)", prompt)
    if m and (not m.group(1) or n_calls == 1):
        time.sleep(float(m.group(2)))
    print(f"fake launch.py: {prompt!r} -> {trial}", flush=True)
    os.makedirs(os.path.join(trial, "configs"), exist_ok=True)
    with open(os.path.join(trial, "configs", "parsed.yaml"), "w") as f:
        f.write(f"system:\n  prompt_processor:\n    prompt: {prompt!r}\n")
    rc = 0
    if "FAIL" in prompt:
        print("Traceback (most recent call last):\nRuntimeError: fake failure", file=sys.stderr, flush=True)
        rc = 3
    else:
        import imageio
        import numpy as np

        d = os.path.join(trial, "save", "it2-test")
        os.makedirs(d, exist_ok=True)
        rng = np.random.default_rng(abs(hash(prompt)) % 2**32)
        frames = []
        for i in range(2):
            img = rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)
            imageio.imwrite(os.path.join(d, f"{i}.png"), img)
            frames.append(img)
        if "NOVIDEO" not in prompt:
            imageio.mimwrite(os.path.join(trial, "save", "it2-test.mp4"), frames * 4, fps=4)
    log = os.environ.get("FAKE_LAUNCH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{tag} {os.environ.get('CUDA_VISIBLE_DEVICES', '')} {start} {time.time()}\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
