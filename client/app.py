"""The Flower ClientApp: the owner's policy decides, the owner's ledger is charged before release.

The server sends a training config with the global weights. The owner's policy (client/owner_policy.py)
decides what of it is obeyed, checked or overridden; the owner's ledger (client/ledger.py, one per
state folder, locked for the round) is checked against the budget before training and charged with
what really ran before the update leaves. A round the policy does not allow is declined with a
reason the server's report shows. Everything that belongs to one data owner (data, state folder,
policy) comes from the node config, never from the server's message.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpriv.client.owner_id import state_home
from fedpriv.client.owner_policy import OwnerPolicy
from fedpriv.client.privacy_mods import privacy_mods
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import ConfigError, UserInputError

if TYPE_CHECKING:
    from fedpriv.client.ledger import OwnerLedger

# PyTorch, Opacus and SciPy are imported inside train(), not here: Flower's Deployment Runtime starts
# a fresh ClientApp process for every message, and three of SecAgg+'s four messages per round never
# reach train() (2.6 s to load this module instead of 13 s or more on 2 cores).
log = logging.getLogger("fedpriv.client")


def build_client_app(policy: OwnerPolicy | None = None, outer_mods: tuple = (),
                     state_root: Path | None = None) -> ClientApp:
    """A ClientApp enforcing ``policy``, or, when ``None``, the policy in each node's config.

    ``fedpriv simulate`` passes the simulation's own policy and state root (its user owns every
    simulated data set: :func:`simulation_client_app`); the module-level :data:`app` (``fedpriv client``,
    ``flwr run``) reads the node config, where ``fedpriv client`` puts its owner's policy and state
    folder, and falls back to the default policy and a state folder of this machine, never to the
    server's word. ``outer_mods`` run outside the privacy mods (the framework bench's tracing).
    """
    client_app = ClientApp(mods=[*outer_mods, privacy_mods])  # SecAgg+ and central-DP clipping, when a round asks

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_for_owner(msg, context, policy or OwnerPolicy.from_node_config(context.node_config), state_root)

    return client_app


def simulation_client_app(cfg: RunConfig, outer_mods: tuple = ()) -> ClientApp:
    """The ClientApp of a local simulation of ``cfg``: the run's own policy, ledgers in ``RUN_DIR/clients``."""
    if not cfg.run_dir:
        raise ConfigError("a simulation's clients keep their ledgers in the run folder: set run_dir first")
    return build_client_app(OwnerPolicy.of_simulation(cfg), outer_mods, Path(cfg.run_dir) / "clients")


def _state_dir(context: Context, state_root: Path | None, client_id: str) -> Path:
    """Where this owner's ledger lives: its node config, the simulation's run folder, or this machine's default.

    Never the server's message: a server that could name the folder could hand an owner a fresh,
    empty ledger. ``FEDPRIV_STATE_HOME`` (default ``~/.local/state/fedpriv``) holds the ledgers of
    SuperNodes started without ``fedpriv client`` (e.g. under ``flwr run``).
    """
    if wire.NODE_STATE_DIR in context.node_config:
        return Path(str(context.node_config[wire.NODE_STATE_DIR])).expanduser()
    if state_root is not None:
        return state_root / client_id
    return state_home() / "owners" / client_id


def train_for_owner(msg: Message, context: Context, policy: OwnerPolicy, state_root: Path | None = None) -> Message:
    """One round under ``policy``: decline, or train with DP-SGD and charge the ledger before replying."""
    raw = dict(msg.content[wire.CONFIG])
    server_round = int(raw.get(wire.SERVER_ROUND, 0))
    run_id = str(raw.get(wire.RUN_UID, msg.metadata.run_id))
    privacy = {"accountant": policy.accountant, "delta": policy.delta}  # wire.encode_privacy's arguments
    try:
        asked = RunConfig.from_mapping(raw, ignore_unknown=True).validate()
    except UserInputError as exc:
        privacy["client_id"] = str(context.node_config.get(wire.NODE_CLIENT_NAME, f"node-{context.node_id}"))
        return _declined(msg, privacy, f"server sent an invalid training config: {exc}", math.nan)

    from fedpriv.client.ledger import LedgerError, StateDirBusy, locked_ledger
    from fedpriv.client.local_data import local_data

    data = local_data(asked, dict(context.node_config))
    # the data's fingerprint stays in the local ledger: a hash of the records would let the server
    # test a candidate dataset beside the DP noise (tests/test_reply_side_channels.py)
    privacy["client_id"] = data.client_id
    state_dir = _state_dir(context, state_root, data.client_id)
    try:
        with locked_ledger(state_dir, data.client_id) as ledger:
            return _train_locked(msg, context, policy, asked, data, ledger, state_dir, privacy, run_id, server_round)
    except (StateDirBusy, LedgerError) as exc:  # the ledger is left exactly as it is
        log.warning("%s declines round %d: %s", data.client_id, server_round, exc)
        return _declined(msg, privacy, str(exc), math.nan)


def _train_locked(msg: Message, context: Context, policy: OwnerPolicy, asked: RunConfig, data, ledger: OwnerLedger,
                  state_dir: Path, privacy: dict, run_id: str, server_round: int) -> Message:
    import torch

    from fedpriv.client.dp_training import train_round
    from fedpriv.client.ledger import Decline, Release, now
    from fedpriv.common.models import model_from_config

    run = policy.resolve(asked)
    ledger.policy = asdict(policy)
    spent = ledger.epsilon(policy.delta, policy.accountant)
    num_classes, reason = _fit_to_run(msg, data)
    reason = reason or policy.refusal(asked, len(data.x))
    if reason is None and run.dp:
        planned = ledger.epsilon_if(policy.planned(run, len(data.x)), policy.delta, policy.accountant)
        if policy.over_budget(planned):
            reason = (f"round {server_round} would raise epsilon to {planned:.3f} > budget "
                      f"{policy.budget_epsilon:.3f} ({policy.accountant}, delta={policy.delta:g})")
    if reason is not None:
        log.warning("%s declines round %d: %s", data.client_id, server_round, reason)
        ledger.declines.append(Decline(run_id, server_round, now(), reason))
        ledger.save(state_dir)
        return _declined(msg, privacy, reason, spent, ledger)

    if wire.NODE_PARTITION_ID in context.node_config:  # simulated clients share the machine's cores
        torch.set_num_threads(max(1, int(run.client_cpus)))
    model = model_from_config(run, data.input_shape, num_classes)
    model.load_state_dict(msg.content[wire.ARRAYS].to_torch_state_dict())
    result = train_round(model, data.x, data.y, run, ledger.history())
    # train_round composed the ledger's history with this round under the policy's delta and accountant
    # (``run`` carries them); a release without DP anywhere in the ledger leaves no finite epsilon.
    epsilon = math.inf if ledger.released_without_dp() else result.epsilon
    ledger.releases.append(Release(
        run_id=run_id, round=server_round, time=now(), noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate, steps=result.steps, epochs=run.local_epochs, sampling=result.sampling,
        fingerprint=data.fingerprint, records=len(data.x), epsilon=epsilon, accountant=policy.accountant,
        delta=policy.delta))
    ledger.save(state_dir)  # charged before the update leaves this machine
    if run.dp and policy.over_budget(epsilon):  # cannot happen when the plan held; never release past the budget
        reason = f"round {server_round} ran to epsilon {epsilon:.3f} > budget {policy.budget_epsilon:.3f}; update withheld"
        log.error("%s: %s", data.client_id, reason)
        return _declined(msg, privacy, reason, epsilon, ledger)

    noise, rate, steps = result.mechanism or (0.0, result.sample_rate, result.steps)
    record = ConfigRecord(wire.encode_privacy(**privacy, sampling=result.sampling, ledger=_ledger_entries(ledger)))
    metrics = MetricRecord({
        wire.NUM_EXAMPLES: result.num_examples,
        wire.UNIT_WEIGHT: 1,
        wire.DECLINED: 0,
        wire.EPSILON: epsilon,
        wire.STEPS: steps,              # the accountant's entry (for fixed-partition sampling: one per epoch)
        wire.SAMPLE_RATE: rate,
        wire.NOISE_MULTIPLIER: noise,
        wire.OPTIMIZER_STEPS: result.steps,
    })
    if not run.dp:  # a loss over the records, un-noised: only where no privacy is claimed
        metrics[wire.TRAIN_LOSS] = result.train_loss
    content = RecordDict({wire.ARRAYS: ArrayRecord(result.state_dict), wire.METRICS: metrics,
                          wire.PRIVACY: record})
    return Message(content, reply_to=msg)


def _fit_to_run(msg: Message, data) -> tuple[int, str | None]:  # noqa: ANN001 - client.local_data.LocalData
    """The classes to build the model with, and why this owner's records cannot train in this run (or None).

    The run declares its classes and input shape (servers before this did not: then the data's own).
    An owner whose data lacks some classes trains the run's full model; labels beyond the run's
    classes, or records of another shape, are declined with the reason before any training.
    """
    config = msg.content[wire.CONFIG]
    classes = int(config[wire.RUN_CLASSES]) if wire.RUN_CLASSES in config else data.num_classes
    shape = tuple(int(d) for d in config[wire.RUN_INPUT_SHAPE]) if wire.RUN_INPUT_SHAPE in config else None
    from fedpriv.common.datasets import MAX_CLASSES

    if not 0 <= classes <= MAX_CLASSES:  # the owner's machine builds this model: never a server-sized allocation
        return data.num_classes, f"the run declares {classes} classes; this client builds at most {MAX_CLASSES}"
    if shape is not None and shape != tuple(data.input_shape):
        return classes, (f"this owner's records have shape {tuple(data.input_shape)}, but the run's model takes "
                         f"{shape}")
    if data.y is not None and classes and int(data.y.max()) >= classes:
        return classes, (f"this owner's labels go up to {int(data.y.max())}, but the run's model has {classes} classes "
                         f"(0..{classes - 1})")
    return classes, None


def _ledger_entries(ledger: OwnerLedger | None) -> list[tuple[str, int, float, float, int]]:
    """The owner's whole DP history (all runs, interrupted rounds too), so the server's report accounts for it."""
    releases = [(r, m) for r in ledger.releases if (m := r.mechanism()) is not None] if ledger is not None else []
    return [(r.run_id, r.round, m[0], m[1], m[2]) for r, m in releases]


def _declined(msg: Message, privacy: dict, reason: str, epsilon: float,
              ledger: OwnerLedger | None = None) -> Message:
    """A reply that carries no update: the reason, and the owner's spend so far (unchanged by this round)."""
    record = ConfigRecord(wire.encode_privacy(**privacy, decline_reason=reason, ledger=_ledger_entries(ledger)))
    metrics = MetricRecord({wire.NUM_EXAMPLES: 0, wire.DECLINED: 1,
                            wire.EPSILON: epsilon if not math.isnan(epsilon) else 0.0})
    return Message(RecordDict({wire.METRICS: metrics, wire.PRIVACY: record}), reply_to=msg)


app = build_client_app()
