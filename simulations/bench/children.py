"""What a measured child process runs (``python -m fedpriv.simulations.bench.runner KIND SPEC OUT``).

- ``sim``: ``fedpriv simulate``'s code path, with :func:`trace_mod` outermost on the project's
  ClientApp so every training message's entry and exit is logged, and the rounds timestamped;
- ``loop``: the same local training (same clients, rounds, config) in one plain loop;
- ``peer``: Flower's published Opacus example workflow (:mod:`simulations.bench.peer_example`).

Each returns a JSON-able dict of marks and timelines; the parent (:func:`~simulations.bench.runner.run_child`)
adds what it saw from outside.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fedpriv.common import wire
from fedpriv.simulations.bench.peer_example import PeerTimeline, peer_client_app, peer_server_app

TRACE_FILE = "bench-trace.jsonl"


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
        run_dir = Path(str(msg.content.config_records[wire.CONFIG][wire.RUN_DIR]))
        with open(run_dir / TRACE_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), "in": entered, "out": time.time(),
                                "proc_start": _proc_start_time()}) + "\n")
    except (KeyError, OSError):
        pass
    return reply


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
    import fedpriv.client.app as client_app
    from fedpriv.common.config import RunConfig
    from fedpriv.simulations.simulate import simulate

    marks["imported"] = time.time()
    cfg = RunConfig.from_mapping(spec["config"])
    project_app = client_app.simulation_client_app  # simulate() looks it up at call time: trace_mod outermost
    client_app.simulation_client_app = lambda run_cfg: project_app(run_cfg, outer_mods=(trace_mod,))
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

    from fedpriv.client.dp_training import train_round
    from fedpriv.client.local_data import local_data
    from fedpriv.common.config import RunConfig
    from fedpriv.common.models import model_from_config

    marks["imported"] = time.time()
    cfg = RunConfig.from_mapping(spec["config"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    clients = [local_data(cfg, {wire.NODE_PARTITION_ID: i, wire.NODE_NUM_PARTITIONS: cfg.num_clients}) for i in range(cfg.num_clients)]
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

    from fedpriv.common.config import RunConfig

    marks["imported"] = time.time()
    cfg = RunConfig.from_mapping(spec["config"])
    os.environ["FEDPRIV_PEER_CONFIG"] = json.dumps(cfg.to_dict(kebab=True))  # inherited by Ray's workers
    timeline = PeerTimeline()
    backend_config = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
                      "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}}
    marks["simulate"] = time.time()
    run_simulation(server_app=peer_server_app(cfg, timeline), client_app=peer_client_app(),
                   num_supernodes=cfg.num_clients, backend_config=backend_config)
    marks["returned"] = time.time()
    return {"marks": marks, "rounds": timeline.rounds}


CHILDREN = {"sim": _child_sim, "loop": _child_loop, "peer": _child_peer}
