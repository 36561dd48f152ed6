"""The files of one trial on disk, checked and tidied by the launcher before any worker starts.

Doing this once, in the launching process, turns problems that would
otherwise surface as a race between ranks (an unwritable root, a resume with
nothing to resume from) into one line, and keeps a rerun of a trial from
mixing with the previous run's files:

* :func:`check_writable` creates and probes every directory the run writes;
* :func:`set_aside_logs` moves a previous run's logs to ``<log dir>/previous-<time>/``
  (a run that resumes keeps appending instead);
* :func:`remove_interrupted_writes` deletes the temporaries of a save that was
  killed half-way (checkpoints and recover states are written to temporaries
  and renamed into place) and puts back a checkpoint that was moved aside;
* :func:`check_resumable` refuses ``recover_mode=resume`` without a recover
  state, or with one written for another parallel layout.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional

from realhf.api.core.system_api import ExperimentConfig
from realhf.base import logging

logger = logging.getLogger("trial_files")

RECOVER_INFO = "recover_info.pkl"
PREVIOUS_PREFIX = "previous-"
# Temporaries of atomic writes: ``.<name>.tmp-XXXX`` directories (checkpoints), ``x.tmp``,
# ``x.tmp123`` and ``x.tmp.123`` files (recover states, optimizer states, HF files).
_TMP_DIR = re.compile(r"^\..+\.tmp-[^/]+$")
_TMP_FILE = re.compile(r"\.tmp(\.?\d+)?$")
# A checkpoint moved aside while its replacement is renamed into place.
_OLD_DIR = re.compile(r"^\.(?P<name>.+)\.old-[^/.]+$")


class LaunchRefused(Exception):
    """The run cannot start; the message is one line that says why and what to do."""


def check_writable(dirs: Dict[str, str]) -> None:
    """Create each directory (``what -> path``) and write a probe file in it.

    :raises LaunchRefused: naming the directory and the operating system's error.
    """
    for what, path in dirs.items():
        try:
            if not os.path.lexists(path):
                os.makedirs(path)
            # Also where ``path`` is a file: the probe then fails with "Not a directory".
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise LaunchRefused(f"cannot write the {what} directory {path}: {e}") from None


def set_aside_logs(log_dir: str) -> Optional[str]:
    """Move everything in ``log_dir`` except earlier ``previous-*`` folders into a new
    ``previous-<time>`` folder; returns it (None when there was nothing to move)."""
    if not os.path.isdir(log_dir):
        return None
    entries = [e for e in os.listdir(log_dir) if not e.startswith(PREVIOUS_PREFIX)]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(log_dir, PREVIOUS_PREFIX + stamp)
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(log_dir, f"{PREVIOUS_PREFIX}{stamp}-{n}")
    os.makedirs(dest)
    for e in entries:
        os.rename(os.path.join(log_dir, e), os.path.join(dest, e))
    return dest


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def remove_interrupted_writes(save_dir: str, recover_dir: str) -> List[str]:
    """Clean what a killed save left under the trial's checkpoint and recover directories.

    Returns the paths removed or restored. Must only run while no worker of
    the trial writes (the launcher calls it before starting them).
    """
    done: List[str] = []
    for root in (save_dir, recover_dir):
        if not os.path.isdir(root):
            continue
        for parent, dirs, files in os.walk(root, topdown=True):
            for d in list(dirs):
                full = os.path.join(parent, d)
                old = _OLD_DIR.match(d)
                if old and not os.path.lexists(os.path.join(parent, old.group("name"))):
                    os.rename(full, os.path.join(parent, old.group("name")))  # the only copy: put it back
                    done.append(full)
                elif old or _TMP_DIR.match(d):
                    _remove(full)
                    done.append(full)
                else:
                    continue
                dirs.remove(d)
            for f in files:
                if _TMP_FILE.search(f):
                    _remove(os.path.join(parent, f))
                    done.append(os.path.join(parent, f))
    info = read_recover_info(recover_dir)
    if os.path.isdir(recover_dir):
        kept = os.path.abspath(info["dir"]) if info else None
        for name in os.listdir(recover_dir):
            full = os.path.abspath(os.path.join(recover_dir, name))
            # Step directories of a dump that never got its recover_info.pkl written.
            if name.startswith("globalstep") and os.path.isdir(full) and full != kept:
                _remove(full)
                done.append(full)
    for path in done:
        logger.info(f"Removed what an interrupted save left: {path}")
    return done


# --------------------------------------------------------------------- resume
def describe_layouts(cfg: ExperimentConfig) -> Dict[str, str]:
    """Each model's parallel layout and the worker count, in allocation_mode notation (for messages)."""
    out = {"model workers": str(cfg.n_model_workers)}
    for name, layout in sorted(cfg.model_layouts.items(), key=lambda kv: str(kv[0])):
        topo = layout.topology
        out[str(name)] = (f"d{topo.get_dim('data')}p{topo.get_dim('pipe')}m{topo.get_dim('model')} "
                          f"on workers {list(layout.global_ranks)}")
    return out


def _format_layouts(d: Dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in d.items())


def read_recover_info(recover_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(recover_dir, RECOVER_INFO)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def check_resumable(cfg: ExperimentConfig, recover_dir: str, required: bool) -> Optional[Dict[str, Any]]:
    """The recover state a run would resume from (None if there is none and it is not ``required``).

    :raises LaunchRefused: when it is required and missing, or was saved with
        other parallel layouts than ``cfg`` has (its per-rank shards would not fit).
    """
    info = read_recover_info(recover_dir)
    if info is None:
        if required:
            raise LaunchRefused(
                f"recover_mode=resume, but there is no recover state to resume from "
                f"({os.path.join(recover_dir, RECOVER_INFO)} does not exist); run with recover_mode=save "
                "or recover_mode=auto to save one, or recover_mode=disabled to start from step 0")
        return None
    saved = info.get("layouts")
    now = describe_layouts(cfg)
    if saved is not None and saved != now:
        raise LaunchRefused(
            f"cannot resume from {recover_dir}: it was saved with the layout [{_format_layouts(saved)}], but "
            f"this run has [{_format_layouts(now)}]; resume with the allocation_mode and n_gpus_per_node of "
            "the saved run, or start a new trial")
    return info
