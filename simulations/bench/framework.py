"""``fedpriv bench framework|scale|deployment|peer``: what the federation machinery costs around training.

Every measured run is a fresh child process (``python -m simulations.bench_framework KIND SPEC OUT``)
so imports, Ray start-up and shutdown count, and the parent samples the memory of the child's whole
process tree (Ray's GCS, raylet and workers included) from /proc while it runs. Runs of the variants
being compared alternate within one invocation (A, B, A, B, ...), so a burst of load from other
work on the machine hits every variant alike; each table prints the load average seen.

- ``framework``: wall time of ``fedpriv simulate``'s code path (Flower Simulation Engine, startup
  to exit) / the pure compute time of the same ``client.dp_training.train_round`` calls in a plain
  loop, per number of clients, with where the simulation's time goes.
- ``scale``: many virtual clients, few per round: peak memory and per-round time at two populations.
- ``deployment``: round latency of ``fedpriv federation`` (SuperLink + N SuperNodes over TLS on
  127.0.0.1), plain vs SecAgg+.
- ``peer``: Flower's published Opacus example workflow (``examples/opacus``: a legacy
  ``NumPyClient`` built by ``client_fn`` per message, a fresh ``PrivacyEngine`` per round, a
  ``DataLoader`` of dict batches, federated evaluation) vs this project's ClientApp, same model,
  data, clients, rounds and Simulation Engine.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from simulations.bench import bench_app

TRACE_FILE = "bench-trace.jsonl"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- process-tree memory
def _tree_pids(pid: int) -> list[int]:
    from simulations.processes import descendants

    return [pid, *descendants(pid)]


def _memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process; PSS splits shared pages (torch's libraries) among their users."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree_pids(self.pid)
            sizes = [_memory_of(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(s[0] for s in sizes))
            self.peak_pss = max(self.peak_pss, sum(s[1] for s in sizes))
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(self.interval)


# ----------------------------------------------------------------------------- running one child
@dataclass
class ChildResult:
    """What one measured child process reported, plus what the parent saw from outside."""

    kind: str
    label: str
    wall_s: float
    data: dict[str, Any]
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    load: float = 0.0


def run_child(kind: str, spec: dict[str, Any], label: str, *, nice: int = 0, timeout: float = 3600) -> ChildResult:
    """Run ``KIND`` in a fresh interpreter; its wall time counts from launch to exit."""
    from common.errors import UserInputError
    from simulations.processes import venv_env

    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, "-m", "simulations.bench_framework", kind, str(spec_path), str(out_path)]
        env = venv_env({"FEDPRIV_BENCH_LAUNCH": repr(time.time()), "RAY_DEDUP_LOGS": "0"})
        log_path = Path(tmp) / "child.log"
        started = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=(lambda: os.nice(nice)) if nice else None, start_new_session=True)
            with TreeMemory(proc.pid) as memory:
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _kill_tree(proc.pid)
                    raise UserInputError(f"bench {kind} ({label}) did not finish within {timeout:.0f} s") from None
        wall = time.perf_counter() - started
        _kill_tree(proc.pid)  # Ray may leave daemons behind its driver
        if code != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"bench {kind} ({label}) failed with exit code {code}: {' | '.join(tail)}")
        return ChildResult(kind, label, wall, json.loads(out_path.read_text()), memory.peak_rss, memory.peak_pss,
                           memory.peak_procs, os.getloadavg()[0])


def _kill_tree(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session: only its tree is hit
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- children (run in the fresh process)
def _proc_start_time() -> float:
    """Epoch seconds at which this process started (Linux /proc), to time Ray actor start-up."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def trace_mod(msg, ctxt, call_next):
    """Flower mod: log when each training message entered and left the ClientApp, and the process' age."""
    entered = time.time()
    reply = call_next(msg, ctxt)
    try:
        run_dir = Path(str(msg.content.config_records["config"]["run-dir"]))
        with open(run_dir / TRACE_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), "in": entered, "out": time.time(),
                                "proc_start": _proc_start_time()}) + "\n")
    except (KeyError, OSError):
        pass
    return reply


def traced_project_app(policy=None):  # noqa: ANN001, ANN201 - an OwnerPolicy, a ClientApp
    """The project's ClientApp (same handler, policy and mods) with :func:`trace_mod` outermost."""
    return (_PROJECT_APP_BUILDER or _project_app_builder())(policy, outer_mods=(trace_mod,))


def _project_app_builder():  # noqa: ANN202
    from client.app import build_client_app

    return build_client_app


_PROJECT_APP_BUILDER = None  # client.app.build_client_app, kept before _child_sim replaces it


class _Timeline:
    """RoundObserver that timestamps rounds in the driver process."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []

    def round_started(self, server_round: int, num_rounds: int, num_clients: int) -> None:
        self.rounds.append({"round": server_round, "start": time.time(), "clients": num_clients})

    def client_replied(self, server_round: int, replied: int, expected: int) -> None:
        pass

    def round_finished(self, server_round: int, summary: dict) -> None:
        self.rounds[-1]["end"] = time.time()


def _child_sim(spec: dict[str, Any]) -> dict[str, Any]:
    marks = {"main": time.time()}
    import client.app
    from common.config import RunConfig
    from simulations.simulate import simulate

    marks["imported"] = time.time()
    cfg = RunConfig.from_mapping(spec["config"])
    global _PROJECT_APP_BUILDER
    _PROJECT_APP_BUILDER = _project_app_builder()
    client.app.build_client_app = traced_project_app  # simulate() looks the builder up at call time
    timeline = _Timeline()
    marks["simulate"] = time.time()
    report, run_dir = simulate(cfg, timeline)
    marks["returned"] = time.time()
    trace = [json.loads(line) for line in (run_dir / TRACE_FILE).read_text().splitlines()]
    return {"marks": marks, "rounds": timeline.rounds, "trace": trace,
            "report_seconds": [r["seconds"] for r in report.rounds]}


def _child_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """The same local training as the simulation (same clients, rounds, config), in one plain loop."""
    marks = {"main": time.time()}
    import random

    import torch

    from client.dp_training import train_round
    from client.local_data import local_data
    from common.config import RunConfig
    from common.models import model_from_config

    marks["imported"] = time.time()
    cfg = RunConfig.from_mapping(spec["config"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    clients = [local_data(cfg, {"partition-id": i, "num-partitions": cfg.num_clients}) for i in range(cfg.num_clients)]
    ref = clients[0]
    global_model = model_from_config(cfg, ref.input_shape, ref.num_classes, seed=cfg.seed)
    histories: dict[int, list] = {i: [] for i in range(cfg.num_clients)}
    per_round = max(int(cfg.num_clients * cfg.fraction_train), cfg.min_clients)
    rng = random.Random(cfg.seed)
    marks["data"] = time.time()
    compute = 0.0
    for _ in range(cfg.num_rounds):
        states = []
        for i in rng.sample(range(cfg.num_clients), per_round):
            model = model_from_config(cfg, ref.input_shape, ref.num_classes)
            model.load_state_dict(global_model.state_dict())
            start = time.perf_counter()
            result = train_round(model, clients[i].x, clients[i].y, cfg, histories[i])
            compute += time.perf_counter() - start
            histories[i].append(result.mechanism)
            states.append(result.state_dict)
        with torch.no_grad():  # FedAvg with unit weights, as the project's replies ask for
            global_model.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
                                          for k in states[0]})
    marks["done"] = time.time()
    return {"marks": marks, "compute_s": compute, "threads": torch.get_num_threads()}


def _child_peer(spec: dict[str, Any]) -> dict[str, Any]:
    marks = {"main": time.time()}
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from common.config import RunConfig

    marks["imported"] = time.time()
    cfg = RunConfig.from_mapping(spec["config"])
    os.environ["FEDPRIV_PEER_CONFIG"] = json.dumps(cfg.to_dict(kebab=True))  # inherited by Ray's workers
    timeline = _PeerTimeline()
    backend_config = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
                      "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}}
    marks["simulate"] = time.time()
    run_simulation(server_app=peer_server_app(cfg, timeline), client_app=peer_client_app(),
                   num_supernodes=cfg.num_clients, backend_config=backend_config)
    marks["returned"] = time.time()
    return {"marks": marks, "rounds": timeline.rounds}


CHILDREN = {"sim": _child_sim, "loop": _child_loop, "peer": _child_peer}


def child_main(argv: list[str]) -> None:
    """Entry point of a measured child: ``KIND SPEC_JSON OUT_JSON``."""
    kind, spec_path, out_path = argv
    result = CHILDREN[kind](json.loads(Path(spec_path).read_text()))
    result["launch"] = float(os.environ.get("FEDPRIV_BENCH_LAUNCH", "nan"))
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- peer: Flower's Opacus example
class _DictDataset:
    """Records as dicts with a per-item transform, like the example's ``with_transform`` HF dataset."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        import torch

        return {"image": torch.tensor(self.x[i]), "label": int(self.y[i])}


def _peer_load_data(partition_id: int, num_partitions: int):
    """The example's ``load_data``: the partition, split 80/20 per call, dict-batch loaders.

    The example trains on 80% and evaluates on 20% of its partition; here the loader trains on the
    whole partition so both workflows train on exactly the same records (the same work per round).
    """
    import numpy as np
    from torch.utils.data import DataLoader

    from client.local_data import local_data
    from common.config import RunConfig

    cfg = RunConfig.from_mapping(json.loads(os.environ["FEDPRIV_PEER_CONFIG"]))
    data = local_data(cfg, {"partition-id": partition_id, "num-partitions": num_partitions})
    order = np.random.default_rng(42).permutation(len(data.x))
    test = order[: max(1, len(order) // 5)]
    train_loader = DataLoader(_DictDataset(data.x, data.y), batch_size=cfg.batch_size, shuffle=True)
    test_loader = DataLoader(_DictDataset(data.x[test], data.y[test]), batch_size=cfg.batch_size)
    return cfg, data, train_loader, test_loader


def _peer_client_fn(context):
    """The example's ``client_fn``: a new NumPyClient (fresh model, fresh loaders) for every message."""
    import torch
    from flwr.client import NumPyClient
    from opacus import PrivacyEngine

    from common.models import model_from_config

    cfg, data, train_loader, test_loader = _peer_load_data(int(context.node_config["partition-id"]),
                                                           int(context.node_config["num-partitions"]))

    def set_weights(net, parameters) -> None:
        net.load_state_dict({k: torch.tensor(v) for k, v in zip(net.state_dict().keys(), parameters)}, strict=True)

    class FlowerClient(NumPyClient):
        def __init__(self) -> None:
            self.model = model_from_config(cfg, data.input_shape, data.num_classes)

        def fit(self, parameters, config):
            model = self.model
            set_weights(model, parameters)
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
            privacy_engine = PrivacyEngine(secure_mode=False)
            model, optimizer, loader = privacy_engine.make_private(
                module=model, optimizer=optimizer, data_loader=train_loader,
                noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm)
            criterion = torch.nn.CrossEntropyLoss()
            model.train()
            for _ in range(cfg.local_epochs):
                for batch in loader:
                    optimizer.zero_grad()
                    criterion(model(batch["image"]), batch["label"]).backward()
                    optimizer.step()
            epsilon = privacy_engine.get_epsilon(delta=cfg.delta)  # this round only, as in the example
            return [v.cpu().numpy() for v in self.model.state_dict().values()], len(train_loader.dataset), {
                "epsilon": float(epsilon)}

        def evaluate(self, parameters, config):
            set_weights(self.model, parameters)
            criterion = torch.nn.CrossEntropyLoss()
            correct, loss = 0, 0.0
            with torch.no_grad():
                for batch in test_loader:
                    outputs = self.model(batch["image"])
                    loss += criterion(outputs, batch["label"]).item()
                    correct += (outputs.argmax(1) == batch["label"]).sum().item()
            return loss, len(test_loader.dataset), {"accuracy": correct / len(test_loader.dataset)}

    torch.set_num_threads(max(1, int(cfg.client_cpus)))  # as the project's ClientApp does in simulation
    return FlowerClient().to_client()


def peer_client_app():
    from flwr.client import ClientApp

    return ClientApp(client_fn=_peer_client_fn)


class _PeerTimeline:
    """Round start/fit-end/end timestamps of the legacy server loop."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []


def peer_server_app(cfg, timeline: _PeerTimeline):
    """The example's ``server_fn``: legacy FedAvg (fit and evaluate on every client), initial weights given."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    from common.datasets import load_dataset
    from common.models import model_from_config

    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples)
    initial = [v.numpy() for v in model_from_config(cfg, data.input_shape, data.num_classes,
                                                     seed=cfg.seed).state_dict().values()]

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            timeline.rounds.append({"round": server_round, "start": time.time()})
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            timeline.rounds[-1]["fit_end"] = time.time()
            return super().aggregate_fit(server_round, results, failures)

        def aggregate_evaluate(self, server_round, results, failures):
            timeline.rounds[-1]["end"] = time.time()
            return super().aggregate_evaluate(server_round, results, failures)

    def weighted_average(metrics):
        return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / sum(n for n, _ in metrics)}

    fraction = cfg.fraction_train

    def server_fn(context):
        strategy = TimedFedAvg(fraction_fit=fraction, fraction_evaluate=fraction, min_fit_clients=cfg.min_clients,
                               min_evaluate_clients=cfg.min_clients, min_available_clients=cfg.num_clients,
                               evaluate_metrics_aggregation_fn=weighted_average,
                               initial_parameters=ndarrays_to_parameters(initial))
        return ServerAppComponents(config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)

    return ServerApp(server_fn=server_fn)


# ----------------------------------------------------------------------------- analysis helpers
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def sim_breakdown(res: ChildResult) -> dict[str, float]:
    """Where a simulation child's wall time went (seconds), from its marks, rounds and client trace."""
    d = res.data
    marks, rounds, trace = d["marks"], d["rounds"], d["trace"]
    launch = d["launch"]
    first = rounds[0]
    r1_trace = [t for t in trace if first["start"] <= t["in"] <= first["end"]]
    actor_ready = min((t["in"] for t in r1_trace), default=first["start"])
    later = [r["end"] - r["start"] for r in rounds[1:]]
    handler = [t["out"] - t["in"] for t in trace]
    end_last = rounds[-1]["end"]
    return {
        "interpreter+imports": marks["imported"] - launch,
        "setup to round 1": first["start"] - marks["simulate"],
        "round 1: until first client runs": actor_ready - first["start"],
        "round 1: rest": first["end"] - actor_ready,
        "rounds 2..R (each, median)": _median(later),
        "client handler (each call, median)": _median(handler),
        "final write + shutdown": marks["returned"] - end_last,
        "interpreter exit": res.wall_s - (marks["returned"] - launch),
    }


def _executor_note(base: dict[str, Any]) -> str:
    """How the simulation ran its clients, for table footers."""
    cpus = base["client_cpus"]
    if base["simulation_backend"] == "ray":
        return f"Ray actors of {cpus:g} CPU(s) each on {os.cpu_count()} CPUs, one torch thread per client CPU"
    from simulations.inprocess_backend import worker_count

    workers = worker_count(cpus)
    where = "a thread of the driver" if workers == 1 else f"{workers} worker processes forked from the driver"
    return (f"in-process backend, clients run in {where} ({cpus:g} CPU(s) per client on {os.cpu_count()} CPUs), "
            "one torch thread per client CPU")


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _sim_config(base: dict[str, Any], run_dir: Path, **overrides: Any) -> dict[str, Any]:
    from common.config import RunConfig

    cfg = RunConfig.from_mapping({**base, **overrides, "run_dir": str(run_dir)})
    cfg.validate()
    return cfg.to_dict()


def _load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


def _check_positive(**values: float) -> None:
    from common.errors import UserInputError

    for name, value in values.items():
        if value < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")


def _client_list(clients: list[int]) -> list[int]:
    from common.errors import UserInputError

    if not clients or any(c < 2 for c in clients):
        raise UserInputError(f"--clients needs values >= 2 (got {clients})")
    return clients


# ----------------------------------------------------------------------------- framework
@dataclass
class FrameworkRow:
    clients: int
    sims: list[ChildResult] = field(default_factory=list)
    loops: list[ChildResult] = field(default_factory=list)

    def ratio(self) -> float:
        return _median([s.wall_s for s in self.sims]) / _median([l.data["compute_s"] for l in self.loops])


def measure_framework(clients: list[int], base: dict[str, Any], repeats: int, nice: int, work: Path,
                      loop_threads: int, on_progress=lambda text: None) -> list[FrameworkRow]:
    rows = [FrameworkRow(n) for n in clients]
    for rep in range(repeats):
        for row in rows:
            for kind in ("sim", "loop") if rep % 2 == 0 else ("loop", "sim"):
                on_progress(f"{kind}, {row.clients} clients, repeat {rep + 1}/{repeats}")
                cfg = _sim_config(base, work / f"{kind}-{row.clients}-{rep}", num_clients=row.clients)
                spec = {"config": cfg, "threads": loop_threads}
                res = run_child(kind, spec, f"{row.clients} clients", nice=nice)
                (row.sims if kind == "sim" else row.loops).append(res)
    return rows


def framework_tables(rows: list[FrameworkRow], base: dict[str, Any]):
    from rich.table import Table

    ratio = Table(title=f"Framework overhead: {base['dataset']}, {base['model']}, {base['num_rounds']} rounds, "
                        f"{base['local_epochs']} local epochs, every client every round. ratio = simulation wall "
                        "time (process launch to exit) / pure train_round compute of the same training in a plain loop")
    for col in ("clients", "samples/client", "simulation wall s", "loop compute s", "loop process s", "ratio",
                "sim peak PSS"):
        ratio.add_column(col, justify="right")
    for row in rows:
        sim_wall = _median([s.wall_s for s in row.sims])
        per_client = base["_train_size"] / row.clients
        ratio.add_row(str(row.clients), f"{per_client:.0f}", f"{sim_wall:.1f}",
                      f"{_median([l.data['compute_s'] for l in row.loops]):.1f}",
                      f"{_median([l.wall_s for l in row.loops]):.1f}", f"{row.ratio():.2f}",
                      _fmt_bytes(max(s.peak_pss for s in row.sims)))
    parts = Table(title="Where the simulation's wall time goes (seconds, median over repeats)")
    parts.add_column("phase")
    for row in rows:
        parts.add_column(f"{row.clients} clients", justify="right")
    breakdowns = [[sim_breakdown(s) for s in row.sims] for row in rows]
    for key in breakdowns[0][0]:
        parts.add_row(key, *[f"{_median([b[key] for b in bs]):.2f}" for bs in breakdowns])
    parts.add_row("[bold]total wall[/]", *[f"{_median([s.wall_s for s in row.sims]):.2f}" for row in rows])
    return ratio, parts


@bench_app.command("framework")
def framework(
    clients: Annotated[Optional[list[int]], typer.Option("--clients", help="Numbers of clients (repeat the option).")] = None,
    num_rounds: Annotated[int, typer.Option("--num-rounds")] = 3,
    local_epochs: Annotated[int, typer.Option("--local-epochs")] = 2,
    dataset: Annotated[str, typer.Option("--dataset", help="digits, mnist1d or npz:PATH.")] = "mnist1d",
    mnist1d_samples: Annotated[int, typer.Option("--mnist1d-samples")] = 20_000,
    model: Annotated[str, typer.Option("--model")] = "cnn",
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each variant, alternating.")] = 1,
    loop_threads: Annotated[int, typer.Option("--loop-threads", help="Torch threads of the plain loop, as each simulated client uses (--client-cpus 1); 0: torch's default.")] = 1,
    nice: Annotated[int, typer.Option("--nice", help="Extra niceness of the measured processes (they inherit this one's).")] = 0,
    backend: Annotated[str, typer.Option("--backend", help="Simulation backend: in-process or ray.")] = "in-process",
) -> None:
    """Simulation wall time vs the same local training in a plain loop, for several client counts.

    Example: fedpriv bench framework --clients 10 --clients 50 --clients 200
    """
    from simulations.cli import guarded

    guarded(_framework)(clients or [10, 50, 200], num_rounds, local_epochs, dataset, mnist1d_samples, model,
                        repeats, loop_threads, nice, backend)


def _base_config(**values: Any) -> dict[str, Any]:
    from common.config import RunConfig
    from common.datasets import load_dataset

    cfg = RunConfig.from_mapping(values)
    cfg.validate()
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples)
    return {**cfg.to_dict(), "_train_size": len(data.x_train)}


def _strip(base: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in base.items() if not k.startswith("_")}


def _framework(clients, num_rounds, local_epochs, dataset, mnist1d_samples, model, repeats, loop_threads, nice,
               backend="in-process"):
    from simulations.console import console

    _check_positive(num_rounds=num_rounds, local_epochs=local_epochs, repeats=repeats)
    clients = _client_list(clients)
    base = _base_config(dataset=dataset, mnist1d_samples=mnist1d_samples, model=model, num_rounds=num_rounds,
                        local_epochs=local_epochs, min_clients=2, simulation_backend=backend)
    load_before = _load_note()
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-framework-") as tmp, console.status("measuring") as status:
        rows = measure_framework(clients, _strip(base), repeats, nice, Path(tmp), loop_threads,
                                 lambda text: status.update(f"measuring: {text}"))
    for table in framework_tables(rows, base):
        console.print(table)
    console.print(f"plain loop: one process, {rows[0].loops[0].data['threads']} torch thread(s), clients in turn; "
                  f"simulation: {_executor_note(base)}")
    console.print(f"load: {load_before} before, {_load_note()} after; measured processes at nice {min(19, os.nice(0) + nice)}")


# ----------------------------------------------------------------------------- scale
def _per_round(res: ChildResult) -> list[float]:
    return [r["end"] - r["start"] for r in res.data["rounds"]]


@bench_app.command("scale")
def scale(
    clients: Annotated[int, typer.Option("--clients", help="Virtual clients in the large run.")] = 1000,
    small: Annotated[int, typer.Option("--small", help="Virtual clients in the comparison run.")] = 100,
    per_round: Annotated[int, typer.Option("--per-round", help="Clients sampled per round, in both runs.")] = 10,
    num_rounds: Annotated[int, typer.Option("--num-rounds")] = 4,
    mnist1d_samples: Annotated[int, typer.Option("--mnist1d-samples", help="MNIST-1D records (spread over the clients).")] = 20_000,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each size, alternating.")] = 1,
    nice: Annotated[int, typer.Option("--nice", help="Extra niceness of the measured processes (they inherit this one's).")] = 0,
) -> None:
    """Many virtual clients, few per round: peak memory and whether per-round time grows with the population.

    Example: fedpriv bench scale --clients 1000 --small 100 --per-round 10
    """
    from simulations.cli import guarded

    guarded(_scale)(clients, small, per_round, num_rounds, mnist1d_samples, repeats, nice)


def scale_config(num_clients: int, per_round: int, num_rounds: int, mnist1d_samples: int) -> dict[str, Any]:
    """MNIST-1D CNN with DP, ``per_round`` of ``num_clients`` sampled each round (fraction-train)."""
    return _strip(_base_config(dataset="mnist1d", mnist1d_samples=mnist1d_samples, num_rounds=num_rounds,
                               num_clients=num_clients, fraction_train=per_round / num_clients, min_clients=per_round))


def _scale(clients, small, per_round, num_rounds, mnist1d_samples, repeats, nice):
    from common.errors import UserInputError
    from simulations.console import console

    _check_positive(num_rounds=num_rounds, repeats=repeats, per_round=per_round)
    if num_rounds < 2:
        raise UserInputError("--num-rounds must be >= 2 (round 1 includes start-up and is shown apart)")
    if not 2 <= per_round <= small <= clients:
        raise UserInputError(f"need 2 <= --per-round ({per_round}) <= --small ({small}) <= --clients ({clients})")
    load_before = _load_note()
    results: dict[int, list[ChildResult]] = {small: [], clients: []}
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-scale-") as tmp, console.status("measuring") as status:
        for rep in range(repeats):
            for n in (small, clients) if rep % 2 == 0 else (clients, small):
                status.update(f"measuring: {n} clients, repeat {rep + 1}/{repeats}")
                cfg = _sim_config(scale_config(n, per_round, num_rounds, mnist1d_samples), Path(tmp) / f"sim-{n}-{rep}")
                results[n].append(run_child("sim", {"config": cfg}, f"{n} clients", nice=nice))
    table, growth = scale_table(results, per_round=per_round, num_rounds=num_rounds, mnist1d_samples=mnist1d_samples)
    console.print(table)
    console.print(f"per-round time ratio {clients} / {small} clients: {growth:.2f}")
    console.print(f"load: {load_before} before, {_load_note()} after; measured processes at nice {min(19, os.nice(0) + nice)}")


def scale_table(results: dict[int, list[ChildResult]], *, per_round: int, num_rounds: int, mnist1d_samples: int):
    """The table and the per-round time ratio largest / smallest population."""
    from rich.table import Table

    table = Table(title=f"Scale: {per_round} clients per round, {num_rounds} rounds, MNIST-1D ({mnist1d_samples} "
                        "records), CNN with DP, in-process backend; round time excludes round 1 (start-up); memory "
                        "summed over the whole process tree")
    for col in ("total clients", "round 1 s", "rounds 2..R s (median)", "wall s", "peak RSS (sum)",
                "peak PSS (sum)", "processes"):
        table.add_column(col, justify="right")
    medians = {}
    for n, runs in sorted(results.items()):
        rounds = [_per_round(r) for r in runs]
        medians[n] = _median([t for rs in rounds for t in rs[1:]])
        table.add_row(str(n), f"{_median([rs[0] for rs in rounds]):.1f}", f"{medians[n]:.2f}",
                      f"{_median([r.wall_s for r in runs]):.1f}", _fmt_bytes(max(r.peak_rss for r in runs)),
                      _fmt_bytes(max(r.peak_pss for r in runs)), str(max(r.peak_procs for r in runs)))
    return table, medians[max(medians)] / medians[min(medians)]


# ----------------------------------------------------------------------------- deployment
def deployment_run(cfg_dict: dict[str, Any], run_dir: Path, timeout: float) -> dict[str, Any]:
    """One ``fedpriv federation`` (processes over TLS on 127.0.0.1); its report's per-round seconds."""
    from common.config import RunConfig
    from server.report import RunReport
    from simulations.federation import LocalFederation

    cfg = RunConfig.from_mapping(cfg_dict)
    started = time.perf_counter()
    with LocalFederation(cfg, run_dir) as fed:
        fed.start()
        with TreeMemory(os.getpid()) as memory:
            code = fed.wait(timeout=timeout)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the federation's server exited with code {code}; see {run_dir / 'logs'}")
    report = RunReport.load(run_dir)
    return {"seconds": [r["seconds"] for r in report.rounds], "wall": wall, "peak_pss": memory.peak_pss,
            "aggregation": [r.get("aggregation") for r in report.rounds],
            "trained": [len(r.get("trained", [])) for r in report.rounds]}


@bench_app.command("deployment")
def deployment(
    clients: Annotated[Optional[list[int]], typer.Option("--clients", help="Client processes (repeat the option).")] = None,
    num_rounds: Annotated[int, typer.Option("--num-rounds", help="Rounds per federation (each round starts fresh ClientApp processes).")] = 1,
    local_epochs: Annotated[int, typer.Option("--local-epochs")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each variant, alternating.")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds one federation may take.")] = 900,
) -> None:
    """Round latency of real SuperLink/SuperNode processes over TLS on 127.0.0.1, plain vs SecAgg+.

    Example: fedpriv bench deployment --clients 3 --clients 10
    """
    from simulations.cli import guarded

    guarded(_deployment)(clients or [3, 10], num_rounds, local_epochs, repeats, timeout)


def deployment_config(num_clients: int, num_rounds: int, local_epochs: int, secure: bool, timeout: float,
                      run_dir: Path) -> dict[str, Any]:
    """Digits CNN with DP, every client every round, with or without SecAgg+.

    A round gives up on missing replies after half of ``timeout``, so a lost reply shows in the table
    (fewer clients trained, a long round) instead of failing the whole federation.
    """
    return _sim_config({}, run_dir, num_clients=num_clients, num_rounds=num_rounds, local_epochs=local_epochs,
                       min_clients=num_clients, secure_aggregation=secure, round_timeout=timeout / 2)


def _deployment(clients, num_rounds, local_epochs, repeats, timeout):
    from common.errors import UserInputError
    from simulations.console import console

    _check_positive(num_rounds=num_rounds, local_epochs=local_epochs, repeats=repeats)
    clients = _client_list(clients)
    if min(clients) < 3:
        raise UserInputError("--clients must be >= 3 (SecAgg+ needs at least 3 clients per round)")
    load_before = _load_note()
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {(n, s): [] for n in clients for s in (False, True)}
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-deploy-") as tmp, console.status("measuring") as status:
        for rep in range(repeats):
            for n in clients:
                for secure in (False, True) if rep % 2 == 0 else (True, False):
                    status.update(f"measuring: {n} client processes, {'SecAgg+' if secure else 'plain'}, "
                                  f"repeat {rep + 1}/{repeats}")
                    run_dir = Path(tmp) / f"fed-{n}-{int(secure)}-{rep}"
                    cfg = deployment_config(n, num_rounds, local_epochs, secure, timeout, run_dir)
                    runs[(n, secure)].append(deployment_run(cfg, run_dir, timeout))
    console.print(deployment_table(runs, num_rounds=num_rounds, local_epochs=local_epochs))
    console.print(f"load: {load_before} before, {_load_note()} after")


def deployment_table(runs: dict[tuple[int, bool], list[dict[str, Any]]], *, num_rounds: int, local_epochs: int):
    from rich.table import Table

    table = Table(title=f"Deployment: SuperLink + N SuperNodes over TLS on 127.0.0.1, digits CNN with DP, "
                        f"{num_rounds} rounds, {local_epochs} local epoch(s); round latency from the server's report")
    for col in ("client processes", "plain round s (median)", "SecAgg+ round s (median)", "SecAgg+ / plain",
                "plain wall s", "SecAgg+ wall s", "fewest clients trained (plain / SecAgg+)"):
        table.add_column(col, justify="right")
    for n in sorted({n for n, _ in runs}):
        plain, secure = ([t for r in runs[(n, s)] for t in r["seconds"]] for s in (False, True))
        fewest = [min((t for r in runs[(n, s)] for t in r.get("trained", [])), default=0) for s in (False, True)]
        table.add_row(str(n), f"{_median(plain):.1f}", f"{_median(secure):.1f}", f"{_median(secure) / _median(plain):.2f}",
                      f"{_median([r['wall'] for r in runs[(n, False)]]):.0f}",
                      f"{_median([r['wall'] for r in runs[(n, True)]]):.0f}", f"{fewest[0]} / {fewest[1]} of {n}")
    return table


# ----------------------------------------------------------------------------- peer
@bench_app.command("peer")
def peer(
    clients: Annotated[int, typer.Option("--clients")] = 10,
    num_rounds: Annotated[int, typer.Option("--num-rounds")] = 4,
    local_epochs: Annotated[int, typer.Option("--local-epochs")] = 2,
    dataset: Annotated[str, typer.Option("--dataset")] = "digits",
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each workflow, alternating.")] = 1,
    nice: Annotated[int, typer.Option("--nice", help="Extra niceness of the measured processes (they inherit this one's).")] = 0,
) -> None:
    """Flower's published Opacus example workflow vs this project, per round, same Simulation Engine.

    Example: fedpriv bench peer --clients 10 --num-rounds 4
    """
    from simulations.cli import guarded

    guarded(_peer)(clients, num_rounds, local_epochs, dataset, repeats, nice)


def peer_config(num_clients: int, num_rounds: int, local_epochs: int, dataset: str) -> dict[str, Any]:
    """The CNN with DP on ``dataset``, every client every round: the same for both workflows."""
    # Both on Flower's Simulation Engine with Ray, so the comparison is the workflow, not the engine.
    return _strip(_base_config(dataset=dataset, model="cnn", num_clients=num_clients, num_rounds=num_rounds,
                               local_epochs=local_epochs, min_clients=2, simulation_backend="ray"))


def _peer(clients, num_rounds, local_epochs, dataset, repeats, nice):
    from common.errors import UserInputError
    from simulations.console import console

    _check_positive(local_epochs=local_epochs, repeats=repeats)
    if num_rounds < 2:
        raise UserInputError("--num-rounds must be >= 2 (round 1 includes start-up and is shown apart)")
    _client_list([clients])
    load_before = _load_note()
    base = peer_config(clients, num_rounds, local_epochs, dataset)
    runs: dict[str, list[ChildResult]] = {"sim": [], "peer": []}
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-peer-") as tmp, console.status("measuring") as status:
        for rep in range(repeats):
            for kind in ("sim", "peer") if rep % 2 == 0 else ("peer", "sim"):
                status.update(f"measuring: {kind}, repeat {rep + 1}/{repeats}")
                cfg = _sim_config(base, Path(tmp) / f"{kind}-{rep}")
                runs[kind].append(run_child(kind, {"config": cfg}, kind, nice=nice))
    table, speedup, train_speedup = peer_table(runs, base)
    console.print(table)
    console.print(f"per-round speed-up of fedpriv over the example: {speedup:.2f}x "
                  f"(training phase only: {train_speedup:.2f}x)")
    console.print(f"load: {load_before} before, {_load_note()} after; measured processes at nice {min(19, os.nice(0) + nice)}")


def peer_table(runs: dict[str, list[ChildResult]], base: dict[str, Any]):
    """Table and speed-ups (example / fedpriv) per round, and for the training phase alone."""
    from rich.table import Table

    table = Table(title=f"Peer: Flower's Opacus example workflow vs fedpriv, {base['num_clients']} clients, "
                        f"{base['num_rounds']} rounds, {base['dataset']} CNN with DP, {base['local_epochs']} local "
                        "epochs, same Simulation Engine; round 1 (actor start-up) shown apart")
    for col in ("workflow", "round 1 s", "rounds 2..R s (median)", "of which training s", "wall s"):
        table.add_column(col, justify="right" if col != "workflow" else "left")
    stats = {}
    for kind, name in (("peer", "Flower example: client_fn per message, fresh PrivacyEngine, dict batches, "
                                "client-side evaluate"), ("sim", "fedpriv")):
        rounds = [r.data["rounds"] for r in runs[kind]]
        later = _median([x["end"] - x["start"] for rs in rounds for x in rs[1:]])
        train = _median([x.get("fit_end", x["end"]) - x["start"] for rs in rounds for x in rs[1:]])
        stats[kind] = (later, train)
        table.add_row(name, f"{_median([rs[0]['end'] - rs[0]['start'] for rs in rounds]):.2f}", f"{later:.2f}",
                      f"{train:.2f}", f"{_median([r.wall_s for r in runs[kind]]):.1f}")
    return table, stats["peer"][0] / stats["sim"][0], stats["peer"][1] / stats["sim"][1]


if __name__ == "__main__":
    from simulations.bench_framework import child_main as _main  # the importable module, so Ray can pickle by name
    from simulations.cli import fast_exit

    try:
        _main(sys.argv[1:])
    finally:
        fast_exit()  # as the fedpriv command does
