"""SecAgg+ against a server that lies about who dropped out, replayed with Flower's own stage functions.

Flower's client stage reveals, for whatever node lists the server's unmask message holds, a share of
each "active" node's private-mask seed and a share of each "dropped" node's masking key. A server
that lists a target as both active and dropped gets threshold shares of both secrets and so the
target's update in the clear, with no colluding client. These tests run five in-process clients
(threshold 4) behind a grid, drive Flower's ``SecAggPlusWorkflow`` stages for setup, key sharing and
masked vectors, then send a lying unmask stage: Flower's ``secaggplus_mod`` alone leaks the target's
update; the project's ClientApp mods (``client.secagg_guard``) refuse and reveal no share.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import bytes_to_ndarray
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedpriv.client.privacy_mods import _named_records, privacy_mods
from fedpriv.client.secagg_guard import CLIPPED_VALUES, GUARD_STATE
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import UserInputError
from fedpriv.server.secure_aggregation import ARRAY_NAMES, _GivenSample, run_secure_round

NODES = [101, 102, 103, 104, 105]  # partition ids 0..4, weights 10..50
TARGET = 103
SHARES, THRESHOLD, MAX_WEIGHT = 5, 4, 100.0
SHAPES = {"w": (4, 3), "b": (3,)}
GLOBAL = {k: np.random.default_rng(0).normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def update_of(pid: int) -> dict[str, np.ndarray]:
    """Each client's trained model: distinct, known to the test, well inside SecAgg+'s +-8 range."""
    rng = np.random.default_rng(100 + pid)
    return {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in GLOBAL.items()}


def train(msg: Message, ctxt: Context) -> Message:
    """The ClientApp's train function, in the project's record layout (as the probe app's)."""
    pid = int(ctxt.node_config["partition-id"])
    if ctxt.node_config.get("drop"):
        raise RuntimeError(f"client {pid} drops out")
    trained = update_of(pid)
    if ctxt.node_config.get("big"):
        trained["b"] = np.full(SHAPES["b"], 1000.0, dtype=np.float32)  # x 10/100 = 100, beyond +-8
    metrics = MetricRecord({wire.NUM_EXAMPLES: 10 * (pid + 1), wire.DECLINED: 0, "steps": 1})
    return Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in trained.items()}),
                               wire.METRICS: metrics,
                               wire.PRIVACY: ConfigRecord({"client-id": f"client-{pid}"})}), reply_to=msg)


def flower_only(msg: Message, ctxt: Context, call_next) -> Message:  # noqa: ANN001
    """The client before the guard: Flower's secaggplus_mod straight on the record adapter."""
    return secaggplus_mod(msg, ctxt, _named_records(call_next))


class Federation:
    """Five in-process clients behind a grid; each keeps its Context between messages, as a SuperNode does.

    Every message is copied on the way in and out, as the wire would (Flower's workflow sends one
    shared RecordDict to all nodes, which ``secaggplus_mod`` mutates); a client that raises answers
    with an error reply, as Flower's runtime does.
    """

    def __init__(self, mods, **flags: set[int]) -> None:  # noqa: ANN001
        self.mods = mods
        self.contexts = {nid: Context(run_id=0, node_id=nid, state=RecordDict(), run_config={},
                                      node_config={"partition-id": pid,
                                                   **{flag: int(pid in pids) for flag, pids in flags.items()}})
                         for pid, nid in enumerate(NODES)}
        self.masked: dict[int, list[bytes]] = {}  # node -> the masked vector it sent

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:  # noqa: ANN001, ARG002
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            inbound = Message(copy.deepcopy(msg.content), dst_node_id=nid, message_type=MessageType.TRAIN,
                              group_id=msg.metadata.group_id)
            try:
                reply = self.mods(inbound, self.contexts[nid], train)
            except Exception as exc:  # noqa: BLE001 - the runtime turns it into an error reply
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(exc)), reply_to=inbound)
            if reply.has_content():
                reply = Message(copy.deepcopy(reply.content), reply_to=inbound)
                configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
                if Key.MASKED_PARAMETERS in configs:
                    self.masked[nid] = list(configs[Key.MASKED_PARAMETERS])
            replies.append(reply)
        return replies


def first_three_stages(fed: Federation, shares: int = SHARES, threshold: int = THRESHOLD):
    """Flower's own setup, share-keys and collect-masked-vectors stages, as an honest server runs them."""
    workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=MAX_WEIGHT)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    state_record = RecordDict({MAIN_PARAMS_RECORD: arrays,
                               MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})})
    sample = _GivenSample(NODES, {"server-round": 1, ARRAY_NAMES: list(GLOBAL)})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state_record, run_config={}),
                            strategy=sample)
    state = WorkflowState()
    for stage in (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage):
        assert stage(fed, context, state), stage.__name__
    assert state.active_node_ids == set(NODES)
    return state


def unmask_message(nid: int, active: list[int], dead: list[int]) -> Message:
    config = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
    return Message(RecordDict({RECORD_KEY_CONFIGS: config}), dst_node_id=nid, message_type=MessageType.TRAIN,
                   group_id="1")


def lying_unmask(fed: Federation, state: WorkflowState, target: int):
    """Flower's unmask stage with one lie: the target is in every client's active *and* dropped list.

    Returns the replies and the target's seed shares and key shares that came back.
    """
    asked = {}
    for nid in sorted(state.active_node_ids):
        neighbours = state.nid_to_neighbours[nid]
        asked[nid] = (sorted(neighbours & state.active_node_ids),
                      sorted((neighbours - state.active_node_ids) | ({target} & neighbours)))
    replies = fed.send_and_receive([unmask_message(nid, *lists) for nid, lists in asked.items()])
    seed_shares, key_shares = [], []
    for reply in replies:
        if reply.has_error():
            continue
        active, _ = asked[reply.metadata.src_node_id]
        answer = reply.content.config_records[RECORD_KEY_CONFIGS]
        for i, (owner, share) in enumerate(zip(answer[Key.NODE_ID_LIST], answer[Key.SHARE_LIST], strict=True)):
            if owner == target:
                (seed_shares if i < len(active) else key_shares).append(share)
    return replies, seed_shares, key_shares


def unmask_alone(state: WorkflowState, masked: list[bytes], target: int, seed: bytes, sk1: bytes):
    """Strip the target's private mask and every pairwise mask off its own masked vector, then dequantise."""
    vector = [bytes_to_ndarray(b) for b in masked]
    shapes = get_parameters_shape(vector)
    vector = parameters_subtraction(vector, pseudo_rand_gen(seed, state.mod_range, shapes))
    for other in state.nid_to_neighbours[target] - {target}:
        shared = generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(state.nid_to_publickeys[other][0]))
        mask = pseudo_rand_gen(shared, state.mod_range, shapes)
        vector = parameters_subtraction(vector, mask) if target > other else parameters_addition(vector, mask)
    q_ratio, quantised = factor_extract(parameters_mod(vector, state.mod_range))
    values = dequantize(quantised, state.clipping_range, state.quantization_range)
    return {name: v * state.quantization_range / q_ratio for name, v in zip(GLOBAL, values, strict=True)}


def test_flowers_client_alone_reveals_a_target_listed_as_active_and_dropped():
    """The attack is real: with Flower's mod alone the server reads the target's update, no colluders."""
    fed = Federation(flower_only)
    state = first_three_stages(fed)
    replies, seed_shares, key_shares = lying_unmask(fed, state, TARGET)
    assert not any(r.has_error() for r in replies)
    assert len(seed_shares) >= THRESHOLD and len(key_shares) >= THRESHOLD
    recovered = unmask_alone(state, fed.masked[TARGET], TARGET, combine_shares(seed_shares),
                             combine_shares(key_shares))
    truth = update_of(NODES.index(TARGET))
    for name in GLOBAL:  # in the clear, up to one quantisation step / (weight / max weight)
        np.testing.assert_allclose(recovered[name], truth[name], atol=1e-3)


def test_guard_refuses_to_unmask_a_target_listed_as_active_and_dropped():
    """The same replay against the project's ClientApp mods: every client refuses, no share leaves."""
    fed = Federation(privacy_mods)
    state = first_three_stages(fed)
    replies, seed_shares, key_shares = lying_unmask(fed, state, TARGET)
    assert len(replies) == len(NODES)
    for reply in replies:
        assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
        assert "both active and dropped" in reply.error.reason and str(TARGET) in reply.error.reason
    assert seed_shares == [] and key_shares == []
    # The refusal is final for the round: Flower's secrets are gone and an honest retry is refused too.
    for ctxt in fed.contexts.values():
        assert RECORD_KEY_STATE not in ctxt.state.config_records
    retry = fed.send_and_receive([unmask_message(nid, sorted(NODES), []) for nid in NODES])
    assert all(r.has_error() and "refused earlier" in r.error.reason for r in retry)


@pytest.mark.parametrize("lists, needle", [
    ((sorted(NODES), [TARGET]), "both active and dropped"),
    ((sorted(NODES), [999]), "outside its neighbour set"),
    ((sorted(NODES) + [999], []), "outside its neighbour set"),
    ((sorted(set(NODES) - {104}), []), "neither active nor dropped"),
    ((sorted(set(NODES) - {101}), [101]), "lists this client itself as dropped"),
    ((sorted(NODES) + [102], []), "twice"),
])
def test_guard_refuses_inconsistent_unmask_lists(lists, needle):
    fed = Federation(privacy_mods)
    first_three_stages(fed)
    (reply,) = fed.send_and_receive([unmask_message(101, *lists)])
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert needle in reply.error.reason
    # A client given consistent lists still answers, with one share per listed node.
    (ok,) = fed.send_and_receive([unmask_message(102, sorted(NODES), [])])
    assert not ok.has_error()
    assert sorted(ok.content.config_records[RECORD_KEY_CONFIGS][Key.NODE_ID_LIST]) == sorted(NODES)


def test_guard_refuses_a_masked_vector_stage_that_contradicts_the_key_stage():
    """A ciphertext forwarded twice from one source (or from outside the neighbours) is refused before training."""
    fed = Federation(privacy_mods)
    workflow = SecAggPlusWorkflow(num_shares=SHARES, reconstruction_threshold=THRESHOLD, max_weight=MAX_WEIGHT)
    sample = _GivenSample(NODES, {"server-round": 1, ARRAY_NAMES: list(GLOBAL)})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, run_config={}, state=RecordDict({
        MAIN_PARAMS_RECORD: ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
        MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})})), strategy=sample)
    state = WorkflowState()
    assert workflow.setup_stage(fed, context, state) and workflow.share_keys_stage(fed, context, state)
    state.forward_srcs[101].append(state.forward_srcs[101][0])
    state.forward_ciphertexts[101].append(state.forward_ciphertexts[101][0])
    assert workflow.collect_masked_vectors_stage(fed, context, state)  # four honest clients remain >= 4
    assert 101 not in state.active_node_ids and 101 not in fed.masked
    (again,) = fed.send_and_receive([unmask_message(101, sorted(NODES), [])])
    assert again.has_error() and "refused earlier" in again.error.reason and "sent shares twice" in again.error.reason


def test_guard_refuses_a_threshold_of_at_most_half_the_shares():
    """With 2 * threshold <= shares a server telling half the neighbours "active" and half "dropped" wins."""
    fed = Federation(privacy_mods)
    workflow = SecAggPlusWorkflow(num_shares=5, reconstruction_threshold=2, max_weight=MAX_WEIGHT)
    sample = _GivenSample(NODES, {"server-round": 1, ARRAY_NAMES: list(GLOBAL)})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, run_config={}, state=RecordDict({
        MAIN_PARAMS_RECORD: ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
        MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})})), strategy=sample)
    assert not workflow.setup_stage(fed, context, WorkflowState())
    for ctxt in fed.contexts.values():
        guard = ctxt.state.config_records[GUARD_STATE]
        assert guard["stage"] == "refused" and "must exceed half the shares" in guard["reason"]
    with pytest.raises(UserInputError, match="--secagg-threshold"):
        RunConfig(secure_aggregation=True, num_clients=10, min_clients=10, secagg_threshold=5).validate()
    RunConfig(secure_aggregation=True, num_clients=10, min_clients=10, secagg_threshold=6).validate()


def _messages() -> tuple[list[Message], ArrayRecord]:
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    config = ConfigRecord({"server-round": 1})
    return [Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), dst_node_id=n,
                    message_type=MessageType.TRAIN) for n in NODES], arrays


def _expected(alive: list[int]) -> dict[str, np.ndarray]:
    weights = [10.0 * (pid + 1) for pid in alive]
    return {k: sum(w * update_of(p)[k] for w, p in zip(weights, alive)) / sum(weights) for k in GLOBAL}


def test_guarded_round_with_a_dropout_still_equals_fedavg():
    """The guard accepts everything an honest server sends, dropout recovery included."""
    cfg = RunConfig(num_clients=5, min_clients=5, secure_aggregation=True, secagg_max_weight=MAX_WEIGHT,
                    round_timeout=60)
    messages, arrays = _messages()
    outcome = run_secure_round(Federation(privacy_mods, drop={0}), messages, arrays, cfg, 1)
    assert outcome.aggregate is not None
    assert sorted(str(m.content[wire.PRIVACY]["client-id"]) for m in outcome.replies) == [
        f"client-{p}" for p in range(1, 5)]
    expected = _expected([1, 2, 3, 4])
    for name in GLOBAL:
        np.testing.assert_allclose(outcome.aggregate[name].numpy(), expected[name], atol=1e-4)
    assert outcome.clipped == {}


def test_values_the_quantiser_clips_are_counted_and_reported():
    """Client 0's three values of 1000 become 100 after its weight scaling, beyond +-8: counted, reported."""
    cfg = RunConfig(num_clients=5, min_clients=5, secure_aggregation=True, secagg_max_weight=MAX_WEIGHT,
                    round_timeout=60)
    messages, arrays = _messages()
    outcome = run_secure_round(Federation(privacy_mods, big={0}), messages, arrays, cfg, 1)
    assert outcome.aggregate is not None
    assert outcome.clipped == {"client-0": 3}
    by_client = {str(m.content[wire.PRIVACY]["client-id"]): m for m in outcome.replies}
    assert int(by_client["client-0"].content[wire.METRICS][CLIPPED_VALUES]) == 3
    assert int(by_client["client-1"].content[wire.METRICS][CLIPPED_VALUES]) == 0
    # The clipped entries come back as +8 scaled back by weight: the sum is wrong there, and only there.
    expected = _expected([0, 1, 2, 3, 4])
    np.testing.assert_allclose(outcome.aggregate["w"].numpy(), expected["w"], atol=1e-4)
    assert not np.allclose(outcome.aggregate["b"].numpy(), expected["b"], atol=1.0)
