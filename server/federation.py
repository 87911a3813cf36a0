"""The server's round loop: sample, send, validate, aggregate, evaluate, checkpoint, report.

Flower's strategies do the sampling and the aggregation; this loop adds what a private
federation needs around them: per-client privacy records taken from every reply (including
clients that declined for budget), dropping malformed updates, server-side evaluation on the
held-out test set, and an atomic checkpoint after each round so a restarted server resumes.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import records
from common.atomic_io import write_json
from common.config import RunConfig
from common.datasets import load_dataset
from common.evaluation import evaluate
from common.models import check_fit, model_from_config
from server.central_dp import amplification_holds, release_noise_multiplier
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, save_final_model
from server.report import RunReport
from server.secure_aggregation import run_secure_round
from server.strategy_factory import build_strategy
from server.update_validation import dp_update_bound, update_problem

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
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples)
    check_fit(cfg.model, data.input_shape, data.labelled, cfg.dataset)
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=cfg.seed)
    strategy = build_strategy(cfg)

    ckpt = load_checkpoint(run_dir)
    if ckpt is not None:
        model.load_state_dict(ckpt.state_dict)
        report = RunReport.from_dict(ckpt.report)
        first_round = ckpt.server_round + 1
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
    train_config = ConfigRecord({**cfg.to_dict(kebab=True), "run-dir": str(run_dir.resolve()),
                                 "run-uid": str(report.run["uid"])})

    for server_round in range(first_round, cfg.num_rounds + 1):
        started = time.monotonic()
        population = len(list(grid.get_node_ids()))  # before sampling: conservative for user-level DP
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        observer.round_started(server_round, cfg.num_rounds, len(messages))
        sampled = [m.metadata.dst_node_id for m in messages]
        if cfg.secure_aggregation:
            secure = run_secure_round(grid, messages, arrays, cfg, server_round)
            observer.client_replied(server_round, len(secure.replies), len(messages))
            replies_sorted = _sort_replies(secure.replies, arrays, sampled, report, server_round, cfg, node_names,
                                           validate_each=False)
            new_arrays = _aggregate_secure(strategy, server_round, secure.aggregate, arrays, cfg, replies_sorted)
        else:
            replies = _send_and_receive(grid, messages, cfg.round_timeout,
                                        lambda done: observer.client_replied(server_round, done, len(messages)))
            replies_sorted = _sort_replies(replies, arrays, sampled, report, server_round, cfg, node_names)
            new_arrays = (strategy.aggregate_train(server_round, replies_sorted.accepted)[0]
                          if replies_sorted.accepted else None)
        if new_arrays is not None:
            arrays = new_arrays
            if cfg.central_dp != "off":
                report.record_central_release(server_round, release_noise_multiplier(strategy, len(replies_sorted.accepted)),
                                              sampled=len(messages), population=max(population, len(messages)),
                                              secret_cohort=amplification_holds(strategy, cfg))
                report.central["clipping_norm"] = strategy.clipping_norm  # adaptive: the next round's, kept for resume
        else:
            log.warning("round %d: no update to aggregate; the global model is unchanged", server_round)
        model.load_state_dict(arrays.to_torch_state_dict())
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
        save_checkpoint(run_dir, Checkpoint(server_round, model.state_dict(), report.to_dict()))
        report.write(run_dir, plots=False)
        observer.round_finished(server_round, {"metrics": metrics, "max_epsilon": report.max_epsilon(), **participation})

    save_final_model(run_dir, model.state_dict())
    report.write(run_dir, plots=True)
    return report


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float, on_reply) -> list[Message]:
    """Like ``Grid.send_and_receive`` but reports each reply as it arrives."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        if got:
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            on_reply(len(replies))
        else:
            time.sleep(0.1)
    return replies


def _ledger_of(msg: Message) -> list[dict] | None:
    """The client's whole ledger as sent in its reply (all runs, interrupted rounds too), if any."""
    privacy = msg.content[records.PRIVACY]
    if "ledger-steps" not in privacy:
        return None
    columns = [privacy[k] for k in ("ledger-run", "ledger-round", "ledger-noise", "ledger-rate", "ledger-steps")]
    return [{"run": r, "round": int(n), "noise_multiplier": float(z), "sample_rate": float(q), "steps": int(t)}
            for r, n, z, q, t in zip(*columns)]


def _client_id(msg: Message) -> str:
    return str(msg.content[records.PRIVACY]["client-id"])


def _max_norm(cfg: RunConfig, reference: ArrayRecord, metrics) -> float | None:
    if not cfg.dp:
        return None  # without clipping there is no bound to hold an update to
    num_params = sum(int(np.prod(reference[k].shape)) for k in reference.keys())
    return dp_update_bound(num_params, int(metrics["steps"]), cfg.learning_rate, cfg.momentum, cfg.max_grad_norm,
                           cfg.noise_multiplier, cfg.batch_size)


def _sort_replies(replies: Iterable[Message], reference: ArrayRecord, sampled: list[int], report: RunReport,
                  server_round: int, cfg: RunConfig, node_names: dict[int, str], validate_each: bool = True) -> Sorted:
    """Record every reply's privacy spend, then keep only well-formed updates for aggregation.

    Under secure aggregation replies carry no update (``validate_each=False``): only the sum is checked.
    """
    replies = list(replies)
    accepted, declined, rejected, reasons = [], [], {}, {}
    answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
    missed = [node_names.get(n, f"node-{n}") for n in sampled if n not in answered]
    for msg in replies:
        if msg.has_error():
            log.warning("round %d: node %s failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
            continue
        try:
            client = _client_id(msg)
            metrics = msg.content[records.METRICS]
        except KeyError:
            rejected[f"node-{msg.metadata.src_node_id}"] = "reply lacks privacy or metric records"
            continue
        node_names[msg.metadata.src_node_id] = client
        if int(metrics.get(records.DECLINED, 0)):
            declined.append(client)
            reasons[client] = str(msg.content[records.PRIVACY].get("decline-reason", "privacy budget"))[:500]
            log.warning("round %d: %s declined: %s", server_round, client, reasons[client])
            continue
        # The client trained: its privacy is spent whether or not its update is usable.
        report.record_training(client, server_round, float(metrics["noise-multiplier"]),
                               float(metrics["sample-rate"]), int(metrics["steps"]), float(metrics["epsilon"]),
                               ledger=_ledger_of(msg))
        problem = None
        if validate_each:
            problem = (update_problem(msg.content[records.ARRAYS], reference, _max_norm(cfg, reference, metrics))
                       if records.ARRAYS in msg.content.array_records else "reply carries no model update")
        if problem:
            rejected[client] = problem
            log.warning("round %d: dropped update of %s: %s", server_round, client, problem)
            continue
        accepted.append(msg)
    for name in missed:
        log.warning("round %d: no usable reply from %s", server_round, name)
    return Sorted(accepted, declined, rejected, sorted(missed), reasons)


def _aggregate_secure(strategy: Strategy, server_round: int, aggregate: ArrayRecord | None, reference: ArrayRecord,
                      cfg: RunConfig, replies_sorted: Sorted) -> ArrayRecord | None:
    """Hand the unmasked SecAgg+ average to the strategy as the one reply it aggregates (FedAdam steps on it)."""
    if aggregate is None:
        log.warning("round %d: secure aggregation halted (fewer live clients than its threshold)", server_round)
        return None
    if not replies_sorted.accepted:
        return None  # every client declined: the masked sum carries weight 0
    steps = max(int(m.content[records.METRICS]["steps"]) for m in replies_sorted.accepted)
    problem = update_problem(aggregate, reference, _max_norm(cfg, reference, {"steps": steps}))
    if problem:
        log.warning("round %d: dropped the securely aggregated update: %s", server_round, problem)
        return None
    metrics = MetricRecord({records.NUM_EXAMPLES: 1, records.UNIT_WEIGHT: 1})
    reply = Message(RecordDict({records.ARRAYS: aggregate, records.METRICS: metrics}), dst_node_id=0,
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
