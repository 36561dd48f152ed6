import logging as std_logging
import re

import pytest

from realhf.base import logging


@pytest.fixture
def name(request):
    return f"test.{request.node.name}"


def test_stdlib_is_untouched():
    assert std_logging.getLogger is not logging.getLogger
    assert std_logging.__name__ == "logging"
    assert logging._logging is std_logging


def test_logger_is_cached_with_one_handler(name):
    a = logging.getLogger(name)
    b = logging.getLogger(name)
    assert a is b
    assert isinstance(a, std_logging.Logger)
    assert a.name == f"realhf.{name}"
    assert len(a.handlers) == 1
    assert logging.getLogger(f"realhf.{name}") is a
    assert logging.getLogger() is std_logging.getLogger("realhf")


def test_console_format(name, capsys, monkeypatch):
    monkeypatch.setenv("REAL_LOG_COLOR", "0")
    logging.getLogger(name).warning("disk %d%% full", 93)
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"\d{{8}}-\d\d:\d\d:\d\d\.\d{{3}} {re.escape(name)} WARNING: disk 93% full\n", out
    ), out


def test_benchmark_type(name, capsys, monkeypatch):
    monkeypatch.setenv("REAL_LOG_COLOR", "0")
    logging.getLogger(name, "benchmark").info("step took 1.5s")
    assert f"{name} BENCHMARK: step took 1.5s" in capsys.readouterr().out


def test_colors(name, capsys, monkeypatch):
    monkeypatch.setenv("REAL_LOG_COLOR", "1")
    logging.getLogger(name + ".level").error("bad")
    logging.getLogger(name + ".line", "colored").info("good")
    out = capsys.readouterr().out.splitlines()
    assert "\033[31mERROR\033[0m: bad" in out[0]
    assert out[1].startswith("\033[32m") and out[1].endswith("good\033[0m")
    monkeypatch.setenv("REAL_LOG_COLOR", "0")
    logging.getLogger(name + ".line").info("plain")
    assert "\033" not in capsys.readouterr().out


def test_unknown_type():
    with pytest.raises(ValueError, match="Unknown logger type"):
        logging.getLogger("x", "fancy")


def test_level_from_env(name, capsys, monkeypatch):
    log = logging.getLogger(name)
    monkeypatch.setenv("REAL_LOG_LEVEL", "DEBUG")
    logging.getLogger(name)  # re-reads the environment
    log.debug("dbg-visible")
    monkeypatch.setenv("REAL_LOG_LEVEL", "warning")
    logging.getLogger(name)
    log.info("info-hidden")
    log.warning("warn-visible")
    out = capsys.readouterr().out
    assert "dbg-visible" in out and "warn-visible" in out and "info-hidden" not in out
    monkeypatch.delenv("REAL_LOG_LEVEL")
    logging.getLogger(name)
    assert std_logging.getLogger("realhf").level == std_logging.INFO


def test_parse_level():
    assert logging.parse_level("debug") == std_logging.DEBUG
    assert logging.parse_level("30") == 30
    assert logging.parse_level(std_logging.ERROR) == std_logging.ERROR
    with pytest.raises(ValueError):
        logging.parse_level("loud")


def test_file_logging(name, tmp_path, capsys):
    try:
        path = logging.setup_file_logging(str(tmp_path / "logs"), "model_worker-0")
        assert path == str(tmp_path / "logs" / "model_worker-0.log")
        again = logging.setup_file_logging(str(tmp_path / "logs"), "model_worker-0")
        assert again == path
        logging.getLogger(name).info("to file")
        logging.getLogger(name + ".other", "benchmark").info("also to file")
        for h in std_logging.getLogger("realhf").handlers:
            h.flush()
        lines = open(path).read().splitlines()
        assert len(lines) == 2  # one handler despite two setup calls
        assert lines[0].endswith(f"realhf.{name} INFO: to file")
        assert lines[1].endswith("also to file")
        assert "\033" not in "".join(lines)
        assert "to file" in capsys.readouterr().out  # console still works
    finally:
        logging.remove_file_logging(str(tmp_path))
    # Only our handler is gone (pytest may attach file handlers of its own).
    assert not [
        h for h in std_logging.getLogger("realhf").handlers
        if isinstance(h, std_logging.FileHandler) and h.baseFilename.startswith(str(tmp_path))
    ]


def test_records_do_not_reach_stdlib_root(name, capsys):
    seen = []

    class Collect(std_logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Collect()
    std_logging.getLogger().addHandler(handler)
    try:
        logging.getLogger(name).warning("only once")
    finally:
        std_logging.getLogger().removeHandler(handler)
    assert seen == []
    assert capsys.readouterr().out.count("only once") == 1
