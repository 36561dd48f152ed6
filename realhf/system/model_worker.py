"""Model worker: owns model shards on one device and executes the master's requests.

Every model worker is one rank of a torch.distributed world spanning all
model workers. :class:`ModelWorkerCore` holds this rank's shards (model,
backend, interfaces), the dataset shard when the rank is a *data head* (tp
rank 0 on the last pipeline stage of the first call's model, one per dp
rank), and a local store of sample items keyed by id. The master never sees
tensors: it tells workers which items to send to whom (``transfer``), which
call to run on which ids (``mfc``), and gets back metadata and statistics.

Handlers (``handle(name, data)``):

* ``spec`` -> dataset size on data heads (None elsewhere);
* ``initialize`` -> the backend wraps the model for its FinetuneSpec;
* ``fetch`` -> next batch of the data head's loader (less the ids in ``skip``), kept locally,
  metadata returned;
* ``filter`` -> the decisions of a call's input filter on the items this rank was given;
* ``transfer`` -> point-to-point exchange of stored items between ranks;
* ``mfc`` -> run a call's interface on the given ids; outputs are stored
  where they are produced; dp heads return output metadata and stats;
* ``hook`` -> parameter reallocation / offload hooks;
* ``evaluate`` / ``save`` -> the interface's evaluate / save;
* ``clear`` -> forget items; ``state`` / ``load_state`` -> recovery states;
* ``empty_cache`` -> ``torch.cuda.empty_cache()`` (every ``cache_clear_freq`` steps).

The master sends a call (``mfc``) to the ranks of its model's mesh, a
transfer to its senders and receivers, a hook to the ranks of the layouts it
touches; the rest goes to every worker. Requests are served one at a time in
arrival order (see :mod:`realhf.system.transport`), and every reply carries
the handler's wall-clock span.
"""

from __future__ import annotations

import collections
import gc
import os
import pickle
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import realhf.impl.dataset  # noqa: F401  (registers datasets)
import realhf.impl.model  # noqa: F401  (registers model families)
import realhf.impl.model.backend  # noqa: F401  (registers backends)
import realhf.impl.model.interface  # noqa: F401  (registers interfaces)
import realhf.impl.model.real_model_factory  # noqa: F401  (registers "real_model")
from realhf.api.core import model_api
from realhf.api.core.config import ModelInterfaceType, ModelName
from realhf.api.core.data_api import PackedDataLoader, SequenceSample, make_dataset
from realhf.api.core.dfg import MFCDef, ParamReallocHook
from realhf.api.core.model_api import MicroBatchSpec
from realhf.api.core.system_api import ExperimentConfig
from realhf.base import constants, cpu_threads, host_memory, logging, seeding, tensor_codec
from realhf.impl.model.comm import global_comm
from realhf.impl.model.comm.local_links import LocalLinks
from realhf.impl.model.comm.realloc_hooks import Replica, run_hook
from realhf.impl.model.parallelism.pipeline_parallel import p2p
from realhf.system.worker_base import FatalError

logger = logging.getLogger("model_worker")


def data_head_ranks(cfg: ExperimentConfig, model_name: ModelName) -> List[int]:
    """Global rank of (last pp stage, tp 0) for each dp rank of ``model_name``, in dp order."""
    layout = cfg.model_layouts[model_name]
    topo = layout.topology
    pp, dp = topo.get_dim("pipe"), topo.get_dim("data")
    return [layout.to_global(topo.get_rank(pipe=pp - 1, data=d, model=0)) for d in range(dp)]


def source_rpc(cfg: ExperimentConfig) -> MFCDef:
    """The first call in graph order that reads dataset keys: its model's data heads load the data."""
    import networkx as nx

    order = list(nx.topological_sort(cfg.graph))
    by_name = {r.name: r for r in cfg.model_rpcs}
    for n in order:
        r = by_name[n]
        if r.is_src:
            return r
    return by_name[order[0]]


def _to_bytes(obj: Any) -> torch.Tensor:
    return tensor_codec.encode(obj)


def _from_bytes(t: torch.Tensor) -> Any:
    """Decode a :func:`_to_bytes` tensor; received buffers live on the NCCL device,
    and are read on the host."""
    return tensor_codec.decode(t)


def cuda_device_index(worker_index: int, device: str) -> Optional[int]:
    """The CUDA device this worker binds, or None when it runs on CPU.

    Scheme: an explicit index (``cuda:3``) wins; otherwise the worker takes
    ``worker_index % torch.cuda.device_count()``, i.e. its local rank on a
    node whose visible devices (after CUDA_VISIBLE_DEVICES) are shared by
    consecutive workers. Binding must happen before any CUDA allocation or
    NCCL communicator creation, else every worker lands on device 0.
    """
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    if n < 1:
        return None
    dev = torch.device(device)
    if dev.index is not None:
        if dev.index >= n:
            raise RuntimeError(f"Model worker {worker_index}: device {device} but only {n} CUDA devices are visible.")
        return dev.index
    return worker_index % n


def bind_cuda_device(worker_index: int, device: str) -> Optional[int]:
    """Make this process's current CUDA device the one :func:`cuda_device_index` picks."""
    idx = cuda_device_index(worker_index, device)
    if idx is not None:
        torch.cuda.set_device(idx)
    return idx


class ModelWorkerCore:
    """One model worker's state and request handlers (transport-agnostic)."""

    def __init__(self, cfg: ExperimentConfig, rank: int, experiment_name: str, trial_name: str):
        self.cfg = cfg
        self.rank = rank
        self.experiment_name = experiment_name
        self.trial_name = trial_name
        self.spec = cfg.model_worker[rank]
        self.models: Dict[ModelName, model_api.Model] = {}
        self.backends: Dict[ModelName, model_api.ModelBackend] = {}
        self.interfaces: Dict[str, model_api.ModelInterface] = {}
        self.store: Dict[Any, SequenceSample] = {}
        self.dataset = None
        self.loader: Optional[PackedDataLoader] = None
        self.head_index, self.n_heads = 0, 1
        self.eval_loaders: Dict[ModelName, Any] = {}
        self.links: Optional[LocalLinks] = None
        self._handlers: Dict[str, Callable[[Any], Any]] = {
            "spec": self._spec, "initialize": self._initialize, "fetch": self._fetch, "transfer": self._transfer,
            "mfc": self._mfc, "hook": self._hook, "evaluate": self._evaluate, "save": self._save,
            "clear": self._clear, "state": self._state, "load_state": self._load_state, "ping": lambda d: "pong",
            "empty_cache": self._empty_cache, "filter": self._filter,
        }

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Create groups and models; torch.distributed must already span all model workers."""
        cfg = self.cfg
        host_memory.keep_freed_memory()
        constants.set_experiment_trial_names(self.experiment_name, self.trial_name)
        global_comm.setup_global_comm(cfg.model_layouts)
        if os.environ.get("REAL_LOCAL_LINKS", "1") != "0":
            self.links = LocalLinks.connect()
            global_comm.set_local_links(self.links)
        seeding.set_random_seed(cfg.seed, f"model_worker{self.rank}")
        for shard in self.spec.shards:
            name = shard.id.model_name
            with constants.model_scope(name):
                args = dict(shard.model.args)
                if shard.model.type_ == "real_model":
                    args.setdefault("instantiate", shard.should_instantiate)
                    args.setdefault("seed", cfg.seed)
                mcfg = type(shard.model)(shard.model.type_, args=args, wrappers=shard.model.wrappers)
                self.models[name] = model_api.make_model(mcfg, name, device=self.spec.device)
                self.backends[name] = model_api.make_backend(shard.backend)
        for rpc in cfg.model_rpcs:
            if rpc.model_name in self.models:
                self.interfaces[rpc.name] = model_api.make_interface(rpc.interface_impl)
        src = source_rpc(cfg)
        heads = data_head_ranks(cfg, src.model_name)
        if self.rank in heads and self.spec.datasets:
            # Every data head reads the whole dataset in the same seeded order and
            # keeps its slice of each global batch, so the batches of a step do not
            # depend on how many dp ranks the first call has.
            self.head_index, self.n_heads = heads.index(self.rank), len(heads)
            tok = self.models[src.model_name].tokenizer or self.spec.tokenizer_name_or_path
            self.dataset = make_dataset(self.spec.datasets[0], cfg.seed, 0, 1, tok,
                                        self.experiment_name, self.trial_name)
            # Each batch is split over the dp ranks of every call: a trailing batch
            # smaller than the largest dp size is skipped (every rank needs an item).
            max_dp = max(cfg.model_layouts[r.model_name].topology.get_dim("data") for r in cfg.model_rpcs)
            self.loader = PackedDataLoader(self.dataset, batch_size=src.n_seqs, shuffle=True, seed=cfg.seed,
                                           min_last_batch=max_dp)
        for shard in self.spec.shards:
            if shard.eval_dataset is not None:
                name = shard.id.model_name
                with constants.model_scope(name):
                    d = constants.data_parallel_rank()
                    n = constants.data_parallel_world_size()
                tok = self.models[name].tokenizer or self.spec.tokenizer_name_or_path
                ds = make_dataset(shard.eval_dataset, cfg.seed, d, n, tok)
                self.eval_loaders[name] = PackedDataLoader(ds, batch_size=max(1, shard.eval_bs // n), shuffle=False)

    def handle(self, name: str, data: Any) -> Any:
        if name not in self._handlers:
            raise KeyError(f"Model worker has no handler {name!r}; known: {sorted(self._handlers)}.")
        return self._handlers[name](data)

    # --------------------------------------------------------------- handlers
    def _spec(self, _: Any) -> Optional[int]:
        # Every head holds the whole dataset; head 0 reports the items of one epoch.
        return None if self.dataset is None or self.head_index != 0 else self.loader.items_per_epoch()

    def _initialize(self, data: Dict[str, Any]) -> None:
        name, ft_spec = data["model_name"], data["ft_spec"]
        if name not in self.models:
            return None
        from realhf.impl.model.backend.inference import InferenceEngine

        with constants.model_scope(name):
            model = self.models[name]
            backend = self.backends[name]
            has_weights = model.module is not None and getattr(model.module, "instantiated", True)
            # An empty replica (filled by reallocation before its calls) still gets its
            # inference wrapper now; a training engine needs the weights to exist.
            if has_weights or (model.module is not None and isinstance(backend, InferenceEngine)):
                self.models[name] = backend.initialize(model, ft_spec)
            else:
                model.ft_spec = ft_spec
            if name in self.eval_loaders:
                for rpc in self.cfg.model_rpcs:
                    if rpc.model_name == name and rpc.is_train and rpc.name in self.interfaces:
                        self.interfaces[rpc.name].prepare_evaluation(self.models[name], self.eval_loaders[name])
        # Everything built so far (modules, tokenizer, datasets, imported libraries) lives for the
        # whole run: keep it out of the collector's full passes, which otherwise walk it all
        # again whenever the steps' short-lived objects trigger one (a 0.36 s pause was measured).
        gc.freeze()
        return None

    def _fetch(self, data: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        """``data["skip"]``: ids left out of the batch (a refill must not draw a prompt of its step
        twice); every head drops the same ones before taking its slice."""
        if self.loader is None:
            return None
        epoch = self.loader.epoch
        batch = next(iter(self.loader), None)
        if batch is None:  # the previous call ended the epoch
            batch = next(iter(self.loader))
        skip = (data or {}).get("skip") or ()
        items = [it for it in batch.unpack() if it.ids[0] not in skip]
        k, extra = divmod(len(items), self.n_heads)
        start = self.head_index * k + min(self.head_index, extra)
        mine = items[start:start + k + (1 if self.head_index < extra else 0)]
        for it in mine:
            self.store[it.ids[0]] = it
        meta = SequenceSample.gather(mine).meta() if mine else None
        return {"meta": meta, "epoch": epoch, "epoch_done": self.loader.epoch != epoch}

    def _filter(self, data: Dict[str, Any]) -> Optional[Dict[Any, bool]]:
        """``{id: keep}`` of the input filter ``data["filter"]`` on this rank's ids ``data["ids"][rank]``."""
        ids = data["ids"].get(self.rank)
        if not ids:
            return None
        flt = data["filter"]
        sample = SequenceSample.gather([self.store[i].select(flt.keys) for i in ids])
        return dict(zip(ids, model_api.apply_item_filter(flt.name, sample, flt.args)))

    def _transfer(self, plan: Sequence[Tuple[int, Sequence[int], List[Any], List[str]]]) -> None:
        """``plan``: (src rank, dst ranks, ids, keys); this rank sends or receives its part."""
        # One message per (sender, receiver) pair, whatever the number of key groups.
        outgoing: Dict[int, List[SequenceSample]] = collections.defaultdict(list)
        srcs = set()
        for src, dsts, ids, keys in plan:
            if src == self.rank:
                part = SequenceSample.gather([self.store[i].select(keys) for i in ids])
                for d in dsts:
                    if d != self.rank:
                        outgoing[d].append(part)
            elif self.rank in dsts:
                srcs.add(src)
        if not outgoing and not srcs:
            return None
        sends = [(_to_bytes(parts), d) for d, parts in sorted(outgoing.items())]
        if self.links is not None and self.links.reaches([d for _, d in sends] + sorted(srcs)):
            received = self.links.exchange(sends, [(src, None) for src in sorted(srcs)])
        else:
            received = p2p.batch_send_recv(sends, sorted(srcs))
        for t in received:
            for part in _from_bytes(t):
                for it in part.unpack():
                    self._put(it)
        return None

    def _put(self, item: SequenceSample) -> None:
        i = item.ids[0]
        if i in self.store:
            missing = [k for k in item.keys if k not in self.store[i].keys]
            if missing:
                self.store[i].update_(item.select(missing))
        else:
            self.store[i] = item

    def _input(self, rpc: MFCDef, ids: Sequence[Any]) -> SequenceSample:
        missing = [(i, k) for i in ids for k in rpc.input_keys if i not in self.store or k not in self.store[i].keys]
        if missing:
            raise RuntimeError(f"MFC {rpc.name} on rank {self.rank}: items/keys not here: {missing[:5]}.")
        keys = list(rpc.input_keys)
        sample = SequenceSample.gather([self.store[i].select(keys) for i in ids])
        if rpc.input_key_remap:
            sample.remap_keys_(rpc.input_key_remap)
        return sample

    def _mfc(self, data: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        rpc = next(r for r in self.cfg.model_rpcs if r.name == data["rpc"])
        name = rpc.model_name
        if name not in self.models:
            return None
        with constants.model_scope(name), cpu_threads.using(rpc.cpu_threads):
            d = constants.data_parallel_rank()
            is_head = constants.is_last_pipe_stage() and constants.tensor_parallel_rank() == 0
            last_stage = constants.is_last_pipe_stage()
            sample = self._input(rpc, data["ids"][d])
            model, iface = self.models[name], self.interfaces[rpc.name]
            mb_spec = MicroBatchSpec(n_mbs=rpc.n_mbs or 1, max_tokens_per_mb=rpc.max_tokens_per_mb)
            kind = rpc.interface_type
            if kind == ModelInterfaceType.TRAIN_STEP:
                if hasattr(model.module, "schedule_step"):  # the LR schedule advances once per train call
                    model.module.schedule_step = model.version.global_step
                out = iface.train_step(model, sample, mb_spec)
                model.inc_version()
            elif kind == ModelInterfaceType.INFERENCE:
                out = iface.inference(model, sample, mb_spec)
            elif kind == ModelInterfaceType.GENERATE:
                out = iface.generate(model, sample, mb_spec)
            else:
                out = iface.evaluate(model, self.eval_loaders.get(name))
        meta = None
        if isinstance(out, SequenceSample):
            if rpc.output_key_remap:
                out.remap_keys_(rpc.output_key_remap)
            if last_stage:
                for it in out.unpack():
                    self._put(it)
            meta = out.meta()
            out = None
        if not is_head:
            return None
        return {"dp_rank": d, "meta": meta, "stats": out}

    def _replicas(self) -> Dict[ModelName, Replica]:
        trainable = {r.model_name for r in self.cfg.model_rpcs if r.is_train}
        reps = {}
        for name, layout in self.cfg.model_layouts.items():
            m = self.models.get(name)
            module = None if m is None else m.module
            module = getattr(module, "module", module)  # engines wrap the ReaLModel
            config = module.config if module is not None else self._config_of(name)
            reps[name] = Replica(name, config, layout, module, trainable=name in trainable)
        return reps

    def _config_of(self, name: ModelName):
        """Config of a replica this rank does not host (any host has it; all share one config per role)."""
        for other, m in self.models.items():
            if other.role == name.role and m.module is not None:
                return getattr(m.module, "module", m.module).config
        return None

    def _hook(self, data: Dict[str, Any]) -> Dict[str, Any]:
        hook, call = data["hook"], data["call"]
        share = isinstance(hook, ParamReallocHook) and hook.source is not None and self._lent(call, hook.source)
        return run_hook(hook, call, self._replicas(), share=share, links=self.links)

    def _lent(self, call: ModelName, source: ModelName) -> bool:
        """Whether every call on replica ``call`` takes ``source``'s weights first and hands
        them back after (the layout of a generation or inference call): then the replica
        never outlives the weights it was given, and may share the source's buffer."""
        rpcs = [r for r in self.cfg.model_rpcs if r.model_name == call]
        return bool(rpcs) and all(
            any(isinstance(h, ParamReallocHook) and h.source == source for h in r.pre_hooks)
            and any(isinstance(h, ParamReallocHook) and h.target == source and h.eta == 1.0 for h in r.post_hooks)
            for r in rpcs)

    def _evaluate(self, data: Dict[str, Any]) -> Optional[Dict[str, float]]:
        name = data["model_name"]
        if name not in self.models or name not in self.eval_loaders:
            return None
        with constants.model_scope(name):
            stats = self.interfaces[data["rpc"]].evaluate(self.models[name], self.eval_loaders[name])
            head = constants.is_last_pipe_stage() and constants.tensor_parallel_rank() == 0 \
                and constants.data_parallel_rank() == 0
        return stats if head else None

    def _save(self, data: Dict[str, Any]) -> None:
        name = data["model_name"]
        if name not in self.models:
            return None
        with constants.model_scope(name):
            if not self._params_finite([name], constants.parallelism_group()):
                raise FatalError(f"model {name.role}: parameters contain NaN or inf; checkpoint "
                                 f"{data['save_dir']} was not written")
            self.interfaces[data["rpc"]].save(self.models[name], data["save_dir"])
        return None

    def _params_finite(self, names: Sequence[ModelName], group: Any) -> bool:
        """Whether the parameters of ``names`` on every rank of ``group`` are finite (collective)."""
        ok = True
        for name in names:
            m = self.models[name].module
            net = getattr(m, "module", m)
            if net is not None and hasattr(net, "parameters"):
                ok = ok and all(bool(torch.isfinite(p).all()) for p in net.parameters() if not p.is_meta)
        if not dist.is_initialized():
            return ok
        dev = self.spec.device if dist.get_backend(group) == "nccl" else "cpu"
        flag = torch.tensor([0.0 if ok else 1.0], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item() == 0)

    def _empty_cache(self, _: Any) -> bool:
        """Return cached CUDA blocks to the driver (fragmentation builds up over steps); False on CPU."""
        if self.spec.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
            return True
        return False

    def _clear(self, ids: Sequence[Any]) -> None:
        for i in ids:
            self.store.pop(i, None)
        return None

    # --------------------------------------------------------------- recovery
    def _state(self, data: Dict[str, Any]) -> None:
        """Save this rank's trainable engine states and loader position under ``data['dir']``."""
        trainable = [n for n, m in self.models.items() if hasattr(m.module, "optim")]
        if not self._params_finite(trainable, None):
            raise FatalError(f"parameters of {sorted(n.role for n in trainable) or 'a trained model'} contain "
                             f"NaN or inf; the recover state {data['dir']} was not written")
        out = os.path.join(data["dir"], f"model_worker{self.rank}")
        os.makedirs(out, exist_ok=True)
        state: Dict[str, Any] = {"rng": seeding.get_rng_state()}
        if self.loader is not None:
            state["loader"] = self.loader.state_dict()
        for name, m in self.models.items():
            eng = m.module
            if hasattr(eng, "state_dict") and hasattr(eng, "optim"):
                state[f"engine/{name}"] = eng.state_dict()
                state[f"params/{name}"] = eng.module.flat_param.detach().clone()
                state[f"version/{name}"] = (m.version.epoch, m.version.epoch_step, m.version.global_step)
        for rpc, iface in self.interfaces.items():
            kept = iface.state_dict()
            if kept:
                state[f"interface/{rpc}"] = kept
        tmp = os.path.join(out, f"state.pt.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(out, "state.pt"))
        return None

    def _load_state(self, data: Dict[str, Any]) -> None:
        path = os.path.join(data["dir"], f"model_worker{self.rank}", "state.pt")
        state = torch.load(path, weights_only=False)
        if self.loader is not None and "loader" in state:
            self.loader.load_state_dict(state["loader"])
        seeding.set_rng_state(state["rng"])
        for name, m in self.models.items():
            if f"engine/{name}" in state:
                with torch.no_grad():
                    m.module.module.flat_param.copy_(state[f"params/{name}"])
                m.module.load_state_dict(state[f"engine/{name}"])
                m.version.epoch, m.version.epoch_step, m.version.global_step = state[f"version/{name}"]
        for rpc, iface in self.interfaces.items():
            iface.load_state_dict(state.get(f"interface/{rpc}", {}))
        return None


def serve_pipe(core: ModelWorkerCore, conn) -> None:
    """Serve requests arriving on a multiprocessing connection until ``exit`` (tests, in-process runs)."""
    import traceback

    while True:
        name, data = conn.recv()
        if name == "exit":
            conn.send(("ok", None))
            return
        try:
            start = time.time()
            value = core.handle(name, data)
            conn.send(("ok", value, (start, time.time())))
        except Exception:  # reported to the master with the traceback
            conn.send(("error", traceback.format_exc()))


# ---------------------------------------------------------------------------
# The model worker process (launched by realhf.apps.remote, type "model_worker")
# ---------------------------------------------------------------------------
from realhf.system.worker_base import PollResult, Worker, WorkerExit, register_worker  # noqa: E402


def rendezvous_key(experiment: str, trial: str) -> str:
    return f"{constants.get_user()}/{experiment}/{trial}/distributed/master"


class ModelWorker(Worker):
    """Serves :class:`ModelWorkerCore` handlers over a ZeroMQ :class:`WorkerStream`.

    Config: ``{"experiment_config": path to the pickled ExperimentConfig}``.
    Rank 0 publishes the torch.distributed rendezvous address through
    name_resolve; every worker joins the gloo (CPU) or NCCL (GPU) world.
    """

    def _configure(self, config: Dict[str, Any]) -> None:
        from realhf.base import name_resolve, network
        from realhf.system.request_reply_stream import WorkerStream

        with open(config["experiment_config"], "rb") as f:
            cfg: ExperimentConfig = pickle.load(f)
        rank, world = self.worker_index, cfg.n_model_workers
        key = rendezvous_key(self.experiment_name, self.trial_name)
        if rank == 0:
            addr = f"{network.gethostip()}:{network.find_free_port()}"
            name_resolve.add(key, addr, replace=True)
        else:
            addr = name_resolve.wait(key, timeout=300)
        torch.set_num_threads(int(os.environ.get("REAL_WORKER_THREADS", "1")))
        backend = "nccl" if cfg.model_worker[rank].device.startswith("cuda") else "gloo"
        bind_cuda_device(rank, cfg.model_worker[rank].device)
        dist.init_process_group(backend, init_method=f"tcp://{addr}", rank=rank, world_size=world)
        # Data transfers batch p2p ops on the world group between only some ranks.
        global_comm.warm_up_group(None)
        self.core = ModelWorkerCore(cfg, rank, self.experiment_name, self.trial_name)
        self.core.setup()
        self.stream = WorkerStream(self.experiment_name, self.trial_name, self.name)

    def _poll(self) -> PollResult:
        req = self.stream.poll(block=True, timeout=0.05)
        if req is None:
            return PollResult()
        if req.handle_name == "exit":
            self.stream.reply(req, None)
            raise WorkerExit()
        try:
            start = time.time()
            value = self.core.handle(req.handle_name, req.data)
            self.stream.reply(req, value, span=(start, time.time()))
        except Exception as e:
            self.stream.reply(req, exception=e)
            raise
        return PollResult(sample_count=1, batch_count=1)

    def _exit_hook(self, status) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
        if dist.is_initialized():
            dist.destroy_process_group()


register_worker("model_worker", ModelWorker)
