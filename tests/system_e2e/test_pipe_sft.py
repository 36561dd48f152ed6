"""SFT through the master and model workers (pipes as transport)."""

import os

import pytest

from realhf.system.pipe_runner import run_with_pipes

from tests.system_e2e._sft import sft_experiment

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("dp,tp,pp", [(2, 2, 1), (1, 2, 2)])
def test_sft_loss_falls_and_saves(dp, tp, pp, tmp_path):
    cfg = sft_experiment(dp, tp, pp, benchmark_steps=8, eval_steps=8)
    master = run_with_pipes(cfg, "test-sft", f"t{dp}{tp}{pp}", timeout=120, fileroot=str(tmp_path))
    losses = [h.stats["trainDefault"]["loss"] for h in master.history]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5
    assert "loss" in master.last_eval["trainDefault"]


def test_resume_gives_the_same_losses(tmp_path):
    root, rec = str(tmp_path), str(tmp_path / "recover")
    straight = run_with_pipes(sft_experiment(2, 1, 2, benchmark_steps=6), "rec", "a", fileroot=root)
    first = run_with_pipes(sft_experiment(2, 1, 2, benchmark_steps=3), "rec", "b", fileroot=root,
                           recover_dir=rec, save_recover_states=True)
    resumed = run_with_pipes(sft_experiment(2, 1, 2, benchmark_steps=6), "rec", "b", fileroot=root,
                             recover_dir=rec, save_recover_states=True)
    a = [h.stats["trainDefault"]["loss"] for h in straight.history]
    b = [h.stats["trainDefault"]["loss"] for h in first.history + resumed.history]
    assert len(resumed.history) == 3 and resumed.history[0].global_step == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


def test_step_statistics_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_with_pipes(sft_experiment(2, 1, 1, benchmark_steps=3, eval_steps=3), "tb", "t", fileroot=str(tmp_path))
    from realhf.base import constants

    acc = EventAccumulator(os.path.join(tmp_path, "logs", constants.get_user(), "tb", "t", "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "trainDefault/loss" in tags and "eval/trainDefault/loss" in tags
    assert [e.step for e in acc.Scalars("trainDefault/loss")] == [1, 2, 3]


def test_steps_are_labelled_within_their_epoch(tmp_path):
    # 200 records in batches of 100: two steps per epoch, two epochs.
    from realhf.base import constants

    master = run_with_pipes(sft_experiment(2, 1, 1, n_seqs=100, epochs=2), "ep", "t", fileroot=str(tmp_path))
    labels = [(h.epoch, h.epoch_step, h.global_step) for h in master.history]
    assert labels == [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]
    saved = os.listdir(os.path.join(tmp_path, "checkpoints", constants.get_user(), "ep", "t", "default"))
    assert saved == ["epoch2epochstep2globalstep4"]
