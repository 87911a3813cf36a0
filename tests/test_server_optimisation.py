"""Server-side optimisation of the DP updates: FedAvgM's momentum and the average of the iterates.

Both act only on models the server already released to every client (post-processing), so
neither changes any client's epsilon; what is checked here is that they compute what they say.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvgM

from fedpriv.common.config import RunConfig
from fedpriv.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpriv.server.iterate_averaging import IterateAverage
from fedpriv.server.strategy_factory import build_strategy

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py: Flower messages need a run id


def test_average_starts_at_the_first_iterate_then_decays():
    avg = IterateAverage(0.75)
    first = avg.update({"w": torch.tensor([4.0, 0.0]), "steps": torch.tensor(1)})
    torch.testing.assert_close(first["w"], torch.tensor([4.0, 0.0]))
    second = avg.update({"w": torch.tensor([0.0, 8.0]), "steps": torch.tensor(2)})
    torch.testing.assert_close(second["w"], torch.tensor([3.0, 2.0]))  # 0.75 * old + 0.25 * new
    assert int(second["steps"]) == 2  # integer buffers are copied, not averaged
    second["w"].add_(100.0)  # the caller's copy is its own
    torch.testing.assert_close(avg.state["w"], torch.tensor([3.0, 2.0]))


def test_average_survives_a_checkpoint(tmp_path):
    avg = IterateAverage(0.5)
    avg.update({"w": torch.tensor([2.0])})
    save_checkpoint(tmp_path, Checkpoint(1, {"w": torch.tensor([2.0])}, {"rounds": []}, avg.state))
    resumed = IterateAverage(0.5, load_checkpoint(tmp_path).averaged)
    torch.testing.assert_close(resumed.update({"w": torch.tensor([4.0])})["w"], torch.tensor([3.0]))
    save_checkpoint(tmp_path, Checkpoint(1, {"w": torch.tensor([2.0])}, {"rounds": []}))
    assert load_checkpoint(tmp_path).averaged is None


def test_bad_decay_is_refused():
    with pytest.raises(ValueError):
        IterateAverage(1.0)


def test_fedavgm_gets_the_momentum_and_the_strategys_own_default_step():
    strategy = build_strategy(RunConfig(strategy="fedavgm", server_momentum=0.9).validate())
    assert isinstance(strategy, FedAvgM)
    assert strategy.server_momentum == 0.9 and strategy.server_learning_rate == 1.0
    adam = build_strategy(RunConfig(strategy="fedadam").validate())
    assert isinstance(adam, FedAdam) and adam.eta == pytest.approx(0.01)
    assert build_strategy(RunConfig(strategy="fedavgm", server_learning_rate=0.5).validate()).server_learning_rate == 0.5


def test_fedavgm_steps_along_the_running_sum_of_averaged_updates():
    """Two rounds of Flower's FedAvgM through the project's strategy: the second step is the new
    update plus momentum times the first (Hsu et al. 2019), which is what the README promises."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from fedpriv.common import wire

    strategy = build_strategy(RunConfig(strategy="fedavgm", server_momentum=0.5).validate())

    def reply(arrays: np.ndarray) -> Message:
        content = RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(arrays)}),
                              wire.METRICS: MetricRecord({strategy.weighted_by_key: 1})})
        return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)

    arrays = ArrayRecord({"w": Array(np.array([1.0, 1.0]))})
    for server_round, client_update in ((1, np.array([1.0, 0.0])), (2, np.array([0.0, 2.0]))):
        strategy.current_arrays = arrays  # what FedAvgM.configure_train records as the round's global model
        arrays = strategy.aggregate_train(server_round, [reply(arrays["w"].numpy() - client_update)])[0]
        if server_round == 1:
            np.testing.assert_allclose(arrays["w"].numpy(), [0.0, 1.0])  # first step: the update itself
    # second update (0, 2) plus 0.5 * first (1, 0): the model moves by (0.5, 2) from (0, 1)
    np.testing.assert_allclose(arrays["w"].numpy(), [-0.5, -1.0])


@pytest.mark.parametrize("options", [{"strategy": "fedavgm"}, {"strategy": "fedadam"},
                                     {"strategy": "fedavgm", "central_dp": "server-fixed"}])
def test_a_restarted_server_keeps_its_optimiser_state(tmp_path, options):
    """FedAvgM's momentum and FedAdam's moments go into the checkpoint and come back into a fresh
    strategy (also behind central DP's noise-then-optimiser wrapper): a restart takes the same steps."""
    from fedpriv.server.strategy_factory import optimiser_state, restore_optimiser_state

    cfg = RunConfig(**options).validate()
    running = build_strategy(cfg)
    optimiser = running.__dict__.get("optimiser", running)
    if options["strategy"] == "fedavgm":
        optimiser.momentum_vector = [np.arange(3.0), np.ones((2, 2), dtype=np.float32)]
    else:
        optimiser.m_t, optimiser.v_t = {"w": np.arange(3.0)}, {"w": np.full(3, 0.5)}
    save_checkpoint(tmp_path, Checkpoint(3, {"w": torch.zeros(3)}, {"rounds": []}, None, optimiser_state(running)))

    restarted = build_strategy(cfg)
    restore_optimiser_state(restarted, load_checkpoint(tmp_path).optimiser)
    before, after = optimiser_state(running), optimiser_state(restarted)
    assert before.keys() == after.keys()
    for name in before:
        values = before[name].values() if isinstance(before[name], dict) else before[name]
        again = after[name].values() if isinstance(after[name], dict) else after[name]
        for a, b in zip(values, again, strict=True):
            assert isinstance(b, np.ndarray) and b.dtype == a.dtype
            np.testing.assert_array_equal(a, b)


def test_plain_fedavg_has_no_optimiser_state():
    from fedpriv.server.strategy_factory import optimiser_state

    assert optimiser_state(build_strategy(RunConfig(strategy="fedavg").validate())) is None
