"""A worker's training step reuses freed memory instead of faulting in fresh
pages every step once the malloc settings are applied (measured in fresh
processes, so the test process keeps its own settings)."""

import subprocess
import sys

_CHILD = r"""
import resource, sys, torch
import realhf.impl.model
from realhf.base import host_memory
from realhf.api.core.model_api import ReaLModelConfig
from realhf.impl.model.nn.real_llm_api import ReaLModel
if sys.argv[1] == "1":
    assert host_memory.keep_freed_memory()
torch.set_num_threads(1)
cfg = ReaLModelConfig(n_layers=2, n_kv_heads=2, n_q_heads=4, hidden_dim=256, intermediate_dim=688, vocab_size=1024,
                      head_dim=64, n_positions=None, apply_rotary=True, layer_norm_type="rms", mlp_type="llama",
                      activation_function="silu", tied_embedding=False)
model = ReaLModel(cfg).instantiate()
g = torch.Generator().manual_seed(0)
lens = [40 + 3 * i for i in range(16)]
ids = torch.randint(0, 1024, (sum(lens),), generator=g)
cu = torch.tensor([0] + lens).cumsum(0)

def step():
    model(ids, cu, max(lens)).logsumexp(-1).mean().backward()

for _ in range(6):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def _faults_per_step(tuned: bool) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(int(tuned))], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_tuned_training_step_reuses_freed_memory():
    untuned, tuned = _faults_per_step(False), _faults_per_step(True)
    assert untuned > 1000 and tuned < untuned / 5, (untuned, tuned)


def test_switch_off(monkeypatch):
    from realhf.base import host_memory

    monkeypatch.setenv("REAL_MALLOC_TUNING", "0")
    monkeypatch.setattr(host_memory, "_done", False)
    assert host_memory.keep_freed_memory() is False
