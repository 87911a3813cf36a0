"""The server's round loop: sample, send, validate, aggregate, evaluate, checkpoint, report.

Flower's strategies do the sampling and the aggregation; this loop adds what a private
federation needs around them: per-client privacy records taken from every reply (including
clients that declined for budget), dropping replies and updates the server cannot vouch for and
weighing the rest by its own rule (server/update_validation.py), server-side evaluation on the
held-out test set, and an atomic checkpoint after each round so a restarted server resumes.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedpriv.common import wire
from fedpriv.common.atomic_io import write_json
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import dataset_options, load_dataset
from fedpriv.common.evaluation import evaluate
from fedpriv.common.models import check_fit, model_from_config
from fedpriv.server.central_dp import amplification_holds, release_noise_multiplier
from fedpriv.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, save_final_model
from fedpriv.server.iterate_averaging import IterateAverage
from fedpriv.server.report import RunReport
from fedpriv.server.secure_aggregation import run_secure_round
from fedpriv.server.strategy_factory import build_strategy, optimiser_state, restore_optimiser_state
from fedpriv.server.update_validation import (UpdateLimits, client_records, norm_bit, server_weight, update_limits,
                                      update_problem)

log = logging.getLogger("fedpriv.server")


class RoundObserver(Protocol):
    """Receives progress, e.g. to draw a progress bar; every method is optional."""

    def round_started(self, server_round: int, num_rounds: int, num_clients: int) -> None: ...
    def client_replied(self, server_round: int, replied: int, expected: int) -> None: ...
    def round_finished(self, server_round: int, summary: dict) -> None: ...


class _Silent:
    def round_started(self, server_round: int, num_rounds: int, num_clients: int) -> None:
        pass

    def client_replied(self, server_round: int, replied: int, expected: int) -> None:
        pass

    def round_finished(self, server_round: int, summary: dict) -> None:
        pass


@dataclass
class Sorted:
    """Replies of one round, by what happens to them."""

    accepted: list[Message]
    declined: list[str]
    rejected: dict[str, str]
    missed: list[str]  # sampled but no usable reply: crashed, disconnected or timed out
    decline_reasons: dict[str, str] = field(default_factory=dict)  # the owner's own words, from its policy


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run folder and write the resolved config (the first thing a run leaves behind)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    return run_dir


def run_federation(grid: Grid, cfg: RunConfig, observer: RoundObserver | None = None) -> RunReport:
    """Run ``cfg.num_rounds`` rounds on ``grid`` (resuming from a checkpoint) and return the report."""
    observer = observer or _Silent()
    run_dir = prepare_run_dir(cfg)
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples,
                        **dataset_options(cfg))
    check_fit(cfg.model, data.input_shape, data.labelled, cfg.dataset, cfg.augment_views, cfg.cnn_arch)
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=cfg.seed)
    strategy = build_strategy(cfg)
    client_sizes = client_records(cfg, data)  # the server's own expectation, never a client's claim
    num_params = sum(int(np.prod(v.shape)) for v in model.state_dict().values())

    ckpt = load_checkpoint(run_dir)
    # --server-ema: the server evaluates and releases an average of the iterates (post-processing)
    average = IterateAverage(cfg.server_ema, ckpt.averaged if ckpt else None) if cfg.server_ema else None
    if ckpt is not None:
        model.load_state_dict(ckpt.state_dict)
        report = RunReport.from_dict(ckpt.report)
        first_round = ckpt.server_round + 1
        restore_optimiser_state(strategy, ckpt.optimiser)
        if "clipping_norm" in report.central:
            strategy.clipping_norm = float(report.central["clipping_norm"])
        log.info("resuming %s after round %d", run_dir, ckpt.server_round)
    else:
        report = RunReport(run={"uid": uuid.uuid4().hex[:12], **_run_summary(cfg)}, delta=cfg.delta,
                           accountant=cfg.accountant, dp=cfg.dp)
        first_round = 1
    arrays = ArrayRecord(model.state_dict())
    node_names: dict[int, str] = {}  # Flower node id -> client id, learnt from replies
    # The run uid (kept across server restarts) labels the clients' ledger entries of this run.
    # The run declares its model's classes and input shape, so an owner whose data lacks a class still
    # builds the global model's shape, and one whose records do not fit declines with the reason.
    train_config = ConfigRecord({**cfg.to_dict(kebab=True), wire.RUN_DIR: str(run_dir.resolve()),
                                 wire.RUN_UID: str(report.run["uid"]), wire.RUN_CLASSES: int(data.num_classes),
                                 wire.RUN_INPUT_SHAPE: [int(d) for d in data.input_shape]})

    for server_round in range(first_round, cfg.num_rounds + 1):
        started = time.monotonic()
        population = len(list(grid.get_node_ids()))  # before sampling: conservative for user-level DP
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        observer.round_started(server_round, cfg.num_rounds, len(messages))
        sampled = [m.metadata.dst_node_id for m in messages]
        # This round's clipping norm: adaptive clipping moves it after aggregating.
        limits = update_limits(cfg, num_params, client_sizes, getattr(strategy, "clipping_norm", None))
        if cfg.secure_aggregation:
            secure = run_secure_round(grid, messages, arrays, cfg, server_round)
            observer.client_replied(server_round, len(secure.replies), len(messages))
            replies_sorted = _sort_replies(secure.replies, arrays, sampled, report, server_round, cfg, node_names,
                                           validate_each=False, limits=limits)
            new_arrays = _aggregate_secure(strategy, server_round, secure.aggregate, arrays, limits, replies_sorted)
        else:
            replies, sent = _send_and_receive(grid, messages, cfg.round_timeout,
                                              lambda done: observer.client_replied(server_round, done, len(messages)))
            replies_sorted = _sort_replies(replies, arrays, sampled, report, server_round, cfg, node_names,
                                           limits=limits, sent=sent)
            new_arrays = (strategy.aggregate_train(server_round, replies_sorted.accepted)[0]
                          if replies_sorted.accepted else None)
        if new_arrays is not None:
            arrays = _in_model_dtypes(new_arrays, arrays)
            if cfg.central_dp != "off":
                report.record_central_release(server_round, release_noise_multiplier(strategy, len(replies_sorted.accepted)),
                                              sampled=len(messages), population=max(population, len(messages)),
                                              secret_cohort=amplification_holds(strategy, cfg))
                report.central["clipping_norm"] = strategy.clipping_norm  # adaptive: the next round's, kept for resume
        else:
            log.warning("round %d: no update to aggregate; the global model is unchanged", server_round)
        iterate = arrays.to_torch_state_dict()  # what the clients train on next round
        model.load_state_dict(average.update(iterate) if average else iterate)  # what is evaluated and released
        metrics = evaluate(model, cfg.model, data.x_test, data.y_test)
        participation = {
            "trained": sorted(_client_id(m) for m in replies_sorted.accepted),
            "declined": sorted(replies_sorted.declined),
            "decline_reasons": replies_sorted.decline_reasons,
            "rejected": replies_sorted.rejected,
            "missed": replies_sorted.missed,
            "aggregation": "secagg+" if cfg.secure_aggregation else "plain",
            "seconds": round(time.monotonic() - started, 3),
        }
        if cfg.secure_aggregation:  # client id -> values SecAgg+'s quantiser clipped (only clients that did)
            participation["secagg_clipped"] = secure.clipped
        report.add_round(server_round, metrics, participation)
        save_checkpoint(run_dir, Checkpoint(server_round, iterate, report.to_dict(),
                                            average.state if average else None, optimiser_state(strategy)))
        report.write(run_dir, plots=False)
        observer.round_finished(server_round, {"metrics": metrics, "max_epsilon": report.max_epsilon(), **participation})

    save_final_model(run_dir, average.state if average and average.state else model.state_dict())
    report.write(run_dir, plots=True)
    return report


def _in_model_dtypes(aggregate: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """The aggregate in the global model's own dtypes.

    Server optimisers compute in float64 (Flower's FedAdam returns float64 arrays); the clients' next
    float32 updates would then all fail the dtype check. Casting the global model is post-processing.
    """
    from flwr.app import Array

    out = {}
    for key in aggregate.keys():
        array = aggregate[key].numpy()
        dtype = reference[key].numpy().dtype if key in reference else array.dtype
        out[key] = Array(array.astype(dtype, copy=False))
    return ArrayRecord(out)


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float,
                      on_reply) -> tuple[list[Message], dict[str, int]]:
    """Like ``Grid.send_and_receive`` but reports each reply as it arrives. Also returns the id of
    every message sent, with the node it went to: a reply must answer one of them, from that node."""
    ids = list(grid.push_messages(messages))
    sent = {message_id: m.metadata.dst_node_id for message_id, m in zip(ids, messages)}
    pending = dict(sent)
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(pending)))
        if got:
            replies += got
            # One message per node: a node that replied (even to the wrong message) is done.
            done_ids, done_nodes = {m.metadata.reply_to_message_id for m in got}, {m.metadata.src_node_id for m in got}
            pending = {i: n for i, n in pending.items() if i not in done_ids and n not in done_nodes}
            on_reply(len(replies))
        else:
            time.sleep(0.1)
    return replies, sent


def _ledger_of(msg: Message) -> list[dict] | None:
    """The client's whole ledger as sent in its reply (all runs, interrupted rounds too), if any."""
    return wire.decode_ledger(msg.content[wire.PRIVACY])


def _client_id(msg: Message) -> str:
    return wire.decode_client_id(msg.content[wire.PRIVACY])


def _claimed_id(msg: Message) -> str | None:
    """The client id a reply claims, to name it in logs, or None if it has none."""
    privacy = msg.content.config_records.get(wire.PRIVACY)
    return None if privacy is None or wire.CLIENT_ID not in privacy else wire.decode_client_id(privacy)[:100]


def _training_numbers(metrics: MetricRecord) -> tuple[float, float, int, float]:
    """(noise multiplier, sample rate, steps, epsilon) a client reports of its round: its privacy record.
    They go into the report as the client's own account; nothing the server aggregates depends on them."""
    return (_number(metrics, wire.NOISE_MULTIPLIER), _number(metrics, wire.SAMPLE_RATE),
            int(_number(metrics, wire.STEPS, count=True)), _number(metrics, wire.EPSILON))


def _number(values: MetricRecord, key: str, count: bool = False) -> float:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (count and not math.isfinite(value)):
        raise ValueError(f"'{key}' is {value!r}, not a {'count' if count else 'number'}")
    return value


def _envelope_problem(msg: Message, sampled: list[int], sent: dict[str, int] | None,
                      seen: dict[int, str | None]) -> str | None:
    """Why a reply is not this round's answer from a sampled node: not sampled, a node's second
    reply, a client id another node's reply already claimed (``seen``: node -> claimed id), or (where
    the ids of the messages sent are known) a reply to another round's message or to a message sent
    to another node. None if it is."""
    node = msg.metadata.src_node_id
    if node not in sampled:
        return "the node was not sampled this round"
    if node in seen:
        return "duplicate reply: the node already answered this round"
    claimed = _claimed_id(msg)
    if claimed is not None and claimed in seen.values():
        return f"another node already replied as {claimed} this round"
    if sent is not None:
        if msg.metadata.reply_to_message_id not in sent:
            return "reply to a message not sent this round (another round's, or forged)"
        if sent[msg.metadata.reply_to_message_id] != node:
            return "reply to a message sent to another node"
    return None


def _unreadable(msg: Message) -> str | None:
    """Why the server cannot read the reply's records the way the loop reads them, or None.

    A client writes every value in its reply; none may raise in the round loop (a list where a
    number belongs, a NaN step count, a ledger column that is not a list of numbers)."""
    content = msg.content
    if wire.PRIVACY not in content.config_records or wire.METRICS not in content.metric_records:
        return "reply lacks privacy or metric records"
    try:
        _client_id(msg)
        metrics = content.metric_records[wire.METRICS]
        if not int(_number(metrics, wire.DECLINED, count=True) if wire.DECLINED in metrics else 0):
            _training_numbers(metrics)
            _ledger_of(msg)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        return f"unreadable reply: {type(exc).__name__} {exc}"
    return None


def _aggregation_reply(msg: Message, weight: float, limits: UpdateLimits, reference: ArrayRecord) -> Message:
    """``msg`` as the strategy gets it: the checked update, the server's weight, and nothing else the
    client wrote. Flower's strategies raise on replies whose metric keys differ, weigh by the reply's
    own metric, and (adaptive client-side clipping) count the reply's own norm bit; here the bit is
    read off the update."""
    update = msg.content[wire.ARRAYS]
    metrics = {limits.weight_key: weight}
    if limits.clipped_to is not None:
        metrics[KEY_NORM_BIT] = norm_bit(update, reference, limits)
    msg.content = RecordDict({wire.ARRAYS: update, wire.METRICS: MetricRecord(metrics),
                              wire.PRIVACY: ConfigRecord({wire.CLIENT_ID: _client_id(msg)})})
    return msg


def _sort_replies(replies: Iterable[Message], reference: ArrayRecord, sampled: list[int], report: RunReport,
                  server_round: int, cfg: RunConfig, node_names: dict[int, str], validate_each: bool = True, *,
                  limits: UpdateLimits, sent: dict[str, int] | None = None) -> Sorted:
    """Record every reply's privacy spend, then keep only well-formed updates for aggregation.

    A reply that is not this round's from a sampled node, or that cannot be read, is dropped first
    (``sent``: the ids of the messages sent and their nodes, where known). An update is accepted
    within ``limits`` (norm, weight), at the server's weight (see ``_aggregation_reply``). Each reply
    dropped or corrected gets one log line naming the client and the reason. Under secure
    aggregation replies carry no update (``validate_each=False``): only the sum is checked.
    """
    replies = list(replies)
    accepted, declined, rejected, reasons = [], [], {}, {}
    answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
    missed = [node_names.get(n, f"node-{n}") for n in sampled if n not in answered]
    seen: dict[int, str | None] = {}  # node -> client id, of the replies read this round
    for msg in replies:
        if msg.has_error():
            log.warning("round %d: node %s failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
            continue
        node = msg.metadata.src_node_id
        label = node_names.get(node, f"node-{node}")  # a reply not this round's cannot name itself
        problem = _envelope_problem(msg, sampled, sent, seen)
        if problem is None and (problem := _unreadable(msg)):
            label = node_names.get(node) or _claimed_id(msg) or label
        if problem:
            rejected[f"{label} (duplicate)" if node in seen else label] = problem
            log.warning("round %d: dropped reply of %s: %s", server_round, label, problem)
            continue
        seen[node] = _claimed_id(msg)
        try:
            client = _client_id(msg)
            metrics = msg.content[wire.METRICS]
        except (KeyError, wire.WireError):
            rejected[f"node-{msg.metadata.src_node_id}"] = "reply lacks privacy or metric records"
            continue
        node_names[msg.metadata.src_node_id] = client
        if int(metrics.get(wire.DECLINED, 0)):
            declined.append(client)
            reasons[client] = str(msg.content[wire.PRIVACY].get(wire.DECLINE_REASON, "privacy budget"))[:500]
            log.warning("round %d: %s declined: %s", server_round, client, reasons[client])
            continue
        # The client trained: its privacy is spent whether or not its update is usable.
        report.record_training(client, server_round, *_training_numbers(metrics), ledger=_ledger_of(msg))
        problem, weight, correction = None, 1.0, None
        if validate_each:
            update = msg.content.array_records.get(wire.ARRAYS)
            problem = (update_problem(update, reference, limits.max_norm) if update is not None
                       else "reply carries no model update")
            if problem is None:
                weight, correction = server_weight(metrics, limits)
                problem = correction if weight is None else None
        if problem:
            rejected[client] = problem
            log.warning("round %d: dropped update of %s: %s", server_round, client, problem)
            continue
        if correction:
            log.warning("round %d: weight of %s corrected: %s", server_round, client, correction)
        accepted.append(_aggregation_reply(msg, weight, limits, reference) if validate_each else msg)
    for name in missed:
        log.warning("round %d: no usable reply from %s", server_round, name)
    return Sorted(accepted, declined, rejected, sorted(missed), reasons)


def _aggregate_secure(strategy: Strategy, server_round: int, aggregate: ArrayRecord | None, reference: ArrayRecord,
                      limits: UpdateLimits, replies_sorted: Sorted) -> ArrayRecord | None:
    """Hand the unmasked SecAgg+ average to the strategy as the one reply it aggregates (FedAdam steps on it)."""
    if aggregate is None:
        log.warning("round %d: secure aggregation halted (fewer live clients than its threshold)", server_round)
        return None
    if not replies_sorted.accepted:
        return None  # every client declined: the masked sum carries weight 0
    # A weighted mean of updates is no longer than the longest: the per-client bound holds for it.
    problem = update_problem(aggregate, reference, limits.max_norm)
    if problem:
        log.warning("round %d: dropped the securely aggregated update: %s", server_round, problem)
        return None
    metrics = MetricRecord({wire.NUM_EXAMPLES: 1, wire.UNIT_WEIGHT: 1})
    reply = Message(RecordDict({wire.ARRAYS: aggregate, wire.METRICS: metrics}), dst_node_id=0,
                    message_type=MessageType.TRAIN)
    return strategy.aggregate_train(server_round, [reply])[0]


def _run_summary(cfg: RunConfig) -> dict:
    return {"model": cfg.model, "dataset": cfg.dataset, "clients": cfg.num_clients, "rounds": cfg.num_rounds,
            "strategy": cfg.strategy, "partitioning": cfg.partitioning, "dp": cfg.dp,
            "noise_multiplier": cfg.noise_multiplier if cfg.dp else None,
            "max_grad_norm": cfg.max_grad_norm if cfg.dp else None, "secure_mode": cfg.secure_mode,
            "secure_aggregation": cfg.secure_aggregation, "central_dp": cfg.central_dp,
            **_privacy_options(cfg)}


def _privacy_options(cfg: RunConfig) -> dict:
    """The settings behind the report's secure-aggregation and user-level guarantees."""
    options: dict = {}
    if cfg.secure_aggregation:
        options["secagg_shares"], options["secagg_threshold"] = cfg.secagg_parameters(cfg.clients_per_round())
    if cfg.central_dp != "off":
        options.update(central_noise_multiplier=cfg.central_noise_multiplier,
                       central_clipping_norm=cfg.central_clipping_norm)
    return options
