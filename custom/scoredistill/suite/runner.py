"""Run a suite: locally (one run per GPU at a time, a thread pool of subprocesses) or through submitit
(SLURM job arrays, per-job logs, requeue on preemption / timeout; submitit's local executor for tests).

Both paths call :func:`execute_run` for each run, which skips a finished run, records the attempt in
``state.json`` before and after launch.py, and writes launch.py's output to ``logs/attempt-<n>.log``.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import shlex
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
from scoredistill.atomic_io import SymlinkRefused, open_no_follow

from .state import (StateError, atomic_write_json, find_test_video, is_finished, read_json, read_state,
                    safe_read_state, write_state)

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
            try:
                old = read_json(path) or {}
            except StateError:
                old = {}
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
    """The runs of a suite's output folder (from its ``suite.json``); errors name the file at fault."""
    path = os.path.join(output_dir, "suite.json")
    manifest = read_json(path)
    if manifest is None:
        raise FileNotFoundError(f"{output_dir} has no suite.json: run `scoredistill suite run` first")
    try:
        run_files = [os.path.join(r["run_dir"], "run.json") for r in manifest["runs"]]
    except (KeyError, TypeError):
        raise StateError(f"{path} is not a suite manifest (no runs[].run_dir); run `scoredistill suite run` "
                         "again to rewrite it") from None
    runs = []
    for f in run_files:
        data = read_json(f)
        try:
            runs.append(Run.from_json(data))
        except TypeError:
            raise StateError(f"{f} is not a run description; run `scoredistill suite run` again to rewrite it") from None
    return runs


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


RUNNER_LOCK = ".runner.lock"
RUN_LOCK = ".run.lock"


class Busy(RuntimeError):
    """The lock is held by another runner or job."""


@contextlib.contextmanager
def held_lock(path: str, what: str):
    """Hold an exclusive ``flock`` on ``path`` (created if absent, never through a symbolic link) for the block.

    The one locking mechanism of every execution path: the local runner and a submitit / SLURM submission
    hold ``OUTPUT_DIR/.runner.lock`` while they run or submit; :func:`execute_run` -- whoever calls it: a local
    worker, a submitit job on this machine or a SLURM node (``flock`` works across NFS clients on Linux) --
    holds ``RUN_DIR/.run.lock`` for the whole attempt.

    Raises:
        Busy: another process (or another open of the file) holds it.
        SuiteError: the lock cannot be created (read-only or unwritable folder, a symbolic link at ``path``).
    """
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open_no_follow(path, "a")
    except SymlinkRefused as e:
        raise SuiteError(f"{what}: {e}") from None
    except OSError as e:
        raise SuiteError(f"{what}: cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise Busy(f"another suite runner holds {path}") from None
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


def _prepare_output_dir(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise SuiteError(f"suite.output_dir: cannot create {output_dir}: {e.strerror or e}") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise SuiteError(f"suite.output_dir: {output_dir} is not writable")


def _remove_trial(trial_dir: str, log) -> None:
    """Remove a previous attempt's trial folder; a symbolic link there is removed itself (its target is not
    this run's to delete)."""
    if os.path.islink(trial_dir):
        log(f"[suite] {trial_dir} is a symbolic link (to {os.readlink(trial_dir)}); removing the link, not its target")
        os.unlink(trial_dir)
    elif os.path.isdir(trial_dir):
        shutil.rmtree(trial_dir)


def execute_run(run: Run, gpu: Optional[str] = None, stop: Optional[threading.Event] = None,
                extra_state: Optional[Dict[str, Any]] = None, log=say) -> Dict[str, Any]:
    """Run ``run`` once unless it is finished; returns its final state.

    ``gpu``: the device id to put in ``CUDA_VISIBLE_DEVICES`` (``None``: leave the environment's, as a
    cluster job's).  Holds ``RUN_DIR/.run.lock`` for the attempt: a run that another runner or job is running
    is left alone (its state is returned, nothing is removed).  A launch.py of the run left by a runner that
    was killed outright is ended first.  A previous attempt's trial folder is removed (its log stays in
    ``logs/``).  Errors of this run (an unreadable ``state.json``, a folder outside ``suite.output_dir``, a
    symbolic link where a log goes) fail this run only: the returned state says why.
    """
    try:
        _check_run_dir(run)
        with held_lock(os.path.join(run.run_dir, RUN_LOCK), f"run {run.run_id}"):
            return _execute_locked(run, gpu, stop, extra_state, log)
    except Busy:
        st = dict(safe_read_state(run.run_dir))
        st["note"] = "running under another runner or job (RUN_DIR/.run.lock held); left alone"
        log(f"[suite] {run.run_id}: {st['note']}")
        return st
    except (SuiteError, StateError, OSError) as e:
        msg = str(e).replace("\n", " ")
        log(f"[suite] failed {run.run_id}: {msg}")
        return {**safe_read_state(run.run_dir), "status": "failed", "reason": msg}


def _check_run_dir(run: Run) -> None:
    """``RUN_DIR`` (``OUTPUT_DIR/runs/<method>/<tag>``) and its ``logs/`` resolve where they are named: no symbolic
    link on the way, so nothing of the run is written outside ``suite.output_dir``."""
    out_dir = os.path.dirname(os.path.dirname(os.path.dirname(run.run_dir)))
    expected = os.path.join(os.path.realpath(out_dir), os.path.relpath(run.run_dir, out_dir))
    if os.path.realpath(run.run_dir) != expected:
        raise SuiteError(f"run {run.run_id}: its folder {run.run_dir} resolves to {os.path.realpath(run.run_dir)} "
                         f"(a symbolic link?), not to {expected} inside suite.output_dir; refusing to write there")
    logs = os.path.join(run.run_dir, "logs")
    if os.path.islink(logs):
        raise SuiteError(f"run {run.run_id}: {logs} is a symbolic link (to {os.readlink(logs)}); refusing to write "
                         "logs through it: remove it")


def _execute_locked(run: Run, gpu, stop, extra_state, log) -> Dict[str, Any]:
    if is_finished(run.run_dir, run.trial_dir):
        return read_state(run.run_dir)
    prev = read_state(run.run_dir)
    if prev.get("status") == "running" and prev.get("host") == socket.gethostname() \
            and _pid_alive_for(prev.get("pid"), run.run_dir):
        log(f"[suite] {run.run_id}: ending the launch.py left by a killed runner (pid {prev['pid']})")
        _end_process(prev["pid"], run.run_dir)
    attempt = int(prev.get("attempt", 0) or 0) + 1
    if os.path.islink(os.path.dirname(run.trial_dir)):  # RUN_DIR/<method>: the runner's folder, never a link
        _remove_trial(os.path.dirname(run.trial_dir), log)
    _remove_trial(run.trial_dir, log)
    logs = os.path.join(run.run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, f"attempt-{attempt}.log")
    count_file = os.path.join(run.run_dir, "unet_samples.json")
    if os.path.lexists(count_file):
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
    with open_no_follow(log_path, "w") as logf:
        # shell-quoted: pasting the line runs the same command (a prompt's `$(...)` stays text)
        logf.write("$ " + shlex.join(["cd", run.cwd]) + " && " + shlex.join(cmd) + "\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=run.cwd, env=env, stdout=logf, stderr=subprocess.STDOUT)
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
    try:
        unet = read_json(count_file)
    except StateError:
        unet = None
    state.update(status=status, exit_code=rc, reason=reason, finished=time.time(), wall_time_s=wall,
                 video=video, unet=unet)
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


def check_gpus(gpus: Any, where: str = "suite.gpus") -> List[int]:
    """A non-empty list of distinct GPU indices >= 0 (one worker each), else :class:`SuiteError` naming ``where``."""
    given = gpus
    if isinstance(gpus, str):
        parts = [g.strip() for g in gpus.split(",")]
        if not all(parts) or not all(re.fullmatch(r"\d+", g) for g in parts):
            raise SuiteError(f"{where}: expected comma-separated GPU indices such as 0,1 (one worker each), "
                             f"got {gpus!r}")
        gpus = [int(g) for g in parts]
    gpus = list(gpus)
    if not gpus or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
        raise SuiteError(f"{where}: expected a non-empty list of GPU indices >= 0 (one worker each), got {given!r}")
    if len(set(gpus)) != len(gpus):
        raise SuiteError(f"{where}: duplicate GPU indices in {given!r}")
    return gpus


class _Stop(Exception):
    pass


def run_local(suite: Suite, gpus: Optional[Sequence[int]] = None, log=say) -> Dict[str, Any]:
    """Run every unfinished run of ``suite``, one per GPU at a time; returns ``{run_id: state}``.

    Holds ``OUTPUT_DIR/.runner.lock`` (a second runner on the same folder, local or submitting, is refused) and,
    per run, ``RUN_DIR/.run.lock`` (:func:`execute_run`).  SIGTERM / SIGINT stop the runner: running launch.py
    processes are terminated (their state becomes ``killed``) and the next start runs them again.  A run left
    ``running`` by a runner that was killed outright is detected (its process, if still alive, is ended first)
    and run again.  One run's error (its state file unreadable, ...) fails that run, not the runner.
    """
    devices = [_visible_gpu(g) for g in check_gpus(gpus if gpus is not None else suite.gpus,
                                                   "--gpus" if gpus is not None else "suite.gpus")]
    runs = suite.runs()
    _prepare_output_dir(suite.output_dir)
    try:
        lock = held_lock(os.path.join(suite.output_dir, RUNNER_LOCK), "suite.output_dir")
        lock.__enter__()
    except Busy as e:
        raise RuntimeError(str(e)) from None
    try:
        write_manifest(suite, runs, log)
        todo = [r for r in runs if not is_finished(r.run_dir, r.trial_dir)]
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
                try:
                    st = execute_run(r, gpu=dev, stop=stop, log=log)
                except Exception as e:  # anything else of this run: fail it, keep the others going
                    st = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
                results[r.run_id] = st
                msg = f"[suite] {st['status']} {r.run_id} ({st.get('wall_time_s', 0) or 0:.1f} s)"
                if st["status"] != "done":
                    msg += f": {st.get('reason')}; log: {st.get('log')}"
                log(msg)
            finally:
                free.put(dev)

        def on_signal(signum, frame):
            raise _Stop(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if threading.current_thread() is threading.main_thread() else {}
        pool = ThreadPoolExecutor(max_workers=len(devices))
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
        return {r.run_id: _final_state(r, results) for r in runs}
    finally:
        lock.__exit__(None, None, None)


def _final_state(r: Run, results: Dict[str, Any]) -> Dict[str, Any]:
    st = safe_read_state(r.run_dir)
    got = results.get(r.run_id)
    if got is not None and got.get("status") == "failed" and st.get("status") != "failed":
        return got  # failed before its state could be written (the reason is in ``got``)
    return st


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
        st = safe_read_state(run.run_dir)
        if st.get("status") == "running" and not st.get("unreadable_state"):
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
    _prepare_output_dir(suite.output_dir)
    try:
        with held_lock(os.path.join(suite.output_dir, RUNNER_LOCK), "suite.output_dir"):
            return _submit_locked(suite, runs, cluster, wait, params, log)
    except Busy as e:
        raise RuntimeError(str(e)) from None


def _submit_locked(suite: Suite, runs: List[Run], cluster, wait, params, log) -> Dict[str, Any]:
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
        st = safe_read_state(r.run_dir)
        if st.get("unreadable_state"):
            log(f"[suite] failed {r.run_id}: {st['reason']}")
            continue
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
        return {r.run_id: safe_read_state(r.run_dir) for r in runs}
    jobs = executor.map_array(RunJob(), [os.path.join(r.run_dir, "run.json") for r in todo])
    for r, j in zip(todo, jobs):
        st = safe_read_state(r.run_dir)
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
    return {r.run_id: safe_read_state(r.run_dir) for r in runs}


def summarize(states: Dict[str, Dict[str, Any]]) -> str:
    counts: Dict[str, int] = {}
    for st in states.values():
        counts[st.get("status", "pending")] = counts.get(st.get("status", "pending"), 0) + 1
    lines = [", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))]
    for rid, st in states.items():
        if st.get("status") in ("failed", "killed", "preempted"):
            lines.append(f"  {st['status']}: {rid} ({st.get('reason')}) log: {st.get('log')}")
    return "\n".join(lines)
