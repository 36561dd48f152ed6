"""A worker's training step reuses freed memory instead of faulting in fresh
pages every step once the malloc settings are applied (measured in fresh
processes, so the test process keeps its own settings)."""

import subprocess
import sys

_PRELUDE = r"""
import resource, sys, torch
from realhf.base import host_memory
if sys.argv[1] == "1":
    assert host_memory.keep_freed_memory()
torch.set_num_threads(1)

def faults_per_call(fn, warmup=6, calls=5):
    for _ in range(warmup):
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // calls)
"""

_TRAIN_STEP = _PRELUDE + r"""
import realhf.impl.model
from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.nn.real_llm_api import ReaLModel
cfg = ReaLModelConfig(n_layers=2, n_kv_heads=2, n_q_heads=4, hidden_dim=256, intermediate_dim=688, vocab_size=1024,
                      head_dim=64, n_positions=None, apply_rotary=True, layer_norm_type="rms", mlp_type="llama",
                      activation_function="silu", tied_embedding=False)
model = ReaLModel(cfg).instantiate()
g = torch.Generator().manual_seed(0)
lens = [40 + 3 * i for i in range(16)]
ids = torch.randint(0, 1024, (sum(lens),), generator=g)
cu = torch.tensor([0] + lens).cumsum(0)
faults_per_call(lambda: model(ids, cu, max(lens)).logsumexp(-1).mean().backward())
"""

# Eight tensors a call, each larger than any freed before: untuned, glibc's
# adaptive threshold (the largest block freed so far) always lags behind, so
# every tensor is a fresh mmap that faults in all its pages; tuned, they come
# from the heap and reuse the memory the previous call freed.
_GROWING = _PRELUDE + r"""
size = [1 << 18]
def churn():
    size[0] += 1 << 14
    ts = [torch.empty(size[0]).fill_(1.0) for _ in range(8)]
    del ts
faults_per_call(churn)
"""


def _faults(script: str, tuned: bool) -> int:
    out = subprocess.run([sys.executable, "-c", script, str(int(tuned))], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_settings_keep_freed_memory():
    untuned, tuned = _faults(_GROWING, False), _faults(_GROWING, True)
    # Untuned: the tensors' pages (~3.2k of 4 KB); tuned: only the heap's growth.
    assert untuned > 2000 and tuned < untuned / 5, (untuned, tuned)


def test_tuned_training_step_faults_few_pages():
    # Untuned, the same step faults ~1-6k pages (rarely under 100: it depends
    # on what glibc's adaptive thresholds learned); tuned, 0-220.
    assert _faults(_TRAIN_STEP, True) < 500


def test_switch_off(monkeypatch):
    from realhf.base import host_memory

    monkeypatch.setenv("REAL_MALLOC_TUNING", "0")
    monkeypatch.setattr(host_memory, "_done", False)
    assert host_memory.keep_freed_memory() is False
