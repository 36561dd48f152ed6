import os
import pickle

import pytest

from realhf.system import trial_files as tf

from tests.system_e2e._sft import sft_experiment


def test_set_aside_logs_moves_everything_but_earlier_runs(tmp_path):
    log = tmp_path / "log"
    assert tf.set_aside_logs(str(log)) is None  # nothing there yet
    (log / "previous-1").mkdir(parents=True)
    (log / "stats.jsonl").write_text("{}\n")
    (log / "tensorboard").mkdir()
    moved = tf.set_aside_logs(str(log))
    assert os.path.basename(moved).startswith("previous-")
    assert sorted(os.listdir(moved)) == ["stats.jsonl", "tensorboard"]
    assert sorted(os.listdir(log)) == sorted(["previous-1", os.path.basename(moved)])
    assert tf.set_aside_logs(str(log)) is None


def test_interrupted_writes_are_removed_and_a_moved_checkpoint_restored(tmp_path):
    save, rec = tmp_path / "ckpt", tmp_path / "rec"
    role = save / "default"
    (role / "epoch1epochstep2globalstep2").mkdir(parents=True)
    (role / "epoch1epochstep2globalstep2" / "model.safetensors").write_text("ok")
    (role / ".epoch1epochstep4globalstep4.tmp-ab12cd").mkdir()  # killed mid-write
    (role / ".epoch1epochstep4globalstep4.tmp-ab12cd" / "model.safetensors").write_text("half")
    (role / ".epoch1epochstep3globalstep3.old-1a2b3c4d").mkdir()  # killed between the two renames
    (role / "epoch1epochstep2globalstep2" / ".config.json.x1y2.tmp").write_text("half")
    (rec / "globalstep2" / "model_worker0").mkdir(parents=True)
    (rec / "globalstep2" / "model_worker0" / "state.pt").write_text("ok")
    (rec / "globalstep3" / "model_worker0").mkdir(parents=True)  # dumped, never named in recover_info
    (rec / "globalstep2" / "model_worker0" / "state.pt.tmp4242").write_text("half")
    with open(rec / "recover_info.pkl", "wb") as f:
        pickle.dump({"dir": str(rec / "globalstep2")}, f)
    (rec / "recover_info.pkl.tmp").write_text("half")

    done = tf.remove_interrupted_writes(str(save), str(rec))
    assert len(done) == 6, done
    assert sorted(os.listdir(role)) == ["epoch1epochstep2globalstep2", "epoch1epochstep3globalstep3"]
    assert os.listdir(role / "epoch1epochstep2globalstep2") == ["model.safetensors"]
    assert sorted(os.listdir(rec)) == ["globalstep2", "recover_info.pkl"]
    assert os.listdir(rec / "globalstep2" / "model_worker0") == ["state.pt"]


def test_unwritable_directory_is_named_with_the_os_error(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("")
    with pytest.raises(tf.LaunchRefused) as e:
        tf.check_writable({"log": str(tmp_path / "ok"), "checkpoint": str(f / "sub")})
    assert str(e.value).startswith(f"cannot write the checkpoint directory {f}/sub: [Errno 20] Not a directory")
    assert os.path.isdir(tmp_path / "ok")


def test_resume_needs_a_recover_state_of_the_same_layout(tmp_path):
    cfg = sft_experiment(2, 1, 1)
    with pytest.raises(tf.LaunchRefused, match="recover_mode=resume, but there is no recover state"):
        tf.check_resumable(cfg, str(tmp_path), required=True)
    assert tf.check_resumable(cfg, str(tmp_path), required=False) is None
    with open(tmp_path / tf.RECOVER_INFO, "wb") as f:
        pickle.dump({"dir": "x", "layouts": tf.describe_layouts(cfg)}, f)
    assert tf.check_resumable(cfg, str(tmp_path), required=True)["dir"] == "x"
    with pytest.raises(tf.LaunchRefused) as e:
        tf.check_resumable(sft_experiment(1, 1, 2), str(tmp_path), required=True)
    msg = str(e.value)
    assert "model workers: 2; default@0: d2p1m1 on workers [0, 1]" in msg
    assert "default@0: d1p2m1 on workers [0, 1]" in msg
