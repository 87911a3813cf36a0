"""A data owner's privacy ledger: one per state folder, locked while a round trains.

The ledger is the owner's own record of every update its data went into, kept on its machine and
charged *before* an update leaves. It is keyed by the state folder, not by the data: a data file
that grows, shrinks or is re-ordered keeps composing into the same ledger, and each release
records the fingerprint and record count of the data it used, so the owner can see when the data
changed. Nothing a server sends picks the ledger or resets it.

Layout of ``STATE_DIR``:

* ``ledger.json``: this module's format (``version`` 2), written atomically.
* ``.ledger.lock``: ``flock``-ed for the whole of a round (budget check, training, charge), so two
  rounds on one state folder never both pass the budget check; the second one is declined.
* ``ledgers/<fingerprint>.json``: the previous layout (one ledger per data fingerprint). Such files
  are merged into ``ledger.json`` once (their name and SHA-256 recorded under ``migrated``) and
  left in place, never deleted.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from fedpriv.common.atomic_io import read_json, write_json
from fedpriv.common.errors import PrivacyPolicyError
from fedpriv.common.accounting import Mechanism, epsilon_for

LEDGER_FILE = "ledger.json"
LOCK_FILE = ".ledger.lock"
CLIENT_LOCK_FILE = ".client.lock"
LEGACY_DIR = "ledgers"
LEDGER_VERSION = 2
SAMPLINGS = ("poisson", "fixed", "none")  # "none": released without DP (only if the owner allowed it)


class LedgerError(PrivacyPolicyError):
    """A ledger that cannot be used as it is: damaged, foreign, or of an unknown version."""


class StateDirBusy(PrivacyPolicyError):
    """Another round, or another ``fedpriv client``, holds this state folder."""


@dataclass(frozen=True)
class Release:
    """One update that left the owner's machine, and the mechanism that protected it.

    ``noise_multiplier``, ``sample_rate`` and ``steps`` are what the optimizer really ran (rate and
    steps per round); :meth:`mechanism` turns them into the accountant's history entry for the
    batch sampling used (see ``common.accounting.round_mechanism``).
    """

    run_id: str
    round: int
    time: float                 # Unix time the release was charged
    noise_multiplier: float     # 0 when released without DP
    sample_rate: float
    steps: int
    epochs: int
    sampling: str               # "poisson", "fixed" or "none"
    fingerprint: str            # of the data this round trained on
    records: int | None         # how many records that data had (None: migrated from the old layout)
    epsilon: float              # cumulative epsilon after this release, under the policy then in force
    accountant: str
    delta: float

    def mechanism(self) -> Mechanism | None:
        """The accountant's (noise, rate, steps) entry; ``None`` for a release without DP."""
        if self.sampling == "none":
            return None
        if self.sampling == "fixed":
            return (self.noise_multiplier, 1.0, self.epochs)
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Decline:
    """A round the owner's policy refused, and why."""

    run_id: str
    round: int
    time: float
    reason: str


@dataclass
class OwnerLedger:
    """Everything one data owner has released, and every round it declined."""

    owner: str
    releases: list[Release] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    policy: dict = field(default_factory=dict)      # the policy of the last round it charged or declined
    migrated: list[str] = field(default_factory=list)  # "<file name>:<sha256>" of merged old-layout files

    # ---------------------------------------------------------------- accounting
    def history(self) -> list[Mechanism]:
        """The accountant's history of every DP release (releases without DP are not in it)."""
        return [m for m in (r.mechanism() for r in self.releases) if m is not None]

    def released_without_dp(self) -> bool:
        return any(r.sampling == "none" for r in self.releases)

    def epsilon(self, delta: float, accountant: str) -> float:
        """Cumulative epsilon of every release; infinite once anything left without DP."""
        if self.released_without_dp():
            return math.inf
        return epsilon_for(self.history(), delta, accountant)

    def epsilon_if(self, mechanism: Mechanism, delta: float, accountant: str) -> float:
        """The cumulative epsilon after one more release under ``mechanism``."""
        if self.released_without_dp():
            return math.inf
        return epsilon_for(self.history() + [mechanism], delta, accountant)

    def has_round(self, run_id: str, server_round: int) -> bool:
        return any(r.run_id == run_id and r.round == server_round for r in self.releases)

    # ---------------------------------------------------------------- persisting
    def to_dict(self) -> dict:
        return {"version": LEDGER_VERSION, "owner": self.owner, "policy": self.policy,
                "releases": [asdict(r) for r in self.releases], "declines": [asdict(d) for d in self.declines],
                "migrated": list(self.migrated)}

    def save(self, state_dir: Path) -> None:
        """Atomically replace ``ledger.json``: a crash leaves the previous ledger, never a torn one."""
        write_json(Path(state_dir) / LEDGER_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, source: Path) -> "OwnerLedger":
        """Parse a stored ledger; anything malformed is a :class:`LedgerError`, never a silent reset."""
        if not isinstance(data, dict) or data.get("version") != LEDGER_VERSION or "releases" not in data:
            raise LedgerError(f"{source} is not a fedpriv privacy ledger (version {LEDGER_VERSION}); "
                              "restore it from backup or point --state-dir at the right folder")
        try:
            return cls(owner=str(data["owner"]), releases=[_release(r) for r in data["releases"]],
                       declines=[Decline(str(d["run_id"]), int(d["round"]), float(d["time"]), str(d["reason"]))
                                 for d in data.get("declines", [])],
                       policy=dict(data.get("policy", {})), migrated=[str(m) for m in data.get("migrated", [])])
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"privacy ledger {source} is corrupted ({exc.__class__.__name__}: {exc}); restore it "
                              "from backup — it is never reset automatically, since that would forget spent privacy"
                              ) from None


def _release(raw: dict) -> Release:
    records = raw.get("records")
    release = Release(run_id=str(raw["run_id"]), round=int(raw["round"]), time=float(raw["time"]),
                      noise_multiplier=float(raw["noise_multiplier"]), sample_rate=float(raw["sample_rate"]),
                      steps=int(raw["steps"]), epochs=int(raw["epochs"]), sampling=str(raw["sampling"]),
                      fingerprint=str(raw["fingerprint"]), records=None if records is None else int(records),
                      epsilon=float(raw["epsilon"]), accountant=str(raw["accountant"]), delta=float(raw["delta"]))
    if release.sampling not in SAMPLINGS or release.steps < 0 or release.epochs < 0 \
            or not 0 < release.sample_rate <= 1 or release.noise_multiplier < 0 \
            or (release.sampling != "none" and not release.noise_multiplier > 0):
        raise ValueError(f"release out of range: {raw}")
    return release


# --------------------------------------------------------------------------------- opening
def load_ledger(state_dir: Path, owner: str = "") -> OwnerLedger:
    """The state folder's ledger, read-only, with any old-layout ledgers merged in memory.

    Safe while a client is running: ``ledger.json`` is only ever replaced by an atomic rename.
    A folder with no ledger gives an empty one.
    """
    return _load(Path(state_dir), owner)[0]


def _load(state_dir: Path, owner: str) -> tuple[OwnerLedger, bool]:
    """The ledger and whether old-layout files were merged into it just now."""
    path = state_dir / LEDGER_FILE
    if path.exists():
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            raise LedgerError(f"privacy ledger {path} is corrupted ({exc.__class__.__name__}); restore it from "
                              "backup — it is never reset automatically, since that would forget spent privacy"
                              ) from None
        ledger = OwnerLedger.from_dict(data, path)
    else:
        ledger = OwnerLedger(owner=owner)
    return ledger, _merge_legacy(state_dir, ledger)


def _merge_legacy(state_dir: Path, ledger: OwnerLedger) -> bool:
    """Fold every not-yet-merged ``ledgers/<fingerprint>.json`` of the old layout into ``ledger``.

    The old layout started a fresh, empty ledger whenever the data's bytes changed; merging all of
    them composes every release the owner ever made. Returns whether anything was merged.
    """
    folder = state_dir / LEGACY_DIR
    if not folder.is_dir():
        return False
    merged, insert_at = False, 0
    for path in sorted(folder.glob("*.json")):
        raw = path.read_bytes()
        key = f"{path.name}:{hashlib.sha256(raw).hexdigest()}"
        if key in ledger.migrated:
            continue
        try:
            data = json.loads(raw)
            entries = data["entries"]
            # The old layout knew only Poisson rounds and no record count; _release checks every field's range.
            releases = [_release({**e, "time": path.stat().st_mtime, "epochs": 0, "sampling": "poisson",
                                  "fingerprint": path.stem, "records": None, "accountant": data["accountant"],
                                  "delta": data["delta"]}) for e in entries]
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"privacy ledger {path} (old layout) is corrupted ({exc.__class__.__name__}); restore it "
                              "from backup — it is never reset automatically, since that would forget spent privacy"
                              ) from None
        ledger.releases[insert_at:insert_at] = releases  # older than anything in the new layout
        insert_at += len(releases)
        ledger.migrated.append(key)
        ledger.owner = ledger.owner or str(data.get("client_id", ""))
        merged = True
    return merged


@contextmanager
def locked_ledger(state_dir: Path, owner: str) -> Iterator[OwnerLedger]:
    """Hold the state folder's ledger lock for one round and yield its ledger (old layout migrated).

    The lock is taken without waiting: a second round on the same folder while one trains raises
    :class:`StateDirBusy` (the ClientApp declines that round), so two rounds can never both pass
    the budget check on the same spend. The caller saves the ledger before it releases anything.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with _flock(state_dir / LOCK_FILE, f"another round is training on state folder {state_dir}"):
        ledger, merged = _load(state_dir, owner)
        if merged:
            ledger.save(state_dir)  # the migration is on disk before any new spend is added to it
        yield ledger


@contextmanager
def client_lock(state_dir: Path) -> Iterator[None]:
    """Held by ``fedpriv client`` for its lifetime: one running client per state folder."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with _flock(Path(state_dir) / CLIENT_LOCK_FILE,
                f"state folder {state_dir} is held by another running 'fedpriv client'; stop it or use another "
                "--state-dir"):
        yield


@contextmanager
def _flock(path: Path, busy_message: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateDirBusy(busy_message) from None
            raise
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def now() -> float:
    return time.time()
