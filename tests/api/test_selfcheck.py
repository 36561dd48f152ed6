"""The README's main command (the self-check) passes and reports learning."""

from realhf.apps import selfcheck


def test_selfcheck_passes(capsys):
    assert selfcheck.main(["--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "self-check passed" in out and "FAIL" not in out
    assert "ReaLModel training" in out and "KV-cache generation" in out


def test_selfcheck_fails_when_a_check_fails(monkeypatch, capsys):
    def broken():
        raise RuntimeError("native op mismatch")

    monkeypatch.setattr(selfcheck, "check_native_ops", broken)
    monkeypatch.setattr(selfcheck, "check_data_and_training", lambda steps: [("data", True, "")])
    assert selfcheck.main([]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] native operators" in out and "native op mismatch" in out
