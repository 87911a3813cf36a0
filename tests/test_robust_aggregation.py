"""Robust aggregation (Flower's FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) behind --strategy.

Refused, one line each, where it cannot combine with the run's privacy mode; against real
model-poisoning clients it holds the accuracy that FedAvg loses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY, SUPERLINK_NODE_ID
from flwr.serverapp import strategy as flower
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedpriv.client.app import simulation_client_app
from fedpriv.common import wire
from fedpriv.common.config import ROBUST_STRATEGIES, RunConfig
from fedpriv.common.datasets import load_dataset
from fedpriv.common.errors import UserInputError
from fedpriv.common.models import model_from_config
from fedpriv.server.app import build_server_app
from fedpriv.server.strategy_factory import build_strategy
from fedpriv.server.update_validation import client_records, update_norm_bound
from fedpriv.simulations.inprocess_backend import DirectGrid


@pytest.mark.parametrize("overrides, needle", [
    (dict(strategy="fedmedian", secure_aggregation=True), "--secure-aggregation"),
    (dict(strategy="krum", central_dp="server-fixed"), "--central-dp"),
    (dict(strategy="bulyan", central_dp="client-adaptive"), "--central-dp"),
    (dict(strategy="bulyan", num_clients=6), "4f+3"),
    (dict(strategy="krum", num_malicious=4), "2f+2"),
    (dict(strategy="fedtrimmedavg", trimmed_beta=0.05), "trims nothing"),
    (dict(strategy="fedtrimmedavg", trimmed_beta=0.5), "--trimmed-beta"),
    (dict(strategy="fedmedian", num_malicious=-1), "--num-malicious"),
])
def test_robust_rules_are_refused_in_one_line_where_they_cannot_work(overrides, needle):
    with pytest.raises(UserInputError, match=needle.replace("+", r"\+")) as exc:
        RunConfig(**overrides).validate()
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name, cls, attributes", [
    ("fedmedian", flower.FedMedian, {}),
    ("fedtrimmedavg", flower.FedTrimmedAvg, {"beta": 0.2}),
    ("krum", flower.Krum, {"num_malicious_nodes": 3}),  # 10 clients: the most Krum tolerates (10 > 2*3+2)
    ("multikrum", flower.MultiKrum, {"num_malicious_nodes": 3, "num_nodes_to_select": 7}),
    ("bulyan", flower.Bulyan, {"num_malicious_nodes": 1}),  # 10 >= 4*1+3
])
def test_each_robust_rule_is_flowers_with_the_most_byzantine_clients_it_tolerates(name, cls, attributes):
    strategy = build_strategy(RunConfig(strategy=name).validate())
    assert isinstance(strategy, cls) and strategy.weighted_by_key == wire.NUM_EXAMPLES
    for attribute, value in attributes.items():
        assert getattr(strategy, attribute) == value
    assert set(ROBUST_STRATEGIES) == {"fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"}


# ----------------------------------------------------------------------------- model poisoning
CLIENTS, POISONERS, ROUNDS = 15, (0, 1, 2), 4  # 3 of 15 poisoners (20 %): Bulyan's 4f+3 <= 15 allows f = 3


@pytest.fixture
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _poisoned_app(cfg: RunConfig, poisoners: tuple[int, ...], attack_norm: float) -> ClientApp:
    """Real clients; the ``poisoners`` train honestly, then send their update scaled to ``attack_norm``
    (just inside the server's norm bound, which is public), two of them sign-flipped."""
    honest = simulation_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(message=msg, context=context)
        pid = int(context.node_config[PARTITION_ID_KEY])
        if pid not in poisoners:
            return reply
        sent, trained = msg.content[wire.ARRAYS], reply.content[wire.ARRAYS]
        update = {k: trained[k].numpy().astype(np.float64) - sent[k].numpy() for k in sent.keys()}
        scale = attack_norm / math.sqrt(sum(float((u**2).sum()) for u in update.values()))
        sign = 1.0 if pid == poisoners[-1] else -1.0  # two sign-flipped, one only scaled up
        reply.content[wire.ARRAYS] = ArrayRecord({
            k: Array((sent[k].numpy() + sign * scale * u).astype(sent[k].numpy().dtype)) for k, u in update.items()})
        return reply

    return app


def _final_accuracy(cfg: RunConfig, poisoners: tuple[int, ...] = POISONERS) -> float:
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction)
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=cfg.seed)
    bound = update_norm_bound(cfg, sum(p.numel() for p in model.parameters()), client_records(cfg, data))
    run = Run.create_empty(run_id=11)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    grid = DirectGrid(_poisoned_app(cfg, poisoners, 0.9 * bound), CLIENTS, run, workers=1)
    try:
        build_server_app(cfg)(grid=grid, context=Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID,
                                                         node_config={}, state=RecordDict(), run_config={}))
    finally:
        grid.shutdown()
    report = json.loads((Path(cfg.run_dir) / "report.json").read_text())
    assert all(not rnd["rejected"] for rnd in report["rounds"])  # the attack stays inside every check
    return report["rounds"][-1]["metrics"]["accuracy"]


def test_poisoned_federation_fedavg_degrades_and_robust_rules_hold_accuracy(tmp_path, task_identity):
    """3 of 15 clients send sign-flipped or scaled updates inside the norm bound. FedAvg loses the
    model (chance accuracy, 0.10); FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan (f = 3) keep
    it near an unattacked FedAvg run's. --no-dp: the attack, not DP noise, is what is measured.

    Measured over 40 runs each (this configuration, 4 rounds): clean FedAvg 0.81-0.93; FedMedian
    0.83-0.92, FedTrimmedAvg 0.85-0.92, MultiKrum 0.79-0.92, Bulyan 0.88-0.93; Krum 0.61-0.88 (median
    0.82) and once 0.574 in CI. Krum keeps a single client's update per round, so its accuracy spreads
    like one client training alone, with a long lower tail; it is judged by the median of three runs
    (a broken Krum that picks a poisoner sits at chance every run)."""
    def config(strategy: str, tag: str) -> RunConfig:
        # the previous main job's local training (batch 64, lr 0.1) and the design card's CNN, which these
        # measurements were made with (the compact CNN under poisoned FedAvg ended at 0.357, not chance)
        return RunConfig(num_clients=CLIENTS, num_rounds=ROUNDS, local_epochs=4, dp=False, strategy=strategy,
                         batch_size=64, learning_rate=0.1, cnn_arch="card",
                         num_malicious=len(POISONERS) if strategy in ROBUST_STRATEGIES else 0,
                         trimmed_beta=0.2, run_dir=str(tmp_path / tag)).validate()

    clean = _final_accuracy(config("fedavg", "clean"), poisoners=())
    accuracy = {name: _final_accuracy(config(name, name)) for name in ("fedavg", *ROBUST_STRATEGIES)
                if name != "krum"}
    krum_runs = sorted(_final_accuracy(config("krum", f"krum{i}")) for i in range(3))
    print(f"clean FedAvg {clean:.3f}; poisoned: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
          + f", krum {krum_runs}")
    assert clean > 0.75
    assert accuracy["fedavg"] < 0.3
    for name in ROBUST_STRATEGIES:
        if name != "krum":
            assert accuracy[name] > 0.65 and clean - accuracy[name] < 0.25, (name, accuracy[name], clean)
    assert krum_runs[1] > 0.6 and clean - krum_runs[1] < 0.3, ("krum", krum_runs, clean)
