"""Suite state in files next to the outputs, written atomically (temporary file + ``os.replace``).

* ``OUTPUT_DIR/suite.json``: the expanded suite (every run's id and folder);
* ``RUN_DIR/run.json``: the run (command, folder, prompt, seed; :class:`~scoredistill.suite.spec.Run`);
* ``RUN_DIR/state.json``: its status, one of ``pending``, ``queued`` (submitted to a cluster), ``running``,
  ``done``, ``failed``, ``killed`` (a signal ended it), ``preempted`` (its cluster job was requeued), with
  the attempt number, exit code, wall time, log path, host / pid / GPU / cluster job id;
* ``RUN_DIR/logs/attempt-<n>.log``: launch.py's output of each attempt;
* ``RUN_DIR/unet_samples.json``: UNet forward samples counted in the run (:mod:`.count_launch`).

A run is *finished* when its state says exit code 0 and its test video (``TRIAL/save/it<N>-test.mp4``)
exists; every other run (never started, failed, killed, left ``running`` by a runner that died) is run
again.  Killing the runner therefore loses nothing: a state file is either the old or the new version.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Dict, Optional

from scoredistill.atomic_io import atomic_write_json, atomic_write_text  # noqa: F401  (used by runner/report)

STATUSES = ("pending", "queued", "running", "done", "failed", "killed", "preempted")


class StateError(ValueError):
    """A suite state file exists but cannot be read (not JSON, not UTF-8, not a file); the message names it."""


def read_json(path: str, default: Any = None) -> Any:
    """The JSON in ``path``; ``default`` when there is no such file.

    Raises:
        StateError: the file exists but is not readable JSON (naming the file).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        hint = ("remove it (or its run folder) to run that run again" if os.path.basename(path) == "state.json"
                else "`scoredistill suite run` rewrites it")
        raise StateError(f"{path} is not a readable JSON file ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"{hint}") from None


#: first characters that make a spreadsheet read a CSV cell as a formula (OWASP "CSV injection")
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (``=HYPERLINK(...)`` as a prompt) prefixed with ``'``,
    which spreadsheets show as text; numbers and other text are returned unchanged."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_START):
        return "'" + value
    return value


def state_path(run_dir: str) -> str:
    return os.path.join(run_dir, "state.json")


def read_state(run_dir: str) -> Dict[str, Any]:
    """The run's state (``pending`` when it has none). Raises :class:`StateError` for an unreadable file."""
    st = read_json(state_path(run_dir))
    if st is None:
        return {"status": "pending", "attempt": 0}
    if not isinstance(st, dict):
        raise StateError(f"{state_path(run_dir)} holds a {type(st).__name__}, not a state mapping; remove it (or its "
                         "run folder) to run that run again")
    return st


def safe_read_state(run_dir: str) -> Dict[str, Any]:
    """:func:`read_state`, or for an unreadable state file a ``failed`` state whose reason names the file (so one
    run's broken state fails that run, never the runner or the report)."""
    try:
        return read_state(run_dir)
    except StateError as e:
        return {"status": "failed", "attempt": 0, "reason": str(e), "unreadable_state": True}


def write_state(run_dir: str, state: Dict[str, Any]) -> None:
    if state.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {state.get('status')!r}")
    atomic_write_json(state_path(run_dir), state)


def _it(path: str) -> int:
    m = re.search(r"it(\d+)-test\.mp4$", path)
    return int(m.group(1)) if m else -1


def find_test_video(trial_dir: str) -> Optional[str]:
    """The last ``save/it<N>-test.mp4`` of a threestudio trial folder, or ``None``."""
    vids = glob.glob(os.path.join(trial_dir, "save", "it*-test.mp4"))
    return max(vids, key=_it) if vids else None


def is_finished(run_dir: str, trial_dir: str) -> bool:
    """Exit code 0 recorded and the test video present."""
    try:
        st = read_state(run_dir)
    except StateError:
        return False
    return st.get("status") == "done" and st.get("exit_code") == 0 and find_test_video(trial_dir) is not None
