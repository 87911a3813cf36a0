"""A client that sends a malformed update is dropped, named and explained; the round goes on."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY, SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedpriv.client.app import simulation_client_app
from fedpriv.client.dp_training import train_round
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import load_dataset
from fedpriv.common.models import model_from_config
from fedpriv.common.partitioning import partition
from fedpriv.server.app import build_server_app
from fedpriv.server.update_validation import (client_records, norm_bit, server_weight, update_limits, update_norm,
                                      update_norm_bound, update_problem)
from fedpriv.simulations.inprocess_backend import DirectGrid
from tests.conftest import ROOT


def _record(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def test_update_problem_names_each_defect():
    ref = _record(w=np.zeros((2, 2)), b=np.zeros(2))
    assert update_problem(_record(w=np.ones((2, 2)), b=np.ones(2)), ref) is None
    assert "NaN" in update_problem(_record(w=[[np.nan, 0], [0, 0]], b=np.zeros(2)), ref)
    assert "infinite" in update_problem(_record(w=[[np.inf, 0], [0, 0]], b=np.zeros(2)), ref)
    assert "shape" in update_problem(_record(w=np.zeros((3, 2)), b=np.zeros(2)), ref)
    assert "names differ" in update_problem(_record(w=np.zeros((2, 2))), ref)
    # An unchanged model: Flower's server-side clipping would divide by its zero norm.
    assert "zero" in update_problem(_record(w=np.zeros((2, 2)), b=np.zeros(2)), ref)
    assert "zero" in update_problem(_record(w=np.full((2, 2), 1e-30), b=np.zeros(2)), ref)
    assert "norm" in update_problem(_record(w=np.full((2, 2), 100.0), b=np.zeros(2)), ref, max_norm=10.0)
    assert update_norm(_record(w=np.full((2, 2), 1.0), b=np.zeros(2)), ref) == pytest.approx(2.0)


@pytest.mark.e2e
def test_malformed_updates_are_dropped_and_the_run_goes_on(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, "FEDPRIV_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "tests.apps.malicious_simulation", str(run_dir)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    for rnd in report["rounds"]:
        assert rnd["trained"] == ["client-3", "client-4"], rnd
        assert "NaN" in rnd["rejected"]["client-0"]
        assert "shape" in rnd["rejected"]["client-1"]
        assert "norm" in rnd["rejected"]["client-2"]
    # Their privacy was spent all the same: every client's epsilon is on the books.
    assert sorted(report["privacy"]["clients"]) == [f"client-{i}" for i in range(5)]
    # The global model learnt from the honest two only: its test loss is below a uniform guess's ln(10) (a NaN
    # or a 1000x update in the average would make it NaN or huge). Accuracy after two DP rounds of two clients
    # is too noisy to test (0.14-0.42 seen, with fresh OS-drawn noise every run).
    final_loss = report["rounds"][-1]["metrics"]["loss"]
    assert math.isfinite(final_loss) and final_loss < math.log(10), report["rounds"]
    md = (run_dir / "report.md").read_text()
    assert "update of client-0 dropped" in md
    log = (run_dir / "report.json").read_text()
    assert "client-2" in log


# ------------------------------------------------------------------ the bound comes from the server
def _honest_update_norm(cfg: RunConfig, data, model: torch.nn.Module, part: np.ndarray) -> float:
    """The norm of one real local round (DP-SGD or plain SGD, as ``cfg`` says) on one partition."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_round(model, data.x_train[part], data.y_train[part], cfg, [])
    return float(torch.sqrt(sum(((result.state_dict[k].double() - start[k].double()) ** 2).sum() for k in start)))


@pytest.mark.parametrize("dp", [True, False])
def test_norm_bound_comes_from_the_servers_config_and_admits_honest_training(dp):
    """The bound is a function of the server's config (no step count from a reply can raise it): real
    local rounds of the README's main job pass it, +1000 per weight and "-5 x the model" do not,
    with DP-SGD and with --no-dp alike (which had no bound at all)."""
    cfg = RunConfig(dp=dp).validate()
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction)
    smallest, largest = client_records(cfg, data)
    parts = partition(data.y_train, len(data.x_train), cfg.num_clients, cfg.partitioning, seed=cfg.seed)
    assert (smallest, largest) == (min(map(len, parts)), max(map(len, parts)))  # the server's own split
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=cfg.seed)
    reference = ArrayRecord(model.state_dict())
    num_params = sum(p.numel() for p in model.parameters())
    bound = update_norm_bound(cfg, num_params, (smallest, largest))
    assert math.isfinite(bound) and bound > 0
    honest = max(_honest_update_norm(cfg, data, model_from_config(cfg, data.input_shape, data.num_classes,
                                                                  seed=cfg.seed), parts[i]) for i in range(2))
    # Margin: an honest client is never dropped for its norm. With DP the main job's update is mostly
    # noise (sigma 5.2): a Gaussian vector's norm concentrates at its std times sqrt(d), which the bound
    # takes plus NOISE_TAIL more; without DP the gradient part's worst case leaves far more room.
    assert honest < bound / (1.2 if dp else 1.5), (honest, bound)
    plus_1000 = ArrayRecord({k: Array(v.numpy() + 1000.0) for k, v in reference.items()})
    minus_5x = ArrayRecord({k: Array(-5.0 * v.numpy()) for k, v in reference.items()})
    assert "norm" in update_problem(plus_1000, reference, bound)
    assert "norm" in update_problem(minus_5x, reference, bound)
    assert update_norm_bound(RunConfig(dp=dp, max_update_norm=3.5).validate(), num_params, (1, 10)) == 3.5


# ------------------------------------------------------------ forged replies in a running federation
FORGED_CLIENTS = 12
FORGERY = {  # partition id -> what its ClientApp does to the honest reply
    1: "claims a huge weight", 2: "claims a negative weight", 3: "claims a NaN weight",
    4: "claims 1e9 steps and sends +1000 per weight", 5: "sends -5 x the model", 6: "sends the model unchanged",
    7: "replays its round-1 reply in round 2", 8: "sends a list where its step count belongs",
    9: "adds a metric of its own", 10: "is delivered twice (the grid duplicates its reply)",
}


@pytest.fixture
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _forging_app(cfg: RunConfig) -> ClientApp:
    """Real DP-SGD clients; those in FORGERY then tamper with their reply before it leaves."""
    honest = simulation_client_app(cfg)
    weight_key = wire.UNIT_WEIGHT if cfg.central_dp != "off" else wire.NUM_EXAMPLES
    stale: dict[int, Message] = {}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[PARTITION_ID_KEY])
        if pid == 7 and pid in stale:
            return stale[pid]
        reply = honest(message=msg, context=context)
        metrics, sent = reply.content[wire.METRICS], msg.content[wire.ARRAYS]
        if pid in (1, 2, 3):
            metrics[weight_key] = {1: 10**9 if weight_key == wire.NUM_EXAMPLES else 1e-9, 2: -5, 3: math.nan}[pid]
        elif pid == 4:
            metrics["steps"] = 10**9
            reply.content[wire.ARRAYS] = ArrayRecord({k: Array(v.numpy() + 1000.0) for k, v in sent.items()})
        elif pid == 5:
            reply.content[wire.ARRAYS] = ArrayRecord({k: Array(-5.0 * v.numpy()) for k, v in sent.items()})
        elif pid == 6:
            reply.content[wire.ARRAYS] = ArrayRecord({k: Array(v.numpy().copy()) for k, v in sent.items()})
        elif pid == 7:
            stale[pid] = reply
        elif pid == 8:
            metrics["steps"] = [1, 2]
        elif pid == 9:
            metrics["surprise"] = 1.0
        return reply

    return app


class _DuplicatingGrid(DirectGrid):
    """The in-process grid, except that partition 10's reply arrives twice."""

    def pull_messages(self, message_ids):
        got = list(super().pull_messages(message_ids))
        twice = [m for m in got if self._contexts[m.metadata.src_node_id].node_config[PARTITION_ID_KEY] == 10]
        return got + [copy.deepcopy(m) for m in twice]


def _run_forged_federation(cfg: RunConfig) -> dict:
    run = Run.create_empty(run_id=7)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    grid = _DuplicatingGrid(_forging_app(cfg), FORGED_CLIENTS, run, workers=1)
    context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config={})
    try:
        build_server_app(cfg)(grid=grid, context=context)
    finally:
        grid.shutdown()
    return json.loads((Path(cfg.run_dir) / "report.json").read_text())


@pytest.mark.parametrize("central_dp", ["off", "server-fixed"])
def test_forged_replies_are_dropped_or_corrected_with_one_line_each_and_the_run_goes_on(
        tmp_path, caplog, task_identity, central_dp):
    """Every forgery in FORGERY, in one federation: none crashes the server (before: the list in
    client-8's metrics and client-9's extra metric did, and under central DP so did client-6's
    unchanged model, in Flower's clipping), each is named in one log line with its reason, and
    only updates the server can vouch for, at the weight the server gives, are aggregated."""
    cfg = RunConfig(num_clients=FORGED_CLIENTS, num_rounds=2, local_epochs=1, central_dp=central_dp,
                    run_dir=str(tmp_path / "run")).validate()
    with caplog.at_level(logging.INFO, logger="fedpriv.server"):
        report = _run_forged_federation(cfg)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    forged_weight_accepted = central_dp != "off"  # under central DP every update weighs 1 whatever it says
    for rnd in report["rounds"]:
        rejected = rnd["rejected"]
        expected_trained = {0, 1, 9, 10, 11} | ({2, 3} if forged_weight_accepted else set())
        if rnd["round"] == 1:
            expected_trained.add(7)
        assert set(rnd["trained"]) == {f"client-{i}" for i in expected_trained}, rnd
        if not forged_weight_accepted:
            assert "weight" in rejected["client-2"] and "weight" in rejected["client-3"]
        assert "norm" in rejected["client-4"] and "norm" in rejected["client-5"]
        assert "zero" in rejected["client-6"]
        assert "steps" in rejected["client-8"]
        assert any("duplicate" in reason for name, reason in rejected.items() if "client-10" in name)
        if rnd["round"] == 2:
            assert "round" in rejected["client-7"]
    lines = [r.getMessage() for r in caplog.records if r.name == "fedpriv.server"]
    for server_round in (1, 2):
        for pid in (1, 2, 3, 4, 5, 6, 8):
            named = [line for line in lines
                     if line.startswith(f"round {server_round}:") and re.search(rf"\bclient-{pid}\b", line)]
            assert len(named) == 1, (pid, named)  # one line, naming the client and the reason
    assert not any("Traceback" in line for line in lines)


def _colluding_app(step: float, shares: dict[str, float]) -> ClientApp:
    """Partition 0 is the target; 1-3 collude, claiming a negligible weight so that the global model
    would be the target's own update. Each client moves the model by ``step`` along its own random
    direction; in round 2 the target measures how much of the new global model is its round-1 update."""
    app = ClientApp()
    directions: dict[int, dict[str, np.ndarray]] = {}

    def unit(pid: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(pid)
        raw = {k: rng.standard_normal(v.shape) for k, v in like.items()}
        if pid:  # orthogonal to the target's: the share then measures the weights, not chance overlaps
            target = unit(0, like)
            overlap = sum(float((raw[k] * target[k]).sum()) for k in raw)
            raw = {k: raw[k] - overlap * target[k] for k in raw}
        norm = math.sqrt(sum(float((r**2).sum()) for r in raw.values()))
        return {k: r / norm for k, r in raw.items()}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[PARTITION_ID_KEY])
        sent = {k: v.numpy() for k, v in msg.content[wire.ARRAYS].items()}
        if pid not in directions:
            directions[pid] = unit(pid, sent)
            directions[pid]["_start"] = sent
        elif pid == 0:
            start = directions[0]["_start"]
            shares["target"] = sum(float(((sent[k] - start[k]) * directions[0][k]).sum()) for k in sent) / step
        weight = 1e-9 if pid else 1
        metrics = MetricRecord({wire.NUM_EXAMPLES: weight, wire.UNIT_WEIGHT: weight, wire.DECLINED: 0,
                                "epsilon": 1.0, "steps": 6, "sample-rate": 1 / 3, "noise-multiplier": 1.5})
        arrays = ArrayRecord({k: Array((v + step * directions[pid][k]).astype(v.dtype)) for k, v in sent.items()})
        privacy = ConfigRecord({"client-id": f"client-{pid}"})
        return Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics, wire.PRIVACY: privacy}),
                       reply_to=msg)

    return app


@pytest.mark.parametrize("central_dp", ["off", "server-fixed"])
def test_colluders_claiming_no_weight_cannot_single_out_a_target(tmp_path, task_identity, central_dp):
    """Before: three colluders claiming weight 1e-9 made the global model the target's own update
    (share 1.0), for every other client to read. Now the server sets the weights: 1 each under
    central DP, the reported count held to the records the server expects per client otherwise."""
    shares: dict[str, float] = {}
    cfg = RunConfig(num_clients=4, num_rounds=2, central_dp=central_dp, central_clipping_norm=10.0,
                    central_noise_multiplier=1e-6, run_dir=str(tmp_path / "run")).validate()
    run = Run.create_empty(run_id=7)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    grid = DirectGrid(_colluding_app(1.0, shares), 4, run, workers=1)
    try:
        build_server_app(cfg)(grid=grid, context=Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID,
                                                         node_config={}, state=RecordDict(), run_config={}))
    finally:
        grid.shutdown()
    assert shares["target"] == pytest.approx(0.25, abs=0.02)


def test_the_server_sets_each_weight_and_reads_the_norm_bit_off_the_update():
    plain = update_limits(RunConfig().validate(), 10, (100, 200))
    assert server_weight({wire.NUM_EXAMPLES: 150}, plain) == (150.0, None)
    assert server_weight({wire.NUM_EXAMPLES: 10**9}, plain)[0] == 200.0  # capped: the largest client expected
    assert server_weight({wire.NUM_EXAMPLES: 1e-9}, plain)[0] == 100.0  # raised: colluders cannot vanish
    for forged in (0, -5, math.nan, math.inf, True, "many", [1, 2], None):
        weight, why = server_weight({wire.NUM_EXAMPLES: forged}, plain)
        assert weight is None and "weight" in why
    central = update_limits(RunConfig(central_dp="server-fixed").validate(), 10, (100, 200))
    assert central.weight_key == wire.UNIT_WEIGHT
    assert server_weight({wire.UNIT_WEIGHT: 1}, central) == (1.0, None)
    for forged in (1e-9, -5, math.nan, None):
        assert server_weight({wire.UNIT_WEIGHT: forged}, central)[0] == 1.0
    # Client-side clipping: the update must be clipped as claimed, and was-it-clipped is read off it.
    client = update_limits(RunConfig(central_dp="client-adaptive").validate(), 4, (100, 200), clipping_norm=0.5)
    assert client.max_norm == pytest.approx(0.5005)
    ref = _record(w=np.zeros(4))
    assert norm_bit(_record(w=[0.25, 0.25, 0.25, 0.25]), ref, client) == 1  # norm 0.5: clipped
    assert norm_bit(_record(w=[0.1, 0.0, 0.0, 0.0]), ref, client) == 0
    assert "norm" in update_problem(_record(w=[1.0, 0.0, 0.0, 0.0]), ref, client.max_norm)
