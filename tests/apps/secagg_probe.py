"""Real SecAgg+ rounds on Flower's Simulation Engine with clients whose updates are known in advance.

Each client returns global + (pid + 1) * 0.01 and weight 10 * (pid + 1), through the project's own
client mods (Flower's secaggplus_mod and the record adapter). The server side calls the project's
``run_secure_round`` on a grid that records every reply the server receives, and writes what it saw
to OUT_JSON: the unmasked aggregate against the plain weighted FedAvg, whether any reply held a
client's update in the clear, and the outcome of rounds with dropouts.
Usage: python -m tests.apps.secagg_probe OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedpriv.client.privacy_mods import privacy_mods
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.server.secure_aggregation import run_secure_round

NUM_CLIENTS = 5
SHAPES = {"w": (4, 3), "b": (3,)}
# Which partitions crash in which round: round 2 loses one (within the threshold), round 3 three (beyond it).
DROPOUTS = {1: set(), 2: {0}, 3: {0, 1, 2}}

client = ClientApp(mods=[privacy_mods])


def update_of(pid: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v + 0.01 * (pid + 1)).astype(np.float32) for k, v in arrays.items()}


@client.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content[wire.CONFIG]["server-round"])
    if pid in DROPOUTS[server_round]:
        raise RuntimeError(f"client {pid} drops out of round {server_round}")
    sent = {k: msg.content[wire.ARRAYS][k].numpy() for k in msg.content[wire.ARRAYS].keys()}
    arrays = ArrayRecord({k: Array(v) for k, v in update_of(pid, sent).items()})
    metrics = MetricRecord({wire.NUM_EXAMPLES: 10 * (pid + 1), wire.DECLINED: 0, "steps": 1})
    privacy = ConfigRecord({"client-id": f"client-{pid}"})
    return Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics, wire.PRIVACY: privacy}),
                   reply_to=msg)


class RecordingGrid:
    """Everything the server-side code is handed by the grid, kept for inspection."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.seen = grid, []

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.seen.extend(replies)
        return replies


def held_in_clear(reply: Message, updates: list[dict[str, np.ndarray]]) -> bool:
    """Does this reply hold any client's update (or its bytes) in a readable form?"""
    if not reply.has_content():
        return False  # an error reply (a client that dropped out)
    for record in reply.content.array_records.values():
        if len(record) > 0:
            return True
    raw = [np.concatenate([u[k].ravel() for k in SHAPES]) for u in updates]
    for record in reply.content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes):
                    if any(r.tobytes() in item for r in raw):
                        return True
                    try:
                        arr = np.load(__import__("io").BytesIO(item), allow_pickle=False).astype(np.float64).ravel()
                    except Exception:  # noqa: BLE001 - keys and ciphertexts are not arrays
                        continue
                    if any(arr.size == r.size and np.allclose(arr, r, atol=1e-3) for r in raw):
                        return True
    return False


def main(out: Path) -> None:
    server = ServerApp()
    cfg = RunConfig(num_clients=NUM_CLIENTS, min_clients=NUM_CLIENTS, secure_aggregation=True, round_timeout=60)
    rng = np.random.default_rng(0)
    global_arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}

    @server.main()
    def run(grid: Grid, context: Context) -> None:  # noqa: ARG001
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < NUM_CLIENTS:
            nodes = sorted(grid.get_node_ids())
        results = {"shares_threshold": list(cfg.secagg_parameters(NUM_CLIENTS)), "rounds": {}}
        updates = [update_of(pid, global_arrays) for pid in range(NUM_CLIENTS)]
        for server_round, dropped in DROPOUTS.items():
            arrays = ArrayRecord({k: Array(v) for k, v in global_arrays.items()})
            config = ConfigRecord({"server-round": server_round})
            messages = [Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), dst_node_id=n,
                                message_type=MessageType.TRAIN) for n in nodes]
            recording = RecordingGrid(grid)
            outcome = run_secure_round(recording, messages, arrays, cfg, server_round)
            alive = [pid for pid in range(NUM_CLIENTS) if pid not in dropped]
            weights = np.array([10.0 * (pid + 1) for pid in alive])
            expected = {k: sum(w * updates[p][k] for w, p in zip(weights, alive)) / weights.sum() for k in SHAPES}
            entry = {"dropped": sorted(dropped), "completed": outcome.aggregate is not None,
                     "clients_reporting": sorted(str(m.content[wire.PRIVACY]["client-id"]) for m in outcome.replies),
                     "replies_seen": len(recording.seen),
                     "clear_updates_seen": sum(held_in_clear(m, updates) for m in recording.seen)}
            if outcome.aggregate is not None:
                got = {k: outcome.aggregate[k].numpy() for k in SHAPES}
                entry["max_abs_error"] = float(max(np.abs(got[k] - expected[k]).max() for k in SHAPES))
                entry["dtype"] = str(got["w"].dtype)
            results["rounds"][str(server_round)] = entry
        out.write_text(json.dumps(results, indent=2))

    run_simulation(server_app=server, client_app=client, num_supernodes=NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": False}})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
