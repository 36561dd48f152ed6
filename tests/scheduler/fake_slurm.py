"""Fake Slurm commands for tests: ``sbatch``, ``squeue``, ``sacct``, ``scancel`` and ``srun``.

:func:`install` writes them as small Python scripts into ``<dir>/bin`` (put it
first on PATH). ``sbatch`` runs the submitted script on this machine in the
background, in its own session, with the ``SLURM_*`` variables a job sees and
its ``--output``/``--chdir`` directives honoured (``squeue --states=all``
lists ended jobs too, unless ``FAKE_SQUEUE_FORGETS`` is set; ``sacct`` fails
as on a cluster without accounting storage when ``FAKE_NO_ACCOUNTING`` is set); ``srun`` starts
``--ntasks`` copies of its command with ``SLURM_PROCID`` etc. and, with
``--kill-on-bad-exit=1``, kills the others (their whole process trees) when one fails. Job state lives in
``<dir>/state``: ``<id>.pid`` (the job's session), ``<id>.rc`` (exit code),
``<id>.cancelled``. ``<dir>/calls.log`` records every call (argv).
"""

from __future__ import annotations

import os
import sys

_COMMON = r'''
import os, signal, subprocess, sys, time
STATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "state")
os.makedirs(STATE, exist_ok=True)
with open(os.path.join(os.path.dirname(STATE), "calls.log"), "a") as _f:
    _f.write(" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\n")

def path(job, ext):
    return os.path.join(STATE, f"{job}.{ext}")

def alive(job):
    try:
        pid = int(open(path(job, "pid")).read())
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError):
        return False

def state(job):
    if not os.path.exists(path(job, "pid")):
        return None
    if os.path.exists(path(job, "cancelled")) and not alive(job):
        return "CANCELLED", "0:15"
    if alive(job):
        return "RUNNING", "0:0"
    try:
        rc = int(open(path(job, "rc")).read())
    except (OSError, ValueError):
        return "NODE_FAIL", "0:9"
    return ("COMPLETED" if rc == 0 else "FAILED"), f"{rc}:0"

def ids(argv):
    for i, a in enumerate(argv):
        if a in ("-j", "--jobs"):
            return argv[i + 1].split(",")
        if a.startswith("--jobs="):
            return a.split("=", 1)[1].split(",")
    return sorted(f[:-4] for f in os.listdir(STATE) if f.endswith(".pid"))
'''

_SBATCH = r'''
args = [a for a in sys.argv[1:] if a != "--parsable"]
script = args[-1]
opts = {}
for line in open(script):
    if line.startswith("#SBATCH "):
        key, _, val = line[len("#SBATCH "):].strip().partition("=")
        opts[key] = val
if os.environ.get("FAKE_SBATCH_FAIL"):
    print("sbatch: error: Batch job submission failed: Invalid partition name specified", file=sys.stderr)
    sys.exit(1)
counter = os.path.join(STATE, "next_id")
job = int(open(counter).read()) if os.path.exists(counter) else 1000
open(counter, "w").write(str(job + 1))
env = dict(os.environ, SLURM_JOB_ID=str(job), SLURM_JOBID=str(job), SLURM_JOB_NAME=opts.get("--job-name", ""),
           SLURM_NTASKS=opts.get("--ntasks", "1"), SLURM_NNODES=opts.get("--nodes", "1"),
           SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=os.getcwd(),
           SLURM_CPUS_PER_TASK=opts.get("--cpus-per-task", "1"))
out = opts.get("--output", f"slurm-{job}.out").replace("%j", str(job)).replace("%x", env["SLURM_JOB_NAME"])
runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fake_job_runner")
with open(out, "ab") as log:
    p = subprocess.Popen([sys.executable, runner, str(job), script], env=env, stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, cwd=opts.get("--chdir") or os.getcwd(), start_new_session=True)
open(path(job, "pid"), "w").write(str(p.pid))
print(job)
'''

_RUNNER = r'''
job, script = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: None)  # scancel signals the whole session; record the outcome
p = subprocess.Popen(["bash", script])
while True:
    try:
        rc = p.wait()
        break
    except InterruptedError:
        continue
open(path(job, "rc.tmp"), "w").write(str(rc if rc >= 0 else 128 - rc))
os.replace(path(job, "rc.tmp"), path(job, "rc"))
'''

_SQUEUE = r'''
fmt = sys.argv[sys.argv.index("-o") + 1] if "-o" in sys.argv else "%i %T"
argv = sys.argv[1:]
every_state = "--states=all" in argv or ("-t" in argv and argv[argv.index("-t") + 1].lower() == "all")
for job in ids(argv):
    s = state(job)
    # ended jobs are listed with --states=all until the controller forgets them (MinJobAge)
    if s is not None and (s[0] == "RUNNING" or (every_state and not os.environ.get("FAKE_SQUEUE_FORGETS"))):
        print(fmt.replace("%i", job).replace("%T", s[0]))
'''

_SACCT = r'''
if os.environ.get("FAKE_NO_ACCOUNTING"):
    print("Slurm accounting storage is disabled", file=sys.stderr)
    sys.exit(1)
for job in ids(sys.argv[1:]):
    s = state(job)
    if s is not None and s[0] != "RUNNING":
        print(f"{job}|{s[0]}|{s[1]}")
'''

_SCANCEL = r'''
sig = signal.SIGTERM
for a in sys.argv[1:]:
    if a.startswith("--signal=") or a.startswith("-s"):
        sig = getattr(signal, "SIG" + a.split("=")[-1].replace("-s", "").upper())
for job in [a for a in sys.argv[1:] if not a.startswith("-")]:
    if not alive(job):
        continue
    open(path(job, "cancelled"), "w").write("1")
    try:
        os.killpg(int(open(path(job, "pid")).read()), sig)
    except (OSError, ValueError):
        pass
'''

_SRUN = r'''
argv = sys.argv[1:]
opts, i = {}, 0
while i < len(argv) and argv[i].startswith("-"):
    key, _, val = argv[i].partition("=")
    opts[key] = val
    i += 1
cmd = argv[i:]
n = int(opts.get("--ntasks") or os.environ.get("SLURM_NTASKS", "1"))
procs = []
for t in range(n):
    env = dict(os.environ, SLURM_PROCID=str(t), SLURM_LOCALID=str(t), SLURM_NTASKS=str(n), SLURM_NODEID="0",
               SLURM_STEP_ID="0", SLURM_STEPID="0")
    procs.append(subprocess.Popen(cmd, env=env))
def tree(pid):
    """pid and its descendants (what Slurm's process tracking signals for a task)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out
def stop(sig=signal.SIGTERM, *a):
    for p in procs:
        if p.poll() is None:
            for pid in tree(p.pid):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
signal.signal(signal.SIGTERM, lambda *a: stop(signal.SIGTERM))
bad = []
while [p.poll() for p in procs].count(None):  # poll every task (any() would stop at the first running one)
    bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if bad and opts.get("--kill-on-bad-exit") == "1":
        stop(signal.SIGKILL)  # as srun does: the step's other tasks die at once, before their exit code files
        for p in procs:
            p.wait()
        break
    time.sleep(0.1)
codes = bad or [p.returncode for p in procs]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c != 0), 0))
'''

SCRIPTS = {"sbatch": _SBATCH, "_fake_job_runner": _RUNNER, "squeue": _SQUEUE, "sacct": _SACCT,
           "scancel": _SCANCEL, "srun": _SRUN}


def install(directory: str) -> str:
    """Write the fakes into ``<directory>/bin``; returns that directory."""
    bin_dir = os.path.join(directory, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for name, body in SCRIPTS.items():
        p = os.path.join(bin_dir, name)
        with open(p, "w") as f:
            f.write(f"#!{sys.executable}\n{_COMMON}\n{body}")
        os.chmod(p, 0o755)
    return bin_dir


def calls(directory: str) -> list:
    try:
        with open(os.path.join(directory, "calls.log")) as f:
            return f.read().splitlines()
    except OSError:
        return []
