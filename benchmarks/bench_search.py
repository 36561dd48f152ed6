"""``allocation_mode=search``: searched plans against the heuristic, and the cost model against a real run.

1. Simulation (H100 nodes, :func:`realhf.search.hardware.h100_profile`):
   PPO with actor = critic = reference = reward model of one LLaMA shape,
   512 prompts of 512 tokens, 512 new tokens, 4 PPO minibatches, gradient
   checkpointing. For each (shape, GPUs) pair: the step time of the
   ``allocation_mode=heuristic`` plan (its meshes and layouts, each call's
   best micro-batch count; flagged ``OOM`` when the cost model says it does
   not fit, its time is then what it would take with enough memory), the
   searched plan's step time and the speedup. Both are evaluated by the same
   cost model.
2. Here: the ``ppo`` quickstart on 2 CPU workers (the compute-bound llama
   of ``benchmarks/_shape.py``, 16 prompts of 10..28 tokens, 32 new tokens,
   2 PPO minibatches: the workload of ``bench_ppo_trl.py``) through
   ``run_with_pipes``. The machine is profiled (``profile_this_machine``),
   a calibration run with every call data-parallel (``d2p1m1``) fits the
   profile's load multiplier, per-call and per-step overheads
   (:mod:`realhf.search.calibrate`), then ``allocation_mode=search`` with
   the calibrated profile picks a plan that is run and timed: its predicted
   step time (mean prompt length) from the measured profile alone
   (``predicted_s``) and from the profile fitted to the calibration run
   (``predicted_fit_s``), next to the median measured step time (steps 2..).
   The fit carries the calibration run's load into the prediction, so on a
   shared machine whose load changes between the two runs it can be worse
   than the profile alone.

Run ``python benchmarks/bench_search.py`` (a few minutes on 2 cores;
``--quick`` for a smaller subset, ``--no-run`` to skip part 2). Results go to
``benchmarks/results/bench_search.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_json  # noqa: E402

SIM_CASES = [("7b", 8), ("7b", 16), ("13b", 16), ("13b", 32), ("34b", 32), ("34b", 64), ("70b", 64),
             ("70b", 128)]
QUICK_CASES = [("7b", 8), ("13b", 16), ("70b", 64)]
N_SEQS, PROMPT_LEN, GEN_LEN, MINIBATCHES = 512, 512, 512, 4


def simulate(cases, iters: int, budget: float, seed: int) -> List[Dict[str, Any]]:
    from realhf.search.baseline import best_uniform_plan, heuristic_plan
    from realhf.search.hardware import h100_profile
    from realhf.search.plan import format_plan
    from realhf.search.search import PlanSearch
    from realhf.search.workload import LLAMA, ppo_calls

    prof = h100_profile()
    rows = []
    for shape, gpus in cases:
        calls = ppo_calls(LLAMA[shape], n_seqs=N_SEQS, prompt_len=PROMPT_LEN, gen_len=GEN_LEN,
                          n_minibatches=MINIBATCHES)
        t0 = time.perf_counter()
        space = PlanSearch(calls, prof, gpus // prof.devices_per_node)
        heur = heuristic_plan(calls, prof, gpus // prof.devices_per_node, space.evaluator)
        h = space.evaluator.evaluate(heur)
        uni = best_uniform_plan(space)
        uni_s = space.evaluator.seconds(uni) if uni is not None else float("inf")
        res = space.run(seed=seed, iters=iters, time_budget_s=budget, init=[heur] + ([uni] if uni else []))
        rows.append({"model": f"llama-{shape}", "gpus": gpus,
                     "heuristic_s": h.raw_seconds, "heuristic_oom": h.oom, "best_uniform_s": uni_s,
                     "searched_s": res.seconds, "speedup": h.raw_seconds / res.seconds,
                     "speedup_vs_uniform": uni_s / res.seconds,
                     "search_s": time.perf_counter() - t0, "plan": format_plan(res.plan),
                     "heuristic_plan": format_plan(heur), "uniform_plan": format_plan(uni) if uni else None})
        print(f"{shape} x{gpus}: heuristic {h.raw_seconds:.2f}s{' (OOM)' if h.oom else ''} "
              f"searched {res.seconds:.2f}s  {format_plan(res.plan)}", flush=True)
    return rows


N_PROMPTS, NEW_TOKENS = 16, 32
CALIBRATION_MODE = "d2p1m1"  # every call data-parallel over both workers


def _ppo(mode: str, steps: int, seed: int, root: Path, model: Path, prompts: Path, max_len: int):
    """Run the ppo quickstart with ``allocation_mode=mode``; (config, per-step seconds, per-call medians)."""
    import realhf.experiments  # noqa: F401
    from realhf.api.quickstart.entrypoint import parse_quickstart
    from realhf.system.pipe_runner import run_with_pipes

    args = ["experiment_name=bench-search", f"trial_name={mode.replace(':', '-').replace(',', '-')}",
            "n_gpus_per_node=2", f"allocation_mode={mode}",
            f"dataset.path={prompts}", f"dataset.train_bs_n_seqs={N_PROMPTS}",
            f"dataset.max_prompt_len={max_len}", f"ppo.gen.max_new_tokens={NEW_TOKENS}",
            f"ppo.gen.min_new_tokens={NEW_TOKENS}", "ppo.gen.temperature=1.0", "ppo.gen.top_p=1.0",
            "ppo.gen.top_k=1024", "ppo.ppo_n_minibatches=2", f"seed={seed}",
            f"exp_ctrl.benchmark_steps={steps}", f"exp_ctrl.total_train_epochs={steps}",
            "actor.gradient_checkpointing=False", "critic.gradient_checkpointing=False"]
    for role in ("actor", "critic", "ref", "rew"):
        args += [f"{role}.path={model}", f"{role}.init_from_scratch=True"]
    cfg = parse_quickstart("ppo", args)
    exp = cfg.initial_setup()
    master = run_with_pipes(exp, "bench-search", args[1].split("=")[1], timeout=900, fileroot=str(root))
    steps_s = [h.seconds for h in master.history]
    per_call: Dict[str, List[float]] = {}
    for h in master.history[1:]:
        for call, t in h.timing.items():
            if "start" in t and call != "fetch":
                per_call.setdefault(call, []).append(t["end"] - t["start"])
    return cfg, steps_s, {k: statistics.median(v) for k, v in per_call.items()}


def run_here(steps: int, seed: int) -> Dict[str, Any]:
    """Profile, calibrate on a dp2 run, then search and run the searched plan (module docstring, part 2)."""
    import os

    import _shape

    from realhf.search import quickstart as sq
    from realhf.search.calibrate import calibrate, per_call_error
    from realhf.search.hardware import profile_this_machine
    from realhf.search.plan import PlanEvaluator, format_plan
    from realhf.search.workload import Assignment, Layout, Mesh

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        model = _shape.materialize()
        tok = _shape.load_tokenizer(model)
        prompts = _shape.write_prompts(root / "prompts.jsonl", tok, n=N_PROMPTS)
        lens = [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in _shape.read_jsonl(prompts)]
        t0 = time.perf_counter()
        raw = profile_this_machine(2)
        profile_s = time.perf_counter() - t0
        prof_path = root / "profile.json"
        prof_path.write_text(json.dumps(raw.to_json()))
        os.environ["REALHF_SEARCH_PROFILE"] = str(prof_path)

        def mean_len_calls(cfg):
            calls = sq.workload_of(cfg, cfg.mfc_names, cfg.train_mfc_names)
            return [dataclasses.replace(c, prompt_len=round(statistics.mean(lens))) for c in calls]

        # 1. calibration run: a fixed plan that the search is not asked about
        cfg, cal_steps, cal_calls = _ppo(CALIBRATION_MODE, steps, seed, root, model, prompts, max(lens))
        cal_plan = {n: Assignment(Mesh(0, 2), Layout(2, 1, 1, 1)) for n in cfg.mfc_names}
        calls = mean_len_calls(cfg)
        cal_measured = statistics.median(cal_steps[1:] or cal_steps)
        cal_raw_pred = PlanEvaluator(calls, raw, 2).evaluate(cal_plan).seconds
        fitted = calibrate(raw, calls, cal_plan, cal_calls, cal_measured)
        prof_path.write_text(json.dumps(fitted.to_json()))
        # 2. the searched plan, predicted with the calibrated profile
        cfg, steps_s, calls_s = _ppo("search", steps, seed, root, model, prompts, max(lens))
        _, res = sq.search_allocations(cfg, cfg.mfc_names, cfg.train_mfc_names)
        calls = mean_len_calls(cfg)
        pred = PlanEvaluator(calls, fitted, 2).evaluate(res.plan)
        pred_raw = PlanEvaluator(calls, raw, 2).evaluate(res.plan)
        cal_pred_dp2 = PlanEvaluator(calls, fitted, 2).evaluate(cal_plan).seconds
        os.environ.pop("REALHF_SEARCH_PROFILE", None)
    measured = statistics.median(steps_s[1:] or steps_s)
    return {"plan": format_plan(res.plan), "predicted_s": pred.seconds, "predicted_uncalibrated_s": pred_raw.seconds,
            "measured_median_s": measured, "ratio_measured_over_predicted": measured / pred.seconds,
            "steps_s": steps_s, "profile_s": profile_s, "profile_raw": raw.to_json(),
            "profile_calibrated": fitted.to_json(),
            "calibration": {"mode": CALIBRATION_MODE, "steps_s": cal_steps, "measured_median_s": cal_measured,
                            "predicted_uncalibrated_s": cal_raw_pred, "predicted_calibrated_s": cal_pred_dp2,
                            "calls_s": cal_calls},
            "predicted_calls": {k: b - a for k, (a, b) in pred.timeline.items()},
            "measured_calls": calls_s, "per_call_measured_over_model": per_call_error(fitted, calls, res.plan, calls_s),
            "mean_prompt_len": statistics.mean(lens)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-run", action="store_true", help="skip the measured run on this machine")
    ap.add_argument("--no-sim", action="store_true", help="skip the H100 simulation")
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of search per case")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    out: Dict[str, Any] = {"setup": {"n_seqs": N_SEQS, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN,
                                     "minibatches": MINIBATCHES, "iters": a.iters, "budget_s": a.budget,
                                     "seed": a.seed}}
    if not a.no_sim:
        rows = simulate(QUICK_CASES if a.quick else SIM_CASES, a.iters, a.budget, a.seed)
        out["simulation"] = rows
        print_table([{k: v for k, v in r.items() if not k.endswith("plan")} for r in rows])
    if not a.no_run:
        here = run_here(a.steps if not a.quick else 4, a.seed)
        out["here"] = here
        print(f"searched plan here: {here['plan']}")
        c = here["calibration"]
        print_table([{"plan": f"calibration ({c['mode']})", "predicted_s": c["predicted_uncalibrated_s"],
                      "measured_s": c["measured_median_s"],
                      "measured/predicted": c["measured_median_s"] / c["predicted_uncalibrated_s"],
                      "predicted_fit_s": c["predicted_calibrated_s"],
                      "measured/predicted_fit": c["measured_median_s"] / c["predicted_calibrated_s"]},
                     {"plan": "searched", "predicted_s": here["predicted_uncalibrated_s"],
                      "measured_s": here["measured_median_s"],
                      "measured/predicted": here["measured_median_s"] / here["predicted_uncalibrated_s"],
                      "predicted_fit_s": here["predicted_s"],
                      "measured/predicted_fit": here["ratio_measured_over_predicted"]}])
        print_table([{"call": c, "predicted_s": here["predicted_calls"].get(c),
                      "measured_s": here["measured_calls"].get(c)} for c in here["predicted_calls"]])
    write_json("bench_search_quick" if a.quick else "bench_search", out)


if __name__ == "__main__":
    main()
