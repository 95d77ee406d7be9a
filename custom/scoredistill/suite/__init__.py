"""Prompt suites: run prompts × configs × seeds through threestudio's launch.py (locally over GPUs, or on a
cluster through submitit), resumably, and report CLIP scores, wall time and UNet samples with an HTML gallery.

* :mod:`.spec` -- the suite file (``load_suite``), prompt files and T3Bench prompt lists;
* :mod:`.runner` -- ``run_local`` (one run per GPU at a time), ``run_submitit`` (SLURM job arrays,
  requeue on preemption), ``execute_run`` (one attempt of one run);
* :mod:`.state` -- the state files (atomic writes) and the "finished" test;
* :mod:`.report` -- CSV, markdown method means with confidence intervals, static HTML gallery;
* :mod:`.count_launch` -- runs launch.py counting UNet forward samples.

Command line: ``scoredistill suite run SUITE.yaml`` / ``scoredistill suite report OUTPUT_DIR``.
"""
from .spec import Prompt, Run, Suite, SuiteError, load_suite, load_t3bench, read_prompt_file  # noqa: F401
