"""Flower's SecAgg+ client mod, with the checks that keep a lying server from unmasking one client.

SecAgg+ (Flower's ``secaggplus_mod``) double-masks each client's quantised update: a private mask
from a seed ``b`` and pairwise masks from a key ``sk1``, both Shamir-shared among the client's
neighbours. In the unmask stage each client returns, for the node lists the server sends, a share
of ``b`` for every node listed *active* and a share of ``sk1`` for every node listed *dropped*.
Flower's client answers whatever lists arrive. A server that lists a target as both active and
dropped collects ``threshold`` shares of both secrets, strips every mask off the target's masked
vector and reads its update in the clear, with no colluding client
(tests/test_secagg_guard.py replays this with Flower's own stage functions).

``guarded_secaggplus_mod`` runs Flower's mod unchanged (no cryptography here) and first checks
each stage against what this client saw in the earlier stages of the same round, kept in the
Context's state as Flower keeps its own:

- setup: ``2 * threshold > shares``. Each neighbour answers at most one unmask request per round
  (below), so it reveals at most one of a node's two shares. With more than half the shares
  needed for each secret, no split of the neighbours into "told active" and "told dropped"
  yields both secrets of one node, even if the server tells different neighbours different stories.
- share keys: the neighbour set holds this client and at most ``shares`` nodes.
- collect masked vectors: the ciphertexts come from distinct nodes of that neighbour set.
- unmask: no node twice, none both active and dropped, none outside the neighbour set; this
  client itself is active; and active + dropped are exactly this client and the nodes it got
  shares from (every node whose mask is in its vector is accounted for, and only those).

A check that fails answers with an error reply (``MOD_FAILED_PRECONDITION``) instead of any
share, deletes Flower's SecAgg+ state (keys and the shares it holds, so no later message can
reveal them) and refuses every further message of the round until the next setup stage. An honest
``SecAggPlusWorkflow`` never trips a check: its lists satisfy all of them, dropout recovery included.

What this does not defend: the server relays the public keys. A server that hands a target keys
it made itself (posing as its neighbours) receives the target's shares and unmasks it; nothing a
client can check locally detects that without authenticated keys (a PKI), which Flower's SecAgg+
does not have. Secure aggregation therefore still assumes the server relays keys honestly (an
honest-but-curious server); the checks remove the attacks that need only lying about dropouts.

Quantisation: SecAgg+ scales each value by weight / max_weight and clips it to
``[-clipping_range, clipping_range]`` before quantising, silently. The collect stage counts the
values it clips, exactly as Flower's quantiser will, and reports the count in the reply's metrics
(``CLIPPED_VALUES``, sent in the clear beside the masked vector like the other metrics); the
server reports it per round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedpriv.common import wire

log = logging.getLogger("fedpriv.client")

GUARD_STATE = "fedpriv.secaggplus-guard"  # ConfigRecord in the Context's state, beside Flower's own
CLIPPED_VALUES = wire.SECAGG_CLIPPED  # reply metric: values SecAgg+'s quantiser clipped this round
REFUSED = "refused"  # guard stage after a refusal: nothing more this round


def guarded_secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod``, refusing any stage inconsistent with the earlier ones of its round."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        guard = ConfigRecord({"stage": ""})  # a new round: forget the last one, as Flower's setup does
    else:
        guard = ctxt.state.config_records.get(GUARD_STATE, ConfigRecord({"stage": ""}))
    nid = msg.metadata.dst_node_id
    try:
        problem = _problem(stage, configs, guard, nid)
        seen = {} if problem else _observe(stage, configs)
    except (TypeError, ValueError, KeyError) as exc:  # a malformed list: refuse it, don't guess
        problem, seen = f"malformed {stage} message ({exc.__class__.__name__}: {exc})", {}
    if problem:
        return _refuse(msg, ctxt, guard, nid, str(stage), problem)
    inner = _counting_clipped(call_next, guard) if stage == Stage.COLLECT_MASKED_VECTORS else call_next
    reply = secaggplus_mod(msg, ctxt, inner)
    if not reply.has_error():
        guard.update(seen)
        guard["stage"] = str(stage)
        ctxt.state.config_records[GUARD_STATE] = guard
    return reply


def _problem(stage: object, configs: ConfigRecord, guard: ConfigRecord, nid: int) -> str | None:
    """Why this stage must not be answered, or None. Flower's own type checks run after this."""
    if stage == Stage.SETUP:
        shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
        if isinstance(shares, int) and isinstance(threshold, int) and not 2 * threshold > shares:
            return (f"the threshold ({threshold}) must exceed half the shares ({shares}): otherwise a server "
                    "telling some neighbours a node is active and others that it dropped gets both of its secrets")
        return None
    if guard["stage"] == REFUSED:
        return f"this client refused earlier in this round ({guard['reason']}); it answers again after a new setup"
    stages = Stage.all()
    expected = stages[stages.index(guard["stage"]) + 1] if guard["stage"] in stages[:-1] else Stage.SETUP
    if stage != expected:
        return f"expected the {expected} stage, got {stage}"
    if stage == Stage.SHARE_KEYS:
        neighbours = {int(k) for k in configs if k != Key.STAGE}
        if nid not in neighbours:
            return "the neighbour set omits this client"
        if len(neighbours) > int(guard[Key.SHARE_NUMBER]):
            return f"{len(neighbours)} neighbours for {guard[Key.SHARE_NUMBER]} shares"
        return None
    neighbours = set(guard["neighbours"])
    if stage == Stage.COLLECT_MASKED_VECTORS:
        sources = [int(s) for s in configs[Key.SOURCE_LIST]]
        if len(set(sources)) != len(sources):
            return f"a source sent shares twice: {sorted(sources)}"
        if outside := sorted(set(sources) - (neighbours - {nid})):
            return f"shares from nodes outside its neighbour set: {outside}"
        return None
    # Stage.UNMASK
    active = [int(n) for n in configs[Key.ACTIVE_NODE_ID_LIST]]
    dead = [int(n) for n in configs[Key.DEAD_NODE_ID_LIST]]
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        return f"a node listed twice (active {sorted(active)}, dropped {sorted(dead)})"
    if both := sorted(set(active) & set(dead)):
        return f"nodes both active and dropped: {both}"
    if outside := sorted((set(active) | set(dead)) - neighbours):
        return f"nodes outside its neighbour set: {outside}"
    if nid in dead or nid not in active:
        return "the server lists this client itself as dropped, or not as active"
    masked_with = set(guard["sources"]) | {nid}
    if dead_unknown := sorted(set(dead) - masked_with):
        return f"nodes dropped that never sent it shares: {dead_unknown}"
    if active_unknown := sorted(set(active) - masked_with):
        return f"nodes active that never sent it shares: {active_unknown}"
    if missing := sorted(masked_with - set(active) - set(dead)):
        return f"nodes it got shares from listed neither active nor dropped: {missing}"
    return None


def _observe(stage: object, configs: ConfigRecord) -> dict:
    """What later stages are checked against (read before Flower's mod consumes the message)."""
    if stage == Stage.SETUP:
        return {k: configs[k] for k in (Key.SHARE_NUMBER, Key.THRESHOLD, Key.CLIPPING_RANGE, Key.TARGET_RANGE,
                                        Key.MAX_WEIGHT)}
    if stage == Stage.SHARE_KEYS:
        return {"neighbours": sorted(int(k) for k in configs if k != Key.STAGE)}
    if stage == Stage.COLLECT_MASKED_VECTORS:
        return {"sources": [int(s) for s in configs[Key.SOURCE_LIST]]}
    return {}


def _refuse(msg: Message, ctxt: Context, guard: ConfigRecord, nid: int, stage: str, problem: str) -> Message:
    """Answer with an error and no share; forget Flower's secrets so nothing of this round can leak later."""
    log.warning("node %s refuses SecAgg+ %s stage: %s", nid, stage, problem)
    ctxt.state.config_records.pop(RECORD_KEY_STATE, None)
    guard["stage"], guard["reason"] = REFUSED, problem
    ctxt.state.config_records[GUARD_STATE] = guard
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"SecAgg+ {stage} refused: {problem}"),
                   reply_to=msg)


def clipped_count(arrays: list[np.ndarray], weight: float, clipping_range: float, target_range: int,
                  max_weight: float) -> int:
    """How many values Flower's quantiser clips: it scales by the quantised weight ratio, then clips."""
    scale = round(weight / max_weight * target_range) / target_range
    return int(sum(np.count_nonzero(~(np.abs(np.asarray(a, dtype=np.float64) * scale) <= clipping_range))
                   for a in arrays))


def _counting_clipped(call_next: ClientAppCallable, guard: ConfigRecord) -> Callable[[Message, Context], Message]:
    """Add CLIPPED_VALUES to the training reply SecAgg+ is about to quantise."""

    def call(msg: Message, ctxt: Context) -> Message:
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        clipped = clipped_count(parameters_to_ndarrays(fitres.parameters), fitres.num_examples,
                                float(guard[Key.CLIPPING_RANGE]), int(guard[Key.TARGET_RANGE]),
                                float(guard[Key.MAX_WEIGHT]))
        if clipped:
            log.warning("SecAgg+ clips %d values of this update to +-%g (after scaling by weight / max weight)",
                        clipped, float(guard[Key.CLIPPING_RANGE]))
        metrics = reply.content.metric_records.get(wire.METRICS)
        if metrics is None:
            reply.content.metric_records[wire.METRICS] = metrics = MetricRecord({})
        metrics[CLIPPED_VALUES] = clipped
        return reply

    return call
