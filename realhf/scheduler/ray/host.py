"""The Ray actor that hosts one worker job.

The actor does not run the worker in its own process: it starts the same
command line that ``mode=local`` runs (``python -m realhf.apps.remote worker
...``) as a child process, so a worker behaves identically under both
launchers, exit codes and signals keep their meaning, and the child's stdout
and stderr go to the trial's log file on the node. The actor only holds the
job's Ray resources (its bundle of the placement group) and answers polls.

The child gets SIGTERM when the actor process dies (``PR_SET_PDEATHSIG`` on
the thread that forked it; sync actors run their methods on the main thread),
so killing the actor never leaves a worker behind.
"""

from __future__ import annotations

import os
import signal as signal_lib
import socket
import subprocess
from typing import Dict, List, Optional, Tuple

import psutil

from realhf.scheduler.local.client import _terminate_with, read_log_tail


class WorkerHost:
    """Runs one worker command as a child process and reports on it (wrapped by ``ray.remote``)."""

    def __init__(self, job_name: str, log_path: str):
        self.job_name = job_name
        self.log_path = log_path
        self._popen: Optional[subprocess.Popen] = None

    def start(self, args: List[str], env: Dict[str, str], cwd: Optional[str]) -> Tuple[str, int]:
        """Start the worker; returns (node address, child pid)."""
        if self._popen is not None:
            raise RuntimeError(f"{self.job_name} was already started.")
        job_env = dict(os.environ)
        job_env.update(env)
        if cwd is not None and not os.path.isdir(cwd):
            cwd = None  # the launcher's directory does not exist on this node
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                list(args), env=job_env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_terminate_with(os.getpid()),
            )
        return _node_address(), self._popen.pid

    def poll(self) -> Optional[int]:
        """The child's exit code (negative: killed by that signal), or None while it runs."""
        return None if self._popen is None else self._popen.poll()

    def stop(self, sig: int, grace_s: float) -> Optional[int]:
        """Send ``sig`` to the child's process group, SIGKILL after ``grace_s``; returns its exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal(sig)
            try:
                self._popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal_lib.SIGKILL)  # whatever is left in the group
        try:
            self._popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None
        return self._popen.returncode

    def log_tail(self, n_lines: int) -> str:
        return read_log_tail(self.log_path, n_lines)

    def read_log(self, offset: int, max_bytes: int) -> bytes:
        """Bytes of the log from ``offset``, for a launcher that cannot see this node's disk."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read(max_bytes)
        except OSError:
            return b""

    def _signal(self, sig: int) -> None:
        pid = self._popen.pid
        try:
            escaped = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            escaped = []
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in escaped:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass


def _node_address() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (unit use)
        return socket.gethostname()
