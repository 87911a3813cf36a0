"""Privacy accounting on top of Opacus' accountants, and the per-client privacy ledger.

The ledger is the persistent form of an accountant's history: one entry per round a client
trained in, with the mechanism's parameters and steps. Epsilon is always recomputed from the
whole history, so it composes over every local step of every round, across runs and restarts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.atomic_io import read_json, write_json
from common.errors import UserInputError

LEDGER_VERSION = 1
Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus' history format


def make_accountant(name: str) -> IAccountant:
    """An empty Opacus accountant by its short name."""
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise UserInputError(f"--accountant '{name}' is unknown; choose one of: rdp, prv")


def epsilon_for(history: Iterable[Mechanism], delta: float, accountant: str) -> float:
    """Epsilon of the composition of every (noise, rate, steps) entry; 0 for an empty history.

    RDP is computed exactly as Opacus' ``RDPAccountant`` does (same orders, same analysis), but
    the per-step RDP curve of each (noise, rate) pair is cached and scaled by the step count:
    RDP composes additively, so this is the same number, without Opacus' ~1 s per call.
    """
    history = [(float(n), float(q), int(s)) for n, q, s in history if int(s) > 0]
    if not history:
        return 0.0
    if accountant == "rdp":
        rdp = sum(steps * _rdp_per_step(q, sigma) for sigma, q, steps in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return float(eps)
    acc = make_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@lru_cache(maxsize=1024)
def _rdp_per_step_cached(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    return tuple(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                          orders=list(RDP_ORDERS)))


def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    return np.asarray(_rdp_per_step_cached(sample_rate, noise_multiplier))


@dataclass
class LedgerEntry:
    """One round of local training: what was released and under which mechanism."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # cumulative epsilon after this entry

    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class PrivacyLedger:
    """A client's privacy history, stored atomically as JSON in its state folder."""

    client_id: str
    accountant: str
    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)

    def history(self) -> list[Mechanism]:
        return [e.mechanism() for e in self.entries]

    def epsilon(self) -> float:
        return epsilon_for(self.history(), self.delta, self.accountant)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """The cumulative epsilon after one more round with these parameters."""
        return epsilon_for(self.history() + [(noise_multiplier, sample_rate, steps)], self.delta, self.accountant)

    def has_round(self, run_id: str, server_round: int) -> bool:
        return any(e.run_id == run_id and e.round == server_round for e in self.entries)

    def to_dict(self) -> dict:
        return {
            "version": LEDGER_VERSION,
            "client_id": self.client_id,
            "accountant": self.accountant,
            "delta": self.delta,
            "entries": [asdict(e) for e in self.entries],
        }

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load_or_create(cls, path: Path, client_id: str, accountant: str, delta: float) -> "PrivacyLedger":
        """Load a ledger; a new one if absent. A damaged or mismatching ledger is an error, never reset."""
        if not path.exists():
            return cls(client_id=client_id, accountant=accountant, delta=delta)
        ledger = cls.load(path)
        if ledger.accountant != accountant or not math.isclose(ledger.delta, delta):
            raise UserInputError(
                f"privacy ledger {path} was kept with accountant={ledger.accountant}, delta={ledger.delta}; "
                f"this run asks for accountant={accountant}, delta={delta}: use the ledger's settings"
            )
        return ledger

    @classmethod
    def load(cls, path: Path) -> "PrivacyLedger":
        """Read a stored ledger as it is; a damaged one is a one-line error, never reset."""
        try:
            data = read_json(path)
            entries = [_checked_entry(e) for e in data["entries"]]
            ledger = cls(client_id=str(data["client_id"]), accountant=str(data["accountant"]),
                         delta=float(data["delta"]), entries=entries)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise UserInputError(
                f"privacy ledger {path} is corrupted ({exc.__class__.__name__}); restore it from backup — "
                "it is never reset automatically, since that would forget spent privacy"
            ) from None
        return ledger


def _checked_entry(raw: dict) -> LedgerEntry:
    """A ledger entry with every field of the right type and range (else ValueError)."""
    entry = LedgerEntry(run_id=str(raw["run_id"]), round=int(raw["round"]),
                        noise_multiplier=float(raw["noise_multiplier"]), sample_rate=float(raw["sample_rate"]),
                        steps=int(raw["steps"]), epsilon=float(raw["epsilon"]))
    if entry.steps < 0 or not 0 < entry.sample_rate <= 1 or not entry.noise_multiplier > 0:
        raise ValueError(f"entry out of range: {raw}")
    return entry


def data_fingerprint(*arrays) -> str:
    """A short, stable fingerprint of a client's data: its ledger's key across runs."""
    digest = hashlib.sha256()
    for arr in arrays:
        if arr is None:
            continue
        digest.update(str(arr.dtype).encode())
        digest.update(str(arr.shape).encode())
        digest.update(memoryview(arr.tobytes()))
    return digest.hexdigest()[:16]
