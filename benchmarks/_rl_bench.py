"""Pieces shared by the RL benchmarks that run our system next to TRL
(``bench_ppo_trl.py``, ``bench_grpo_trl.py``): the prompt workload, the
per-call mesh options of a layout, the order and steady steps of the
alternating rounds, and the median step's timeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import _shape


def prompt_workload(n_prompts: int, out_dir: Path) -> Dict[str, Path]:
    """The model directory and a prompt file of ``n_prompts`` prompts of 10..28 tokens."""
    model = _shape.materialize()
    tokenizer = _shape.load_tokenizer(model)
    prompts = _shape.write_prompts(out_dir / f"prompts{n_prompts}.jsonl", tokenizer, n=n_prompts)
    return {"model": model, "prompts": Path(prompts)}


def round_order(ours: List[str], peers: List[str], r: int) -> List[str]:
    """Who runs in round ``r``, in order: ours first in even rounds, the peers first in odd ones."""
    return ours + peers if r % 2 == 0 else peers + ours


def steady(per_round: List[List[Any]]) -> List[Any]:
    """Every round's steps but its first (which includes start-up work)."""
    return [x for run in per_round for x in (run[1:] or run)]


def prompt_lengths(files: Dict[str, Path], max_len: int) -> List[int]:
    """Token counts of the workload's prompts (left-truncated to ``max_len``)."""
    import json

    tokenizer = _shape.load_tokenizer(files["model"])
    texts = [json.loads(line)["prompt"] for line in files["prompts"].read_text().splitlines() if line.strip()]
    return [min(len(ids), max_len) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def mesh_args(meshes: Dict[str, List[int]], n_workers: int,
              threads: Optional[Dict[str, int]] = None) -> List[str]:
    """Quickstart options placing each call on its ranks, data-parallel over them,
    with ``threads[call]`` native-kernel threads per worker where given."""
    args = []
    for call, ranks in meshes.items():
        if len(ranks) < n_workers:
            args.append(f"{call}.device_mesh=localhost:{','.join(map(str, ranks))}")
        args.append(f"{call}.parallel.data_parallel_size={len(ranks)}")
    for call, n in (threads or {}).items():
        args.append(f"{call}.cpu_threads={n}")
    return args


def median_step(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The median step by duration, the first (start-up) step left out."""
    steady = history[1:] or history
    return sorted(steady, key=lambda h: h["seconds"])[len(steady) // 2]


def timeline_rows(layout: str, history: List[Dict[str, Any]], calls: Sequence[str]) -> List[Dict[str, Any]]:
    """Per-call start/end (ms from the step's start, workers' clocks) of the median step,
    with a 40-column bar, then the step itself."""
    median = median_step(history)
    rows = []
    scale = 40 / max(median["seconds"], 1e-9)
    for call in calls:
        t = median["timing"].get(call)
        if t is None or "start" not in t:
            continue
        a, b = int(t["start"] * scale), max(int(t["start"] * scale) + 1, int(t["end"] * scale))
        rows.append({"layout": layout, "call": call, "ranks": ",".join(map(str, t.get("ranks", []))) or "-",
                     "start_ms": 1e3 * t["start"], "end_ms": 1e3 * t["end"],
                     "call_ms": 1e3 * (t["end"] - t["start"]),
                     "hooks_ms": 1e3 * (t.get("pre_hooks_s", 0.0) + t.get("post_hooks_s", 0.0)),
                     "transfer_ms": 1e3 * t.get("transfer_s", 0.0),
                     "timeline": "." * a + "#" * (b - a) + "." * max(0, 40 - b)})
    rows.append({"layout": layout, "call": "(step)", "start_ms": 0.0, "end_ms": 1e3 * median["seconds"],
                 "call_ms": 1e3 * median["seconds"]})
    return rows


def loadavg() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]
