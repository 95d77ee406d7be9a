"""Share of each guidance's step time spent outside its UNet and VAE, tiny SD on the CPU (same run, a ratio).

    cd <repo> && PYTHONPATH=$PWD/custom THREESTUDIO_ROOT=$PWD/.threestudio python benchmarks/overhead.py

Uses the test harness (threestudio imported in-process on the CPU, tiny SD, threestudio's prompt processor);
:func:`scoredistill.bench.guidance_overhead.measure_overhead` does the measurement.  One intra-op thread.
"""
import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

GUIDANCES = {
    "ge3d": ("ge3d-guidance", dict(trainer_max_steps=100)),
    "lods (embedding)": ("lods-guidance", dict()),
    "vdm": ("vdm-guidance", dict()),
    "uds": ("uds-guidance", dict()),
    "hifa": ("hifa-guidance", dict()),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from harness import import_threestudio, make_prompt_utils, tiny_guidance_config, tiny_sd_path

    from scoredistill.bench.guidance_overhead import measure_overhead

    ts = import_threestudio()
    sd = tiny_sd_path()
    pu = make_prompt_utils(ts, sd, tempfile.mkdtemp())
    print(f"torch {torch.__version__}, 1 thread, tiny SD, render 32², batch 1, mean of {a.steps} steps after {a.warmup}")
    print("| guidance | step ms | UNet+VAE ms | outside ms | outside share | UNet calls/step | tensor host reads/step |")
    print("|---|---|---|---|---|---|---|")
    for label, (name, kw) in GUIDANCES.items():
        if a.only and not any(o in label for o in a.only):
            continue
        g = ts.find(name)(tiny_guidance_config(sd, image_size=32, **kw))
        prompt = pu
        r = measure_overhead(g, prompt, steps=a.steps, warmup=a.warmup)
        print(f"| {label} | {r['step_seconds'] * 1e3:.1f} | {r['model_seconds'] * 1e3:.1f} | {r['overhead_seconds'] * 1e3:.1f} "
              f"| {r['overhead_share']:.2f} | {r['unet_calls']:.0f} | {r['host_reads']} |", flush=True)


if __name__ == "__main__":
    main()
