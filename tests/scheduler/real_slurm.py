"""A real single-node Slurm cluster for tests: ``munged`` + ``slurmctld`` + ``slurmd`` in a temp dir.

:class:`RealSlurmCluster` generates a munge key and a ``slurm.conf`` in a
fresh directory under ``/tmp`` (short: the munge socket path must fit a Unix
socket name), starts the three daemons in the foreground as children of this
process and waits until ``sinfo`` reports the node ``idle``. Nothing outside
the directory is touched: munge runs on its own socket (``AuthInfo=socket=``),
the daemons on free ports, state/spool/log/pid files stay in the directory,
and clients find the cluster through ``SLURM_CONF`` (see :attr:`env`). The
configuration needs neither systemd nor cgroups (``proctrack/linuxproc``,
``task/none``, ``jobacct_gather/none``; no accounting storage, so ``sacct``
answers that accounting is disabled, as on a cluster without slurmdbd).

:meth:`stop` cancels every job, stops the daemons, kills whatever process is
still left from the cluster (a ``slurmstepd`` or a job's task: they carry this
cluster's ``SLURM_CONF`` in their environment) and removes the directory.

:func:`real_slurm` is the module-scoped pytest fixture; it skips the tests,
with the reason, when the binaries are missing or the daemons do not come up
(the reason includes the tail of their logs). Install on Debian/Ubuntu with
``apt-get install -y slurmctld slurmd slurm-client munge``; needs root.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

import pytest

from realhf.base import network

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class SlurmUnavailable(RuntimeError):
    """The cluster cannot be started here; the message says why."""


def find_binaries() -> Dict[str, str]:
    """Paths of the daemons and the client commands; raises :class:`SlurmUnavailable` naming the missing ones."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = {name: shutil.which(name, path=search) for name in DAEMONS + CLIENTS}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise SlurmUnavailable(
            f"real Slurm not installed ({', '.join(missing)} not found); on Debian/Ubuntu: "
            "apt-get install -y slurmctld slurmd slurm-client munge")
    return found


def _node_hardware(slurmd: str) -> Dict[str, str]:
    """``slurmd -C``'s ``NodeName=... CPUs=... RealMemory=...`` line as a dict."""
    res = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    line = next((l for l in res.stdout.splitlines() if l.startswith("NodeName=")), "")
    hw = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    if "CPUs" not in hw or "RealMemory" not in hw:
        raise SlurmUnavailable(f"'slurmd -C' printed no node description: {res.stdout!r} {res.stderr!r}")
    return hw


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"({e})"


class RealSlurmCluster:
    """One node (``hostname -s``, 127.0.0.1) in partition ``debug``; see the module docstring."""

    def __init__(self, start_timeout_s: float = 30.0, min_job_age_s: int = 900, kill_wait_s: int = 10):
        self.start_timeout_s = start_timeout_s
        self.min_job_age_s = min_job_age_s
        self.kill_wait_s = kill_wait_s
        self.bin = find_binaries()
        self.dir: Optional[str] = None
        self.node = os.uname().nodename.split(".")[0]
        self.procs: Dict[str, subprocess.Popen] = {}
        self._logs: List = []

    # -- paths / environment -------------------------------------------- #
    @property
    def conf(self) -> str:
        return os.path.join(self.dir, "slurm.conf")

    def log(self, name: str) -> str:
        return os.path.join(self.dir, "log", f"{name}.log")

    @property
    def env(self) -> Dict[str, str]:
        """Environment for clients (and the launcher): ``SLURM_CONF`` and the commands first on ``PATH``."""
        dirs = []
        for name in CLIENTS:
            d = os.path.dirname(self.bin[name])
            if d not in dirs:
                dirs.append(d)
        return {"SLURM_CONF": self.conf, "PATH": os.pathsep.join(dirs + [os.environ.get("PATH", "")])}

    def run(self, cmd: str, *args: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm client command (``sbatch``, ``squeue``, ...) against this cluster."""
        return subprocess.run([self.bin[cmd], *args], capture_output=True, text=True, timeout=timeout, check=check,
                              env=dict(os.environ, **self.env), stdin=subprocess.DEVNULL)

    # -- queries -------------------------------------------------------- #
    def jobs(self, all_states: bool = True) -> List[Dict[str, str]]:
        """Jobs the controller knows (``squeue``; with ``all_states`` also those that ended): id, name, state."""
        args = ["-h", "-o", "%i|%j|%T"] + (["-t", "all"] if all_states else [])
        res = self.run("squeue", *args, check=True)
        rows = []
        for line in res.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                rows.append({"id": parts[0], "name": parts[1], "state": parts[2]})
        return rows

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job -o <id>`` as a dict (JobState, ExitCode, NumTasks, ...); {} if unknown."""
        res = self.run("scontrol", "show", "job", "-o", str(job_id))
        if res.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", res.stdout))

    def log_tails(self, n: int = 15) -> str:
        """The last lines of each daemon's log file and of its stdout/stderr (where errors before the log go)."""
        if self.dir is None:
            return ""
        parts = []
        for name in DAEMONS:
            for path in (self.log(name), os.path.join(self.dir, "log", f"{name}.stdout")):
                if os.path.exists(path) and os.path.getsize(path) > 0:
                    parts.append(f"--- {os.path.basename(path)} ---\n{_tail(path, n)}")
        return "\n".join(parts) or "(no daemon wrote anything)"

    # -- start ---------------------------------------------------------- #
    def _write_config(self) -> None:
        hw = _node_hardware(self.bin["slurmd"])
        user = getpass.getuser()
        d = self.dir
        ctld_port = network.find_free_port(host="0.0.0.0")
        slurmd_port = network.find_free_port(host="0.0.0.0", exclude=[ctld_port])
        lines = [
            "# generated by tests/scheduler/real_slurm.py: one node, no systemd, no cgroups, no accounting",
            f"ClusterName=realhf{os.getpid()}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={d}/munge/munge.sock",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={self.log('slurmctld')}",
            f"SlurmdLogFile={self.log('slurmd')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            f"MinJobAge={self.min_job_age_s}",
            f"KillWait={self.kill_wait_s}",
            "MailProg=/bin/true",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={hw['CPUs']} RealMemory={hw['RealMemory']} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, name: str, args: List[str]) -> None:
        out = open(os.path.join(self.dir, "log", f"{name}.stdout"), "wb")
        self._logs.append(out)
        self.procs[name] = subprocess.Popen([self.bin[name], *args], stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=dict(os.environ, **self.env),
                                            start_new_session=True)

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not ready after {timeout:.0f}s"
                raise SlurmUnavailable(f"real Slurm did not come up ({what}: {why}); daemon logs:\n"
                                       + self.log_tails())
            time.sleep(0.2)

    def start(self) -> "RealSlurmCluster":
        self.dir = tempfile.mkdtemp(prefix="rslurm-", dir="/tmp")
        try:
            os.chmod(self.dir, 0o755)  # munged wants every directory above its socket searchable by all
            for sub in ("state", "spool", "log", "munge"):
                os.makedirs(os.path.join(self.dir, sub), mode=0o755)
            key = os.path.join(self.dir, "munge", "munge.key")
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
            os.chmod(key, 0o400)
            self._write_config()
            m = os.path.join(self.dir, "munge")
            self._spawn("munged", ["-F", f"--key-file={key}", f"--socket={m}/munge.sock",
                                   f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                                   f"--log-file={self.log('munged')}"])
            self._wait("munged", lambda: os.path.exists(f"{m}/munge.sock"), 10)
            self._spawn("slurmctld", ["-D", "-f", self.conf])
            self._spawn("slurmd", ["-D", "-f", self.conf, "-N", self.node])
            deadline = time.monotonic() + self.start_timeout_s
            self._wait("node idle in sinfo", self._node_idle, max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        try:
            res = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0 and res.stdout.strip() == "idle"

    # -- stop ----------------------------------------------------------- #
    def _leftovers(self) -> List[int]:
        """Processes (not this one) whose environment holds this cluster's ``SLURM_CONF``."""
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        if self.dir is None:
            return
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            try:
                ids = [j["id"] for j in self.jobs(all_states=False)]
                if ids:
                    self.run("scancel", *ids)
                deadline = time.monotonic() + self.kill_wait_s + 10
                while self.jobs(all_states=False) and time.monotonic() < deadline:
                    time.sleep(0.3)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pid in self._leftovers():  # slurmstepd and job tasks of this cluster
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for f in self._logs:
            f.close()
        self._logs.clear()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> "RealSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def real_slurm():
    """A started :class:`RealSlurmCluster` for the module; the tests skip (with the reason) without one."""
    try:
        cluster = RealSlurmCluster()
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()
