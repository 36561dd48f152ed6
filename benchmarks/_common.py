"""Shared utilities for the scripts in ``benchmarks/``.

Timing uses warmup runs followed by timed repeats and reports the median,
which is robust to the occasional scheduler hiccup on small shared machines.
Results print as an aligned table and are saved as JSON under
``benchmarks/results/<name>.json`` together with a description of the machine,
so numbers from different runs can be compared.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync(device: Optional[str]) -> None:
    if device is not None and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 7,
           max_seconds: Optional[float] = None,
           device: Optional[str] = None) -> Dict[str, float]:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeat`` timed ones.

    ``max_seconds`` stops repeating early (keeping at least 3 runs) so slow
    baselines do not dominate a benchmark's run time.  ``device="cuda"``
    synchronizes around each call.  Times are in seconds.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    budget_start = time.perf_counter()
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if (max_seconds is not None and len(times) >= 3
                and time.perf_counter() - budget_start > max_seconds):
            break
    return {
        "median": statistics.median(times),
        "min": min(times),
        "mean": statistics.fmean(times),
        "runs": len(times),
    }


def machine_info() -> Dict[str, Any]:
    """Enough context to tell whether two result files are comparable."""
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def _fmt(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or value == 0:
        return f"{value:.2f}"
    return f"{value:.2g}"


def format_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None,
                 title: Optional[str] = None) -> str:
    """Rows of dicts as an aligned plain-text table (missing cells are blank)."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells)
    return "\n".join(lines)


def print_table(rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None,
                title: Optional[str] = None) -> None:
    print(format_table(rows, columns, title))
    print()


def write_json(name: str, results: Any, *, extra: Optional[Dict[str, Any]] = None,
               results_dir: Optional[Path] = None) -> Path:
    """Save ``results`` with machine info to ``<results_dir>/<name>.json``."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "results": results,
    }
    if extra:
        payload.update(extra)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


# --------------------------------------------------------------------------- #
# Workloads shared by the model benchmarks
# --------------------------------------------------------------------------- #
def llama_config(hidden: int, layers: int, vocab: int, heads: int, kv_heads: int, max_positions: int):
    """A transformers ``LlamaConfig`` with a SwiGLU width of ~8/3 hidden (rounded to 64)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def random_lengths(n: int, lo: int, hi: int, seed: int) -> List[int]:
    """``n`` sequence lengths uniform in ``[lo, hi]``, reproducible by seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()

