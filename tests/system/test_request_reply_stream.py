import threading
import time
import uuid

import pytest
import torch

from realhf.base import name_resolve
from realhf.system.request_reply_stream import (
    MasterStream,
    Payload,
    RequestTimeout,
    WorkerError,
    WorkerStream,
)

WORKERS = ["model_worker/0", "model_worker/1", "model_worker/2"]


@pytest.fixture
def trial(monkeypatch):
    monkeypatch.setattr(name_resolve, "_default_repo", name_resolve.MemoryNameRecordRepository())
    return "exp_rrs", f"trial_{uuid.uuid4().hex[:8]}"


def _failing_handler(data):
    raise ValueError(f"bad input {data}")


def _serve(exp, trial, name, seen, ready, stop):
    """Echo worker thread: replies (name, data); records the order of requests."""
    with WorkerStream(exp, trial, name) as s:
        ready.set()
        while not stop.is_set():
            req = s.poll(block=True, timeout=0.05)
            if req is None:
                continue
            seen.append((req.handle_name, req.data))
            if req.handle_name == "raise":
                try:
                    _failing_handler(req.data)
                except Exception as e:
                    s.reply(req, e)
            elif req.handle_name == "silent":
                continue
            elif req.handle_name == "sleep":
                start = time.time()
                time.sleep(req.data)
                s.reply(req, (name, req.data), span=(start, time.time()))
            elif req.handle_name == "exit":
                s.reply(req.request_id, None)
                return
            else:
                s.reply(req.request_id, (name, req.data))


@pytest.fixture
def workers(trial):
    exp, tr = trial
    stop = threading.Event()
    seen = {n: [] for n in WORKERS}
    threads = []
    for n in WORKERS:
        ready = threading.Event()
        t = threading.Thread(target=_serve, args=(exp, tr, n, seen[n], ready, stop), daemon=True)
        t.start()
        assert ready.wait(5)
        threads.append(t)
    yield seen
    stop.set()
    for t in threads:
        t.join(5)


def test_round_trip_three_workers(trial, workers):
    exp, tr = trial
    with MasterStream(exp, tr, WORKERS, timeout_s=5) as m:
        ids = {}
        for i in range(3):
            ids[m.post(Payload(handler=i, handle_name="echo", data=torch.arange(i + 2)))] = i
        ids[m.post(Payload(handler="model_worker/2", handle_name="echo", data={"k": 7}))] = "named"
        replies = m.gather(list(ids), timeout=5)
        assert set(replies) == set(ids)
        for rid, tag in ids.items():
            name, data = replies[rid]
            if tag == "named":
                assert name == "model_worker/2" and data == {"k": 7}
            else:
                assert name == WORKERS[tag]
                assert torch.equal(data, torch.arange(tag + 2))
        assert m.pending_requests == {}
        # call(): several handlers, results in order; routing table.
        m._routing["shard-b"] = 1
        out = m.call([0, "shard-b", 2], "echo", datas=["a", "b", "c"])
        assert out == [(WORKERS[0], "a"), (WORKERS[1], "b"), (WORKERS[2], "c")]
        assert m.n_workers == 3
        assert m.call_all("echo", 9) == [(w, 9) for w in WORKERS]
        # poll(): non-blocking returns None when idle, blocking returns the reply.
        assert m.poll() is None
        rid = m.post(Payload(handler=1, handle_name="echo", data=5))
        reply = m.poll(block=True, timeout=5)
        assert reply.request_id == rid and reply.data == (WORKERS[1], 5)
        assert reply.handler == WORKERS[1] and reply.handle_name == "echo"


def test_order_preserved_per_worker(trial, workers):
    exp, tr = trial
    with MasterStream(exp, tr, WORKERS, timeout_s=10) as m:
        ids = []
        for k in range(40):
            for w in range(3):
                ids.append(m.post(Payload(handler=w, handle_name="echo", data=k)))
        replies = m.gather(ids)
        assert len(replies) == 120
    for n in WORKERS:
        assert [d for _, d in workers[n]] == list(range(40))


def test_syn_ack_releases_in_request_order(trial, workers):
    exp, tr = trial
    with MasterStream(exp, tr, WORKERS, timeout_s=5) as m:
        all_ids = []
        for k in range(5):
            ids = m.request([Payload(handler=w, handle_name="echo", data=k, no_syn=False)
                             for w in range(3)])
            all_ids += ids
        replies = m.gather(all_ids)
        assert sorted(d for _, d in replies.values()) == sorted(list(range(5)) * 3)
        assert m.poll() is None  # SYN replies never surface
    for n in WORKERS:
        assert [d for _, d in workers[n]] == list(range(5))


def test_timeout_names_worker_and_handle(trial, workers):
    exp, tr = trial
    with MasterStream(exp, tr, WORKERS, timeout_s=0.5) as m:
        ok = m.post(Payload(handler=0, handle_name="echo", data=1))
        lost = m.post(Payload(handler=2, handle_name="silent", data=1))
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout) as ei:
            m.gather([ok, lost])
        assert time.monotonic() - t0 < 2.0
        assert ei.value.worker_names == ["model_worker/2"]
        assert "model_worker/2" in str(ei.value) and "'silent'" in str(ei.value)
        # The reply that did arrive is still available.
        assert m.gather([ok])[ok] == (WORKERS[0], 1)
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match="silent"):
            m.poll(block=True)
        assert time.monotonic() - t0 < 2.0


def test_worker_exception_propagates(trial, workers):
    exp, tr = trial
    with MasterStream(exp, tr, WORKERS, timeout_s=5) as m:
        rid = m.post(Payload(handler=1, handle_name="raise", data=42))
        with pytest.raises(WorkerError) as ei:
            m.gather([rid])
        err = ei.value
        assert err.worker_name == "model_worker/1" and err.handle_name == "raise"
        assert err.remote_type == "ValueError"
        assert "_failing_handler" in err.remote_traceback
        assert "bad input 42" in str(err) and "model_worker/1" in str(err)
        # The stream stays usable afterwards.
        assert m.call([1], "echo", datas=[3]) == [(WORKERS[1], 3)]


def test_worker_missing_at_connect_times_out(trial):
    exp, tr = trial
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout, match="nobody"):
        MasterStream(exp, tr, ["nobody"], connect_timeout_s=0.3)
    assert time.monotonic() - t0 < 2.0


def test_payload_hooks_default_data():
    p = Payload(handler=0, handle_name="train_step", pre_hooks=["data_transfer"],
                post_hooks=["param_realloc", "offload"])
    assert p.pre_hook_data == [None] and p.post_hook_data == [None, None]
    assert p.no_syn and p.request_id != Payload(handler=0, handle_name="x").request_id
    with pytest.raises(ValueError):
        Payload(handler=0, handle_name="x", pre_hooks=["a"], pre_hook_data=[1, 2])


def test_tickets_to_some_workers_complete_in_any_order(trial, workers):
    exp, tr = trial
    with MasterStream(exp, tr, WORKERS, timeout_s=5) as m:
        slow = m.submit([0], "sleep", 0.3)
        fast = m.submit([2, 1], "echo", 7)
        assert m.wait_any([slow, fast]) is fast
        assert fast.ordered() == [("model_worker/2", 7), ("model_worker/1", 7)]
        assert not slow.done and fast.spans == {}  # the echo handler reports no span
        assert m.wait_any([slow]) is slow
        assert slow.ordered() == [("model_worker/0", 0.3)]
        start, end = slow.span()
        assert end - start >= 0.3 and slow.received_at >= end
    assert workers["model_worker/0"] == [("sleep", 0.3)]  # nothing went to the workers not named
    assert sorted(workers["model_worker/1"]) == [("echo", 7)]


def test_ticket_timeout_names_the_silent_worker(trial, workers):
    exp, tr = trial
    with MasterStream(exp, tr, WORKERS, timeout_s=5) as m:
        ok = m.submit([0], "echo", 1)
        quiet = m.submit([1], "silent")
        assert m.wait_any([ok, quiet]) is ok
        with pytest.raises(RequestTimeout) as e:
            m.wait_any([quiet], timeout=0.2)
        assert "model_worker/1" in str(e.value) and "silent" in str(e.value)
