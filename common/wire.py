"""The wire protocol between ServerApp and ClientApp: every record and key both sides agree on.

One place for the names of a Flower message's records, of the keys in them (the training config
the server sends, the metrics and the privacy record a client replies with, the node config a
SuperNode hands its ClientApp), and for the encoding of the client's privacy record: the client
writes it with :func:`encode_privacy`, every reader takes it apart with :func:`decode_privacy` (or
its parts, :func:`decode_client_id` and :func:`decode_ledger`). A malformed record raises
:class:`WireError` (a ``ValueError``) naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# ----------------------------------------------------------------- records of a message
ARRAYS = "arrays"          # ArrayRecord: model weights (global in, local out)
CONFIG = "config"          # ConfigRecord: the run's training config, kebab-case keys
METRICS = "metrics"        # MetricRecord: num-examples, train-loss, privacy numbers
PRIVACY = "privacy"        # ConfigRecord: client id, accountant, decline reason, ledger

# ------------------------------------------------- CONFIG (server -> client), besides RunConfig's kebab keys
SERVER_ROUND = "server-round"            # set by Flower's strategies
RUN_UID = "run-uid"                      # the run's uid (kept across server restarts): labels ledger entries
RUN_DIR = "run-dir"                      # RunConfig.run_dir, sent resolved: the server's run folder
RUN_CLASSES = "run-num-classes"          # the global model's classes (0 for the autoencoder)
RUN_INPUT_SHAPE = "run-input-shape"      # the global model's input shape, channels first
ARRAY_NAMES = "array-names"              # SecAgg+ fit config: legacy Parameters carry no names
CENTRAL_DP = "central-dp"                # RunConfig.central_dp, kebab-case (read by the client's mods)

# --------------------------------------------------------------- METRICS (client -> server)
NUM_EXAMPLES = "num-examples"  # the client's own count; the server weighs by it only within its own range
DECLINED = "declined"
UNIT_WEIGHT = "unit-weight"  # central DP's equal weights (sensitivity C/m); the server sets 1 itself, whatever a reply says
SECAGG_CLIPPED = "secagg-clipped"  # values SecAgg+'s quantiser clipped in this reply (client/secagg_guard.py)
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
STEPS = "steps"                    # the accountant's entry (for fixed-partition sampling: one per epoch)
SAMPLE_RATE = "sample-rate"
NOISE_MULTIPLIER = "noise-multiplier"
OPTIMIZER_STEPS = "optimizer-steps"

# --------------------------------------------------------------- PRIVACY (client -> server)
CLIENT_ID = "client-id"
ACCOUNTANT = "accountant"
DELTA = "delta"
FINGERPRINT = "fingerprint"
SAMPLING = "sampling"
DECLINE_REASON = "decline-reason"
LEDGER_RUN = "ledger-run"          # the owner's whole DP history, one column per field
LEDGER_ROUND = "ledger-round"
LEDGER_NOISE = "ledger-noise"
LEDGER_RATE = "ledger-rate"
LEDGER_STEPS = "ledger-steps"
LEDGER_COLUMNS = (LEDGER_RUN, LEDGER_ROUND, LEDGER_NOISE, LEDGER_RATE, LEDGER_STEPS)

# ------------------------------------------------ node config (SuperNode -> its ClientApp, never the server)
NODE_STATE_DIR = "state-dir"
NODE_CLIENT_NAME = "client-name"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_PATH = "data-path"

RECORD_NAMES = (ARRAYS, CONFIG, METRICS, PRIVACY)
CONFIG_KEYS = (SERVER_ROUND, RUN_UID, RUN_DIR, RUN_CLASSES, RUN_INPUT_SHAPE, ARRAY_NAMES, CENTRAL_DP)
METRIC_KEYS = (NUM_EXAMPLES, DECLINED, UNIT_WEIGHT, SECAGG_CLIPPED, TRAIN_LOSS, EPSILON, STEPS, SAMPLE_RATE,
               NOISE_MULTIPLIER, OPTIMIZER_STEPS)
PRIVACY_KEYS = (CLIENT_ID, ACCOUNTANT, DELTA, FINGERPRINT, SAMPLING, DECLINE_REASON, *LEDGER_COLUMNS)
NODE_KEYS = (NODE_STATE_DIR, NODE_CLIENT_NAME, NODE_PARTITION_ID, NODE_NUM_PARTITIONS, NODE_DATA_PATH)
ALL_KEYS = frozenset((*RECORD_NAMES, *CONFIG_KEYS, *METRIC_KEYS, *PRIVACY_KEYS, *NODE_KEYS))


class WireError(ValueError):
    """A record in a message that does not follow this protocol."""


@dataclass(frozen=True)
class LedgerEntry:
    """One DP release of the owner's ledger, as it travels in the privacy record."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def to_dict(self) -> dict:
        return {"run": self.run, "round": self.round, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps}


@dataclass(frozen=True)
class PrivacyRecord:
    """A client's privacy record, decoded."""

    client_id: str
    accountant: str | None = None
    delta: float | None = None
    fingerprint: str | None = None
    sampling: str | None = None
    decline_reason: str | None = None
    ledger: list[dict] | None = None  # LedgerEntry.to_dict() of each release, None when the record has none


def encode_privacy(*, client_id: str, accountant: str, delta: float, fingerprint: str | None = None,
                   sampling: str | None = None, decline_reason: str | None = None,
                   ledger: Iterable[tuple[str, int, float, float, int]] = ()) -> dict[str, Any]:
    """The items of a client's privacy record (wrap them in a ``ConfigRecord``).

    ``ledger``: the owner's DP releases as (run id, round, noise multiplier, sample rate, steps);
    none leaves the ledger columns out, as a client with no DP release sends.
    """
    items: dict[str, Any] = {ACCOUNTANT: accountant, DELTA: delta, CLIENT_ID: str(client_id)}
    if fingerprint is not None:
        items[FINGERPRINT] = fingerprint
    entries = list(ledger)
    if entries:
        items.update({LEDGER_RUN: [str(e[0]) for e in entries], LEDGER_ROUND: [e[1] for e in entries],
                      LEDGER_NOISE: [e[2] for e in entries], LEDGER_RATE: [e[3] for e in entries],
                      LEDGER_STEPS: [e[4] for e in entries]})
    if sampling is not None:
        items[SAMPLING] = sampling
    if decline_reason is not None:
        items[DECLINE_REASON] = decline_reason
    return items


def decode_client_id(privacy: Mapping[str, Any]) -> str:
    """The client id a privacy record names; :class:`WireError` when it names none."""
    if CLIENT_ID not in privacy:
        raise WireError(f"privacy record lacks '{CLIENT_ID}'")
    return str(privacy[CLIENT_ID])


def decode_ledger(privacy: Mapping[str, Any]) -> list[dict] | None:
    """The owner's ledger a privacy record carries (``LedgerEntry.to_dict()`` each), or None if it carries none.

    Every column must be there, a list, of the same length, of numbers where numbers belong."""
    if LEDGER_STEPS not in privacy:
        return None
    missing = [k for k in LEDGER_COLUMNS if k not in privacy]
    if missing:
        raise WireError(f"privacy record's ledger lacks {', '.join(repr(k) for k in missing)}")
    columns = [privacy[k] for k in LEDGER_COLUMNS]
    for key, column in zip(LEDGER_COLUMNS, columns):
        if isinstance(column, (str, bytes)) or not isinstance(column, (list, tuple)):
            raise WireError(f"privacy record's '{key}' is {type(column).__name__}, not a list")
    if len({len(c) for c in columns}) > 1:
        raise WireError("privacy record's ledger columns differ in length: "
                        + ", ".join(f"{k}={len(c)}" for k, c in zip(LEDGER_COLUMNS, columns)))
    entries = []
    for r, n, z, q, t in zip(*columns):
        for key, value in ((LEDGER_ROUND, n), (LEDGER_NOISE, z), (LEDGER_RATE, q), (LEDGER_STEPS, t)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WireError(f"privacy record's '{key}' holds {value!r}, not a number")
        if not math.isfinite(n) or not math.isfinite(t):
            raise WireError(f"privacy record's ledger holds a round or step count that is not finite ({n!r}, {t!r})")
        entries.append(LedgerEntry(r, int(n), float(z), float(q), int(t)).to_dict())
    return entries


def decode_privacy(privacy: Mapping[str, Any]) -> PrivacyRecord:
    """A client's privacy record, checked; :class:`WireError` names what is malformed."""
    def optional(key: str, kind: type) -> Any:
        return kind(privacy[key]) if key in privacy else None

    try:
        delta = optional(DELTA, float)
    except (TypeError, ValueError):
        raise WireError(f"privacy record's '{DELTA}' is {privacy[DELTA]!r}, not a number") from None
    return PrivacyRecord(client_id=decode_client_id(privacy), accountant=optional(ACCOUNTANT, str), delta=delta,
                         fingerprint=optional(FINGERPRINT, str), sampling=optional(SAMPLING, str),
                         decline_reason=optional(DECLINE_REASON, str), ledger=decode_ledger(privacy))
