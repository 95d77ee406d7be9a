"""Run a suite: locally (one run per GPU at a time, a thread pool of subprocesses) or through submitit
(SLURM job arrays, per-job logs, requeue on preemption / timeout; submitit's local executor for tests).

Both paths call :func:`execute_run` for each run, which skips a finished run, records the attempt in
``state.json`` before and after launch.py, and writes launch.py's output to ``logs/attempt-<n>.log``.
"""
from __future__ import annotations

import fcntl
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Queue
from typing import Any, Dict, List, Optional, Sequence

import submitit

from .spec import Run, Suite, SuiteError
from .state import (atomic_write_json, find_test_video, is_finished, read_json, read_state, write_state)

_LIVE: Dict[str, subprocess.Popen] = {}  # run_id -> child process (this process's)
_LIVE_LOCK = threading.Lock()
_PRINT_LOCK = threading.Lock()


def say(msg: str) -> None:
    """Print one whole line and flush (worker threads print concurrently; a killed runner loses nothing)."""
    with _PRINT_LOCK:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def write_manifest(suite: Suite, runs: Sequence[Run], log=None) -> str:
    """``OUTPUT_DIR/suite.json`` and every ``RUN_DIR/run.json``; returns the manifest path.

    A finished run keeps the ``run.json`` it ran with: if the suite now gives it other launch.py arguments
    it is *not* rerun (a warning says so; remove its folder to run it again).
    """
    for r in runs:
        path = os.path.join(r.run_dir, "run.json")
        if is_finished(r.run_dir, r.trial_dir):
            old = read_json(path) or {}
            if old.get("args") != r.args or old.get("launcher") != r.launcher:
                (log or say)(f"[suite] {r.run_id}: finished with other launch.py arguments than the suite gives "
                             f"now; kept (remove {r.run_dir} to run it again)")
            continue
        atomic_write_json(path, r.to_json())
        if not os.path.exists(os.path.join(r.run_dir, "state.json")):
            write_state(r.run_dir, {"status": "pending", "attempt": 0})
    path = os.path.join(suite.output_dir, "suite.json")
    atomic_write_json(path, {
        "name": suite.name, "suite_file": suite.path, "threestudio_root": suite.threestudio_root,
        "methods": [m.name for m in suite.configs], "prompts": [p.text for p in suite.prompts],
        "seeds": suite.seeds, "runs": [{"run_id": r.run_id, "run_dir": r.run_dir} for r in runs],
    })
    return path


def load_runs(output_dir: str) -> List[Run]:
    """The runs of a suite's output folder (from its ``suite.json``)."""
    manifest = read_json(os.path.join(output_dir, "suite.json"))
    if manifest is None:
        raise FileNotFoundError(f"{output_dir} has no suite.json: run `scoredistill suite run` first")
    return [Run.from_json(read_json(os.path.join(r["run_dir"], "run.json"))) for r in manifest["runs"]]


def _pid_alive_for(pid: Optional[int], run_dir: str) -> bool:
    """A process with this pid exists here and its command line names the run's folder."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return run_dir.encode() in f.read()
    except OSError:
        return False


def _end_process(pid: int, run_dir: str, grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, a leftover launch.py of ``run_dir``; returns once it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        while _pid_alive_for(pid, run_dir):
            if time.monotonic() - t0 > grace_s:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
    except ProcessLookupError:
        pass


def execute_run(run: Run, gpu: Optional[str] = None, stop: Optional[threading.Event] = None,
                extra_state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run ``run`` once unless it is finished; returns its final state.

    ``gpu``: the device id to put in ``CUDA_VISIBLE_DEVICES`` (``None``: leave the environment's, as a
    cluster job's).  A previous attempt's trial folder is removed first (its log stays in ``logs/``).
    """
    if is_finished(run.run_dir, run.trial_dir):
        return read_state(run.run_dir)
    prev = read_state(run.run_dir)
    attempt = int(prev.get("attempt", 0)) + 1
    if os.path.isdir(run.trial_dir):
        shutil.rmtree(run.trial_dir)
    logs = os.path.join(run.run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, f"attempt-{attempt}.log")
    count_file = os.path.join(run.run_dir, "unet_samples.json")
    if os.path.exists(count_file):
        os.unlink(count_file)
    env = dict(os.environ)
    env.update(run.env)
    env.setdefault("WANDB_MODE", "disabled")
    env["SCOREDISTILL_UNET_COUNT_FILE"] = count_file
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    cmd = run.command("0")
    state: Dict[str, Any] = {
        "status": "running", "attempt": attempt, "log": log_path, "host": socket.gethostname(),
        "gpu": None if gpu is None else str(gpu), "command": cmd, "started": time.time(),
        **(extra_state or {}),
    }
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ (cd " + run.cwd + " && " + " ".join(cmd) + ")\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=run.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        with _LIVE_LOCK:
            _LIVE[run.run_id] = proc
        state["pid"] = proc.pid
        write_state(run.run_dir, state)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if stop is not None and stop.is_set():
                        proc.terminate()
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(run.run_id, None)
    wall = time.monotonic() - t0
    video = find_test_video(run.trial_dir)
    if rc == 0 and video is not None:
        status, reason = "done", None
    elif rc < 0:
        status, reason = "killed", f"signal {-rc}"
    elif rc == 0:
        status, reason = "failed", "launch.py exited 0 but wrote no test video (save/it*-test.mp4)"
    else:
        status, reason = "failed", f"launch.py exited with code {rc}"
    state.update(status=status, exit_code=rc, reason=reason, finished=time.time(), wall_time_s=wall,
                 video=video, unet=read_json(count_file))
    write_state(run.run_dir, state)
    return state


def _visible_gpu(gpu: int) -> str:
    """The runner's GPU index → the id for the child's ``CUDA_VISIBLE_DEVICES`` (through the runner's own
    ``CUDA_VISIBLE_DEVICES`` when that is set)."""
    parent = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if parent:
        if not 0 <= gpu < len(parent):
            raise SuiteError(f"suite.gpus: GPU index {gpu} but CUDA_VISIBLE_DEVICES={','.join(parent)}")
        return parent[gpu]
    return str(gpu)


class _Stop(Exception):
    pass


def run_local(suite: Suite, gpus: Optional[Sequence[int]] = None, log=say) -> Dict[str, Any]:
    """Run every unfinished run of ``suite``, one per GPU at a time; returns ``{run_id: state}``.

    Holds ``OUTPUT_DIR/.runner.lock`` (a second runner on the same folder is refused).  SIGTERM / SIGINT stop
    the runner: running launch.py processes are terminated (their state becomes ``killed``) and the next
    start runs them again.  A run left ``running`` by a runner that was killed outright is detected (its
    process, if still alive, is ended first) and run again.
    """
    runs = suite.runs()
    os.makedirs(suite.output_dir, exist_ok=True)
    lock_f = open(os.path.join(suite.output_dir, ".runner.lock"), "w")
    try:
        fcntl.flock(lock_f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_f.close()
        raise RuntimeError(f"another suite runner holds {suite.output_dir}/.runner.lock")
    try:
        write_manifest(suite, runs, log)
        gpus = list(gpus if gpus is not None else suite.gpus)
        devices = [_visible_gpu(g) for g in gpus]
        todo = []
        for r in runs:
            if is_finished(r.run_dir, r.trial_dir):
                continue
            st = read_state(r.run_dir)
            if st.get("status") == "running" and st.get("host") == socket.gethostname() \
                    and _pid_alive_for(st.get("pid"), r.run_dir):
                log(f"[suite] {r.run_id}: ending the launch.py left by a killed runner (pid {st['pid']})")
                _end_process(st["pid"], r.run_dir)
            todo.append(r)
        log(f"[suite] {suite.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run "
            f"on {len(devices)} worker(s) (GPUs {','.join(devices)})")
        free: "Queue[str]" = Queue()
        for d in devices:
            free.put(d)
        stop = threading.Event()
        results: Dict[str, Any] = {}

        def work(r: Run):
            if stop.is_set():
                return
            dev = free.get()
            try:
                if stop.is_set():
                    return
                log(f"[suite] start {r.run_id} on GPU {dev}")
                st = execute_run(r, gpu=dev, stop=stop)
                results[r.run_id] = st
                msg = f"[suite] {st['status']} {r.run_id} ({st.get('wall_time_s', 0):.1f} s)"
                if st["status"] != "done":
                    msg += f": {st.get('reason')}; log: {st.get('log')}"
                log(msg)
            finally:
                free.put(dev)

        def on_signal(signum, frame):
            raise _Stop(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if threading.current_thread() is threading.main_thread() else {}
        pool = ThreadPoolExecutor(max_workers=max(1, len(devices)))
        try:
            futures = [pool.submit(work, r) for r in todo]
            for f in futures:
                while not f.done():
                    time.sleep(0.2)
                f.result()
        except _Stop:
            log("[suite] stopping: terminating running launch.py processes")
            stop.set()
            with _LIVE_LOCK:
                procs = list(_LIVE.values())
            for p in procs:
                p.terminate()
        finally:
            pool.shutdown(wait=True)
            for s, h in old.items():
                signal.signal(s, h)
        return {r.run_id: read_state(r.run_dir) for r in runs}
    finally:
        fcntl.flock(lock_f, fcntl.LOCK_UN)
        lock_f.close()


# ------------------------------------------------------------------------------------------------- submitit
class RunJob(submitit.helpers.Checkpointable):
    """The submitit job of one run: ``RunJob()(run_json_path)`` → its final state.

    On preemption or timeout submitit calls :meth:`checkpoint`, which ends the running launch.py, marks the
    run ``preempted`` and requeues the same job (the requeued job runs the run again from the start).
    """

    def __call__(self, run_json: str) -> Dict[str, Any]:
        run = Run.from_json(read_json(run_json))
        extra: Dict[str, Any] = {}
        try:
            env = submitit.JobEnvironment()
            extra = {"job_id": env.job_id, "cluster": env.cluster}
        except Exception:
            pass
        return execute_run(run, gpu=None, extra_state=extra)

    def checkpoint(self, run_json: str):
        run = Run.from_json(read_json(run_json))
        with _LIVE_LOCK:
            proc = _LIVE.get(run.run_id)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        st = read_state(run.run_dir)
        if st.get("status") == "running":
            st["status"] = "preempted"
            write_state(run.run_dir, st)
        return submitit.helpers.DelayedSubmission(RunJob(), run_json)


LOCAL_PARAMS = {"timeout_min", "gpus_per_node", "visible_gpus", "tasks_per_node", "nodes", "signal_delay_s", "setup",
                "stderr_to_stdout"}


def make_executor(folder: str, cluster: Optional[str], params: Dict[str, Any]):
    """A submitit executor: ``slurm`` (or ``None`` with SLURM present) through ``AutoExecutor``, ``local``
    through ``LocalExecutor`` (which takes float ``timeout_min`` and ``signal_delay_s``), ``debug`` in-process.

    ``params``: generic submitit parameters; ``slurm_*`` ones go to SLURM only, ``local_*`` ones (prefix
    removed) to the local executor only.
    """
    if cluster is None:
        cluster = submitit.AutoExecutor.which()
    if cluster == "local":
        ex = submitit.LocalExecutor(folder=folder)
        kw = {k[6:] if k.startswith("local_") else k: v for k, v in params.items() if not k.startswith("slurm_")}
        ex.update_parameters(**{k: v for k, v in kw.items() if k in LOCAL_PARAMS})
        return ex
    if cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    kw = {k: v for k, v in params.items() if not k.startswith("local_")}
    if "timeout_min" in kw:
        kw["timeout_min"] = int(math.ceil(kw["timeout_min"]))
    ex.update_parameters(**kw)
    return ex


def run_submitit(suite: Suite, cluster: Optional[str] = None, wait: bool = True,
                 params: Optional[Dict[str, Any]] = None, log=say) -> Dict[str, Any]:
    """Submit every unfinished run as one submitit job array (``AutoExecutor``; ``cluster``: ``slurm``,
    ``local`` or ``debug``, default: SLURM when available, else local).

    Executor parameters: ``gpus_per_node=1, tasks_per_node=1, nodes=1, timeout_min=240`` then the suite's
    ``slurm:`` mapping, then ``params`` (e.g. ``slurm_partition``, ``slurm_array_parallelism``,
    ``cpus_per_task``, ``mem_gb``, ``slurm_additional_parameters``).  Logs: ``OUTPUT_DIR/submitit/<job id>/``
    (submitit's stdout/stderr per array task) besides each run's ``logs/attempt-<n>.log``.  Runs left
    ``queued``/``running`` by a live SLURM job are not submitted twice.  With ``wait`` the call returns when
    the jobs end; otherwise right after submission (the states fill in as jobs run).
    """
    runs = suite.runs()
    os.makedirs(suite.output_dir, exist_ok=True)
    write_manifest(suite, runs, log)
    folder = os.path.join(suite.output_dir, "submitit", "%j")
    p: Dict[str, Any] = {"gpus_per_node": 1, "tasks_per_node": 1, "nodes": 1, "timeout_min": 240,
                         "name": f"suite-{suite.name}"}
    p.update(suite.slurm)
    p.update(params or {})
    cluster = cluster or submitit.AutoExecutor.which()
    executor = make_executor(folder, cluster, p)
    todo = []
    for r in runs:
        if is_finished(r.run_dir, r.trial_dir):
            continue
        st = read_state(r.run_dir)
        if st.get("cluster") == "slurm" and st.get("status") in ("queued", "running") and st.get("job_id"):
            try:
                if not submitit.SlurmJob(folder=folder, job_id=st["job_id"]).done(force_check=True):
                    log(f"[suite] {r.run_id}: still in SLURM job {st['job_id']}, not resubmitted")
                    continue
            except Exception:
                pass
        todo.append(r)
    log(f"[suite] {suite.name}: {len(runs)} runs, {len(runs) - len(todo)} finished or in flight, "
        f"{len(todo)} submitted ({cluster})")
    if not todo:
        return {r.run_id: read_state(r.run_dir) for r in runs}
    jobs = executor.map_array(RunJob(), [os.path.join(r.run_dir, "run.json") for r in todo])
    for r, j in zip(todo, jobs):
        st = read_state(r.run_dir)
        if st.get("status") not in ("running", "done", "failed"):
            st.update(status="queued", job_id=j.job_id, cluster=cluster)
            write_state(r.run_dir, st)
        log(f"[suite] {r.run_id}: job {j.job_id}, logs {j.paths.stdout}")
    if wait:
        for r, j in zip(todo, jobs):
            try:
                j.result()
            except Exception as e:  # the run's own state has the details; the job's logs the traceback
                log(f"[suite] job {j.job_id} ({r.run_id}) raised: {str(e).splitlines()[0] if str(e) else e}")
    return {r.run_id: read_state(r.run_dir) for r in runs}


def summarize(states: Dict[str, Dict[str, Any]]) -> str:
    counts: Dict[str, int] = {}
    for st in states.values():
        counts[st.get("status", "pending")] = counts.get(st.get("status", "pending"), 0) + 1
    lines = [", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))]
    for rid, st in states.items():
        if st.get("status") in ("failed", "killed", "preempted"):
            lines.append(f"  {st['status']}: {rid} ({st.get('reason')}) log: {st.get('log')}")
    return "\n".join(lines)
