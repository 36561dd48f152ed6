"""rw, dpo, gen and ppo launched from the real CLI (``python -m realhf.apps.quickstart <exp> ...``).

Each run starts 4 model workers and a master through the local scheduler
(``n_gpus_per_node=4``; on CPU a "GPU" is a worker process) under one of two
allocation modes per experiment, and checks what a user relies on: the exit
code, the step count, the per-step records in ``stats.jsonl`` and, for
``gen``, the JSONL output. The layouts the CLI actually launched are read
back from ``experiment_config.pkl`` in the trial's log directory, so a mode
that was silently ignored would fail. One case per experiment is in the
default suite; the second mode is marked ``slow`` (``-m slow``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "realhf", "assets", "models", "tiny-llama")
DATA = os.path.join(ROOT, "realhf", "assets", "data")
TIMEOUT_S = 300


# ----------------------------------------------------------------- helpers
def _run(exp, args, root, trial):
    """Launch the CLI in a subprocess; on timeout interrupt it (SIGINT makes it stop its workers)."""
    env = dict(os.environ, REAL_FILEROOT=str(root))
    cmd = [sys.executable, "-m", "realhf.apps.quickstart", exp, f"experiment_name={exp}",
           f"trial_name={trial}", "n_gpus_per_node=4", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        pytest.fail(f"{exp} did not finish in {TIMEOUT_S}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _check_ok(res, n_steps):
    tail = f"\n--- stdout tail ---\n{res.stdout[-3000:]}\n--- stderr tail ---\n{res.stderr[-3000:]}"
    assert res.returncode == 0, f"exit code {res.returncode}" + tail
    assert f"global step {n_steps}/{n_steps}" in res.stdout, tail  # the step logs reach the console


def _log_dir(root, exp, trial):
    from realhf.base import constants

    return os.path.join(root, "logs", constants.get_user(), exp, trial)


def _records(root, exp, trial):
    with open(os.path.join(_log_dir(root, exp, trial), "stats.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if "stats" in r], [r for r in recs if "eval" in r]


def _launched_layouts(root, exp, trial):
    """MFC name -> ((dp, pp, tp), model name, launched MFC def) from the config the CLI launched."""
    with open(os.path.join(_log_dir(root, exp, trial), "experiment_config.pkl"), "rb") as f:
        cfg = pickle.load(f)
    out = {}
    for rpc in cfg.model_rpcs:
        d = cfg.model_layouts[rpc.model_name].topology.get_dim_dict()
        out[rpc.name] = ((d["data"], d["pipe"], d["model"]), rpc.model_name, rpc)
    return out


def _finite(stats, keys, where):
    for k in keys:
        assert k in stats, f"{where}: no {k!r} in {sorted(stats)}"
        assert math.isfinite(stats[k]), f"{where}: {k}={stats[k]}"


def _model(role):
    return [f"{role}.path={TINY}", f"{role}.init_from_scratch=True"]


def _slow(*values, id):
    return pytest.param(*values, id=id, marks=pytest.mark.slow)


# ---------------------------------------------------------------------- rw
RW_STEPS = 3


@pytest.mark.parametrize("alloc,layout", [
    pytest.param(["allocation_mode=d2p1m2"], (2, 1, 2), id="d2p1m2"),
    _slow(["allocation_mode=manual", "allocation.parallel.pipeline_parallel_size=2",
           "allocation.parallel.model_parallel_size=2"], (1, 2, 2), id="manual-d1p2m2"),
])
def test_rw_cli(tmp_path, alloc, layout):
    res = _run("rw", [*alloc, *_model("model"), f"dataset.train_path={DATA}/rw_pair-train.jsonl",
                      f"dataset.valid_path={DATA}/rw_pair-valid.jsonl", "dataset.max_seqlen=128",
                      "dataset.train_bs_n_seqs=8", "dataset.valid_bs_n_seqs=64",
                      f"exp_ctrl.benchmark_steps={RW_STEPS}", f"exp_ctrl.eval_freq_steps={RW_STEPS}"],
               tmp_path, "t")
    _check_ok(res, RW_STEPS)
    assert _launched_layouts(tmp_path, "rw", "t")["rwTrain"][0] == layout
    steps, evals = _records(tmp_path, "rw", "t")
    assert [r["global_step"] for r in steps] == list(range(1, RW_STEPS + 1))
    for r in steps:
        _finite(r["stats"]["rwTrain"], ["loss", "acc", "pos_score", "neg_score", "grad_norm"],
                f"step {r['global_step']}")
        assert 0.0 <= r["stats"]["rwTrain"]["acc"] <= 1.0
    assert len(evals) == 1 and evals[0]["global_step"] == RW_STEPS
    ev = evals[0]["eval"]["rwTrain"]
    _finite(ev, ["loss", "acc"], "eval")
    with open(os.path.join(DATA, "rw_pair-valid.jsonl")) as f:
        n_valid = sum(1 for line in f if line.strip())
    assert ev["n_items"] == n_valid  # the whole validation file is scored
    assert "Evaluation rwTrain: loss=" in res.stdout


# --------------------------------------------------------------------- dpo
DPO_STEPS = 12


@pytest.mark.parametrize("alloc,layouts", [
    pytest.param(["allocation_mode=actor_train:d2p2m1,ref_inf:d4p1m1"],
                 {"actor_train": (2, 2, 1), "ref_inf": (4, 1, 1)}, id="per-mfc"),
    _slow(["allocation_mode=d2p1m2"], {"actor_train": (2, 1, 2), "ref_inf": (2, 1, 2)}, id="d2p1m2"),
])
def test_dpo_cli_margin_rises(tmp_path, alloc, layouts):
    # A learning rate far above the default (1e-5) and beta=0.5 so that a few
    # steps of a from-scratch model visibly separate chosen from rejected.
    res = _run("dpo", [*alloc, *_model("actor"), *_model("ref"), "beta=0.5", "actor.optimizer.lr=2e-3",
                       "actor.optimizer.lr_scheduler_type=constant", "actor.optimizer.warmup_steps_proportion=0",
                       f"dataset.train_path={DATA}/rw_pair-train.jsonl", "dataset.max_seqlen=128",
                       "dataset.train_bs_n_seqs=16", f"exp_ctrl.benchmark_steps={DPO_STEPS}"], tmp_path, "t")
    _check_ok(res, DPO_STEPS)
    launched = _launched_layouts(tmp_path, "dpo", "t")
    assert {k: v[0] for k, v in launched.items()} == layouts
    steps, _ = _records(tmp_path, "dpo", "t")
    assert [r["global_step"] for r in steps] == list(range(1, DPO_STEPS + 1))
    for r in steps:
        _finite(r["stats"]["actor_train"], ["loss", "margin", "pos_score", "neg_score", "acc", "kl"],
                f"step {r['global_step']}")
    margins = [r["stats"]["actor_train"]["margin"] for r in steps]
    first, last = sum(margins[:3]) / 3, sum(margins[-3:]) / 3
    assert last > first + 0.25, margins
    ckpt = os.path.join(tmp_path, "checkpoints")
    assert any("actor" in dirs for _, dirs, _ in os.walk(ckpt)), "no actor checkpoint saved"


# --------------------------------------------------------------------- gen
@pytest.mark.parametrize("alloc,layout", [
    pytest.param(["allocation_mode=d4p1m1"], (4, 1, 1), id="d4p1m1"),
    _slow(["allocation_mode=manual", "allocation.parallel.data_parallel_size=2",
           "allocation.parallel.model_parallel_size=2"], (2, 1, 2), id="manual-d2p1m2"),
])
def test_gen_cli_writes_one_record_per_prompt(tmp_path, alloc, layout):
    # 12 prompts, batches of 8: one full and one partial batch, the whole epoch.
    with open(os.path.join(DATA, "prompt-valid.jsonl")) as f:
        prompts = [json.loads(line) for _, line in zip(range(12), f)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    res = _run("gen", [*alloc, *_model("model"), f"dataset.path={data}", "dataset.train_bs_n_seqs=8",
                       "gen.max_new_tokens=8", "gen.min_new_tokens=1"], tmp_path, "t")
    _check_ok(res, 2)
    assert _launched_layouts(tmp_path, "gen", "t")["gen"][0] == layout
    out = os.path.join(_log_dir(tmp_path, "gen", "t"), "output.jsonl")
    assert os.path.exists(out), os.listdir(_log_dir(tmp_path, "gen", "t"))
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    by_id = {p["id"]: p["prompt"] for p in prompts}
    assert sorted(r["id"] for r in rows) == sorted(by_id), [r["id"] for r in rows]  # each prompt exactly once
    for r in rows:
        assert {"id", "prompt", "answer", "seq"} <= set(r), r
        assert r["prompt"] == by_id[r["id"]], r
        assert isinstance(r["answer"], str) and r["seq"].startswith(r["prompt"]), r
    assert any(r["answer"].strip() for r in rows)


# --------------------------------------------------------------------- ppo
PPO_STEPS = 3
PPO_MANUAL = [
    "allocation_mode=manual",
    # actor_gen dp4 vs actor_train dp2 x tp2: a second actor replica, parameters reallocated each step
    "actor_gen.parallel.data_parallel_size=4",
    "actor_train.parallel.data_parallel_size=2", "actor_train.parallel.model_parallel_size=2",
    "critic_train.parallel.data_parallel_size=2", "critic_train.parallel.pipeline_parallel_size=2",
    "critic_inf.parallel.data_parallel_size=2", "critic_inf.parallel.pipeline_parallel_size=2",
    "ref_inf.parallel.data_parallel_size=4", "rew_inf.parallel.data_parallel_size=4",
]


@pytest.mark.parametrize("alloc", [
    pytest.param(PPO_MANUAL, id="manual-realloc"),
    _slow(["allocation_mode=heuristic"], id="heuristic"),
])
def test_ppo_cli(tmp_path, alloc):
    res = _run("ppo", [*alloc, *_model("actor"), *_model("critic"), *_model("ref"), *_model("rew"),
                       f"dataset.path={DATA}/prompt-train.jsonl", "dataset.train_bs_n_seqs=8",
                       "dataset.max_prompt_len=48", "ppo.gen.max_new_tokens=12", "ppo.gen.min_new_tokens=1",
                       "ppo.ppo_n_minibatches=1", f"exp_ctrl.benchmark_steps={PPO_STEPS}",
                       # the documented sampling options, given directly under ppo
                       "ppo.kl_ctl=0.1", "ppo.top_p=0.9", "ppo.top_k=1000"], tmp_path, "t")
    _check_ok(res, PPO_STEPS)
    launched = _launched_layouts(tmp_path, "ppo", "t")
    assert set(launched) == {"actor_gen", "rew_inf", "ref_inf", "critic_inf", "actor_train", "critic_train"}
    gen_layout, gen_model, gen_rpc = launched["actor_gen"]
    gen_args = gen_rpc.interface_impl.args
    assert gen_args["kl_ctl"] == 0.1
    assert gen_args["generation_config"].top_p == 0.9 and gen_args["generation_config"].top_k == 1000
    train_layout, train_model, _ = launched["actor_train"]
    if alloc is PPO_MANUAL:
        assert gen_layout == (4, 1, 1) and train_layout == (2, 1, 2)
        assert launched["critic_train"][0] == (2, 2, 1) and launched["ref_inf"][0] == (4, 1, 1)
    # Both modes put generation on another layout than training: a separate
    # replica that pulls the trained weights before and drops them after.
    assert gen_layout != train_layout and gen_model != train_model
    assert gen_rpc.pre_hooks and gen_rpc.post_hooks
    steps, _ = _records(tmp_path, "ppo", "t")
    assert [r["global_step"] for r in steps] == list(range(1, PPO_STEPS + 1))
    for r in steps:
        where = f"step {r['global_step']}"
        _finite(r["stats"]["actor_train"], ["task_reward", "ref_kl", "kl_reward", "advantage", "actor_loss",
                                            "ppo_approx_kl", "grad_norm"], where + " actor_train")
        _finite(r["stats"]["critic_train"], ["task_reward", "value_loss", "returns", "grad_norm"],
                where + " critic_train")
        assert r["stats"]["actor_train"]["avg_seq_len"] > r["stats"]["actor_train"]["avg_prompt_len"]
    # The launched master (ZeroMQ) records each call's mesh and its span on the workers' clocks.
    with open(os.path.join(_log_dir(tmp_path, "ppo", "t"), "experiment_config.pkl"), "rb") as f:
        cfg = pickle.load(f)
    meshes = {rpc.name: sorted(cfg.model_layouts[rpc.model_name].global_ranks) for rpc in cfg.model_rpcs}
    for r in steps:
        timing = r["timing"]
        for call, mesh in meshes.items():
            assert timing[call]["ranks"] == mesh and 0 <= timing[call]["start"] <= timing[call]["end"]
        assert timing["actor_train"]["start"] >= timing["actor_gen"]["end"]
    if alloc is not PPO_MANUAL:  # the heuristic trains actor and critic on disjoint halves, at the same time
        assert set(meshes["actor_train"]).isdisjoint(meshes["critic_train"])
        assert any(t["actor_train"]["start"] < t["critic_train"]["end"]
                   and t["critic_train"]["start"] < t["actor_train"]["end"] for t in (r["timing"] for r in steps))
