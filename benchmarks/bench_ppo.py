"""One PPO step through the master and model workers, broken down per call.

The ``ppo`` quickstart experiment (tiny llama from ``realhf/assets/models``,
all four models initialized from scratch, embedded prompts) runs on 4 local
worker processes (forked, pipes between master and workers, gloo between
workers) with two layouts:

* ``same``: generation on the training layout of the actor (dp2 x tp2);
* ``realloc``: generation on its own replica (dp4), so parameters are
  reallocated from the training replica before generation and dropped after.

For every call the master records the time of its pre-hooks (parameter
reallocation), the data transfer between workers, the call itself and its
post-hooks (dropping the reallocated copy, offloading frozen models). The
table shows medians over the steps after the first (which includes start-up
costs such as building plans). Run ``python benchmarks/bench_ppo.py``
(about a minute on 2 cores); ``--quick`` runs fewer steps. Results go to
``benchmarks/results/bench_ppo.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "realhf" / "assets" / "models" / "tiny-llama"
DATA = ROOT / "realhf" / "assets" / "data"
MAX_PROMPT_LEN = 64
CALLS = ["fetch", "actor_gen", "rew_inf", "ref_inf", "critic_inf", "actor_train", "critic_train"]


def ppo_args(layout: str, steps: int, n_prompts: int, new_tokens: int) -> List[str]:
    args = ["experiment_name=bench-ppo", "trial_name=t", "n_gpus_per_node=4", "allocation_mode=manual",
            f"dataset.path={DATA / 'prompt-train.jsonl'}", f"dataset.train_bs_n_seqs={n_prompts}",
            f"dataset.max_prompt_len={MAX_PROMPT_LEN}", f"ppo.gen.max_new_tokens={new_tokens}",
            f"ppo.gen.min_new_tokens={new_tokens}", f"exp_ctrl.benchmark_steps={steps}", "ppo.ppo_n_minibatches=2"]
    for r in ["actor", "critic", "ref", "rew"]:
        args += [f"{r}.path={TINY}", f"{r}.init_from_scratch=True"]
    args += ["actor_train.parallel.data_parallel_size=2", "actor_train.parallel.model_parallel_size=2",
             "critic_train.parallel.data_parallel_size=2", "critic_train.parallel.pipeline_parallel_size=2",
             "critic_inf.parallel.data_parallel_size=2", "critic_inf.parallel.pipeline_parallel_size=2",
             "ref_inf.parallel.data_parallel_size=4", "rew_inf.parallel.data_parallel_size=4"]
    if layout == "same":
        args += ["actor_gen.parallel.data_parallel_size=2", "actor_gen.parallel.model_parallel_size=2"]
    else:
        args += ["actor_gen.parallel.data_parallel_size=4"]
    return args


def run(layout: str, steps: int, n_prompts: int, new_tokens: int,
        extra: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Run the experiment; ``extra`` overrides go after ``ppo_args``."""
    import realhf.experiments  # noqa: F401
    from realhf.api.quickstart.entrypoint import parse_quickstart
    from realhf.system.pipe_runner import run_with_pipes

    cfg = parse_quickstart("ppo", ppo_args(layout, steps, n_prompts, new_tokens) + list(extra)).initial_setup()
    with tempfile.TemporaryDirectory() as root:
        master = run_with_pipes(cfg, "bench-ppo", layout, timeout=600, fileroot=root)
    return [{"seconds": h.seconds, "n_tokens": h.n_tokens, "timing": h.timing} for h in master.history]


def summarize(layout: str, history: List[Dict[str, Any]], n_prompts: int) -> List[Dict[str, Any]]:
    steady = history[1:] or history
    rows = []
    for call in CALLS:
        def med(part: str) -> float:
            return statistics.median(h["timing"].get(call, {}).get(part, 0.0) for h in steady)

        rows.append({"layout": layout, "call": call, "realloc_s": med("pre_hooks_s"), "transfer_s": med("transfer_s"),
                     "call_s": med("call_s"), "post_hooks_s": med("post_hooks_s")})
    step = statistics.median(h["seconds"] for h in steady)
    rows.append({"layout": layout, "call": "step", "call_s": step, "samples_per_s": n_prompts / step})
    return rows


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    steps, n_prompts, new_tokens = (3, 8, 8) if args.quick else (6, 16, 24)
    rows = []
    raw = {}
    for layout in ("same", "realloc"):
        raw[layout] = run(layout, steps, n_prompts, new_tokens)
        rows += summarize(layout, raw[layout], n_prompts)
    print(f"\nPPO step per call, 4 worker processes, {n_prompts} prompts x {new_tokens} new tokens, "
          f"median over steps 2..{steps} (seconds)")
    print_table(rows, ["layout", "call", "realloc_s", "transfer_s", "call_s", "post_hooks_s", "samples_per_s"])
    name = "bench_ppo_quick" if args.quick else "bench_ppo"
    write_json(name, {"rows": rows, "raw": raw}, extra={"steps": steps, "prompts": n_prompts,
                                                         "new_tokens": new_tokens})
    return {"rows": rows}


if __name__ == "__main__":
    main()
