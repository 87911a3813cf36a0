"""The data owner's policy and ledger, played against a server that asks for less privacy.

Every test drives the real ClientApp round (``client.app.train_for_owner``) with a message a
malicious or careless server could send, and checks what left the owner's machine and what its
ledger holds. Reference epsilons come from Google's dp-accounting, never from the project's code.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import replace
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpriv.client.app import train_for_owner
from fedpriv.client.ledger import LEDGER_FILE, locked_ledger, load_ledger
from fedpriv.client.owner_policy import OwnerPolicy
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import UserInputError
from fedpriv.common.models import model_from_config

ROUND = RunConfig(model="cnn", local_epochs=1, batch_size=50, noise_multiplier=1.5, learning_rate=0.05)


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture
def owner(tmp_path):
    """A data owner: 200 records of its own in an .npz, and a state folder."""
    rng = np.random.default_rng(0)
    data = tmp_path / "records.npz"
    np.savez(data, x=rng.normal(size=(200, 1, 8, 8)).astype(np.float32), y=np.arange(200) % 10)
    return Owner(data, tmp_path / "state")


class Owner:
    def __init__(self, data: Path, state: Path) -> None:
        self.data, self.state = data, state

    def context(self) -> Context:
        return Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                       node_config={"data-path": str(self.data), "state-dir": str(self.state), "client-name": "owner"})

    def round(self, asked: RunConfig, server_round: int = 1, policy: OwnerPolicy | None = None,
              extra: dict | None = None) -> Message:
        model = model_from_config(asked, (1, 8, 8), 10, seed=0)
        config = ConfigRecord({**asked.to_dict(kebab=True), "server-round": server_round, "run-uid": "run-a",
                               **(extra or {})})
        msg = Message(RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: config}),
                      dst_node_id=1, message_type="train")
        return train_for_owner(msg, self.context(), policy or OwnerPolicy())

    def ledger_bytes(self) -> bytes | None:
        path = self.state / LEDGER_FILE
        return path.read_bytes() if path.exists() else None


def _declined(reply: Message) -> str:
    assert wire.ARRAYS not in reply.content.array_records, "a declined round must not release an update"
    assert reply.content[wire.METRICS][wire.DECLINED] == 1
    return str(reply.content[wire.PRIVACY]["decline-reason"])


def _gaussian_rounds_epsilon(sigma: float, count: int, delta: float = 1e-5) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), count))
    return accountant.get_epsilon(delta)


def _poisson_epsilon(history, delta: float = 1e-5) -> float:
    accountant = RdpAccountant()
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


# ------------------------------------------------------------------ what the server may not decide
def test_server_cannot_switch_dp_off(owner):
    reply = owner.round(replace(ROUND, dp=False))
    assert _declined(reply) == "server asked for dp=false; this owner requires DP"
    ledger = load_ledger(owner.state)
    assert ledger.releases == [] and [d.reason for d in ledger.declines] == [
        "server asked for dp=false; this owner requires DP"]


def test_owner_who_allows_no_dp_books_an_infinite_epsilon(owner):
    reply = owner.round(replace(ROUND, dp=False), policy=OwnerPolicy(require_dp=False, budget_epsilon=math.inf))
    assert wire.ARRAYS in reply.content.array_records
    assert math.isinf(reply.content[wire.METRICS]["epsilon"])
    ledger = load_ledger(owner.state)
    assert [r.sampling for r in ledger.releases] == ["none"] and math.isinf(ledger.epsilon(1e-5, "rdp"))


def test_noise_below_the_owners_minimum_is_declined(owner):
    reason = _declined(owner.round(replace(ROUND, noise_multiplier=0.3)))
    assert reason == "server asked for noise multiplier 0.3; this owner requires at least 0.5"
    assert load_ledger(owner.state).releases == []


def test_server_delta_and_accountant_are_ignored(owner):
    """delta=0.5 once made the client book a negative epsilon; gdp once decided budgets."""
    reply = owner.round(replace(ROUND, delta=0.5, accountant="gdp"))
    ledger = load_ledger(owner.state)
    (release,) = ledger.releases
    assert (release.delta, release.accountant) == (1e-5, "rdp")
    assert release.mechanism() == (1.5, 0.25, 4)
    expected = _poisson_epsilon([(1.5, 0.25, 4)])
    assert reply.content[wire.METRICS]["epsilon"] == pytest.approx(expected, rel=0.01)
    assert reply.content[wire.PRIVACY]["delta"] == 1e-5


def test_budget_is_checked_before_training_under_the_owners_accountant(owner):
    policy = OwnerPolicy(budget_epsilon=_poisson_epsilon([(1.5, 0.25, 8)]) * 1.001)  # room for two rounds
    for r in (1, 2):
        assert wire.ARRAYS in owner.round(ROUND, r, policy).content.array_records
    before = owner.ledger_bytes()
    reason = _declined(owner.round(replace(ROUND, accountant="gdp"), 3, policy))  # gdp would have said it fits
    assert reason.startswith("round 3 would raise epsilon to") and "(rdp, delta=1e-05)" in reason
    assert len(load_ledger(owner.state).releases) == 2
    assert json.loads(owner.ledger_bytes())["releases"] == json.loads(before)["releases"]


def test_invalid_server_config_is_declined(owner):
    reply = owner.round(ROUND, extra={"batch-size": 0})
    assert _declined(reply).startswith("server sent an invalid training config: --batch-size")
    assert owner.ledger_bytes() is None


def test_default_policy_is_strict():
    policy = OwnerPolicy()
    assert policy.require_dp and policy.budget_epsilon == 10.0 and policy.accountant == "rdp"
    assert OwnerPolicy.from_node_config({}) == policy  # a bare SuperNode never takes the server's word
    with pytest.raises(UserInputError, match="gdp is an approximation"):
        OwnerPolicy(accountant="gdp").validate()
    round_trip = OwnerPolicy(require_dp=False, budget_epsilon=math.inf, poisson_sampling=False, delta=1e-6)
    assert OwnerPolicy.from_node_config(round_trip.to_node_config()) == round_trip


# ------------------------------------------------------------------ one ledger per owner
def test_server_seed_does_not_pick_a_fresh_ledger(owner):
    owner.round(replace(ROUND, seed=0), 1)
    owner.round(replace(ROUND, seed=99), 2)
    ledger = load_ledger(owner.state)
    assert len(ledger.releases) == 2
    assert ledger.releases[0].fingerprint == ledger.releases[1].fingerprint  # the file's own order, no server split
    assert ledger.epsilon(1e-5, "rdp") == pytest.approx(_poisson_epsilon([(1.5, 0.25, 8)]), rel=0.01)


def test_grown_data_file_keeps_composing(owner):
    owner.round(ROUND, 1)
    with np.load(owner.data) as old:
        x, y = old["x"], old["y"]
    np.savez(owner.data, x=np.concatenate([x, x[:1]]), y=np.concatenate([y, y[:1]]))  # one record appended
    owner.round(ROUND, 2)
    ledger = load_ledger(owner.state)
    assert [r.records for r in ledger.releases] == [200, 201]
    assert ledger.releases[0].fingerprint != ledger.releases[1].fingerprint
    # 201 records at batch 50: 5 batches, rate 1/5
    expected = _poisson_epsilon([(1.5, 0.25, 4), (1.5, 0.2, 5)])
    assert ledger.epsilon(1e-5, "rdp") == pytest.approx(expected, rel=0.01)


def test_two_rounds_at_once_never_both_pass(owner):
    """While one round holds the ledger, another on the same state folder is declined, not trained."""
    owner.round(ROUND, 1)
    before = owner.ledger_bytes()
    with locked_ledger(owner.state, "owner"):
        reason = _declined(owner.round(ROUND, 2))
    assert "another round is training on state folder" in reason
    assert owner.ledger_bytes() == before


def test_concurrent_rounds_in_threads_are_all_in_the_ledger(owner):
    replies: list[Message] = []
    threads = [threading.Thread(target=lambda r=r: replies.append(owner.round(ROUND, r))) for r in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    released = [m for m in replies if wire.ARRAYS in m.content.array_records]
    declined = [m for m in replies if wire.ARRAYS not in m.content.array_records]
    assert len(released) + len(declined) == 3 and released
    assert all("another round is training" in str(m.content[wire.PRIVACY]["decline-reason"]) for m in declined)
    assert len(load_ledger(owner.state).releases) == len(released), "every released update is in the ledger"


def _old_layout(state: Path, fingerprint: str, entries: list[tuple[float, float, int]]) -> Path:
    from fedpriv.common.accounting import epsilon_for

    folder = state / "ledgers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fingerprint}.json"
    rows = [{"run_id": "old", "round": i + 1, "noise_multiplier": z, "sample_rate": q, "steps": t,
             "epsilon": epsilon_for(entries[:i + 1], 1e-5, "rdp")} for i, (z, q, t) in enumerate(entries)]
    path.write_text(json.dumps({"version": 1, "client_id": "owner", "accountant": "rdp", "delta": 1e-5,
                                "entries": rows}))
    return path


def test_old_fingerprint_ledgers_are_migrated_and_composed(owner):
    """Two ledgers of the previous layout (the data changed once) are one owner's spend."""
    a = _old_layout(owner.state, "aaaaaaaaaaaaaaaa", [(1.0, 0.1, 20), (1.0, 0.1, 20)])
    b = _old_layout(owner.state, "bbbbbbbbbbbbbbbb", [(1.2, 0.2, 10)])
    saved = {p: p.read_bytes() for p in (a, b)}
    owner.round(ROUND, 1)
    owner.round(ROUND, 2)  # a second open must not merge the old files again
    ledger = load_ledger(owner.state)
    assert [r.fingerprint for r in ledger.releases[:3]] == ["aaaaaaaaaaaaaaaa"] * 2 + ["bbbbbbbbbbbbbbbb"]
    assert len(ledger.releases) == 5 and len(ledger.migrated) == 2
    expected = _poisson_epsilon([(1.0, 0.1, 40), (1.2, 0.2, 10), (1.5, 0.25, 8)])
    assert ledger.epsilon(1e-5, "rdp") == pytest.approx(expected, rel=0.01)
    assert {p: p.read_bytes() for p in (a, b)} == saved, "the old files are kept as they were"


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b'{"version": 2, "owner": "o", ', b"[]",
                                     b'{"version": 2, "owner": "o", "releases": [{"round": 1}]}',
                                     b'{"version": 7, "releases": []}'],
                         ids=["binary", "truncated", "list", "bad-release", "foreign-version"])
def test_corrupted_or_foreign_ledger_declines_and_is_left_alone(owner, content):
    owner.state.mkdir(parents=True)
    (owner.state / LEDGER_FILE).write_bytes(content)
    reason = _declined(owner.round(ROUND))
    assert "ledger" in reason and "restore it from backup" in reason
    assert owner.ledger_bytes() == content


# ------------------------------------------------------------------ mechanism and accounting
def test_fixed_partition_sampling_is_accounted_without_amplification(owner):
    """Two rounds of two epochs without Poisson sampling: four unamplified Gaussian releases (6.6 at sigma
    1.5 by dp-accounting's RDP), not the Poisson number (about 2.95) that was reported before."""
    policy = OwnerPolicy(poisson_sampling=False, budget_epsilon=math.inf)
    asked = replace(ROUND, local_epochs=2, poisson_sampling=True)  # the server's request does not matter
    for r in (1, 2):
        reply = owner.round(asked, r, policy)
    ledger = load_ledger(owner.state)
    assert [r.sampling for r in ledger.releases] == ["fixed", "fixed"]
    assert [r.steps for r in ledger.releases] == [8, 8]  # 4 batches x 2 epochs really ran
    expected = _gaussian_rounds_epsilon(1.5, 4)
    assert expected > 6
    assert ledger.epsilon(1e-5, "rdp") == pytest.approx(expected, rel=0.01)
    assert reply.content[wire.METRICS]["epsilon"] == pytest.approx(expected, rel=0.01)


def test_fixed_partition_puts_every_record_in_exactly_one_batch_per_epoch():
    import torch

    from fedpriv.client.batch_sampling import FixedPartitionSampler

    sampler = FixedPartitionSampler(103, 5, torch.Generator().manual_seed(1))
    for _ in range(3):
        batches = list(sampler)
        assert len(batches) == 5
        assert sorted(i for b in batches for i in b) == list(range(103))
    secure = FixedPartitionSampler(50, 50, None)  # CSPRNG: empty batches happen and are still yielded
    assert len(list(secure)) == 50


def test_noise_and_sampling_streams_are_independent(monkeypatch):
    """The noise stream must not be a function of the sampling stream.

    The round's loader generator (batch masks) and the generator the optimizer draws noise from are
    captured; rebuilding the first step's noise from the sampler's seed must not reproduce it. Before,
    one seed fed both PyTorch's global generator (noise) and the sampler.
    """
    import torch

    import fedpriv.client.dp_training as dp_training
    from fedpriv.client.dp_training import train_round

    seen: dict = {}
    real = dp_training.make_private

    def spy(engine, **kwargs):
        private = real(engine, **kwargs)
        seen["sampler"] = kwargs["loader"].generator
        seen["noise"] = private.optimizer.generator
        return private

    monkeypatch.setattr(dp_training, "make_private", spy)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 1, 8, 8)).astype(np.float32), np.arange(64) % 10
    cfg = replace(ROUND, batch_size=32)
    train_round(model_from_config(cfg, (1, 8, 8), 10, seed=0), x, y, cfg, [])
    sampler_seed = seen["sampler"].initial_seed()
    noise_seed = seen["noise"].initial_seed() if seen["noise"] is not None else torch.initial_seed()
    assert noise_seed != sampler_seed
    rebuilt = torch.Generator().manual_seed(sampler_seed)
    reference = torch.Generator().manual_seed(noise_seed)
    assert not torch.equal(torch.randn(100, generator=rebuilt), torch.randn(100, generator=reference))


# ------------------------------------------------------------------ the run's model, the owner's data
def test_owner_missing_a_class_still_trains_the_runs_model(owner):
    """Labels 0..8 only, in a run of 10 classes: before, the model was built with 9 outputs and loading
    the global weights crashed the ClientApp (size mismatch), so the server saw only a missed round."""
    with np.load(owner.data) as old:
        x, y = old["x"], old["y"]
    np.savez(owner.data, x=x, y=np.minimum(y, 8))
    reply = owner.round(ROUND, extra={wire.RUN_CLASSES: 10, wire.RUN_INPUT_SHAPE: [1, 8, 8]})
    assert wire.ARRAYS in reply.content.array_records
    assert reply.content[wire.ARRAYS]["classifier.1.weight"].shape[0] == 10  # the compact CNN's class layer


@pytest.mark.parametrize("declared, reason", [
    ({wire.RUN_CLASSES: 5, wire.RUN_INPUT_SHAPE: [1, 8, 8]}, "labels go up to 9, but the run's model has 5"),
    ({wire.RUN_CLASSES: 10, wire.RUN_INPUT_SHAPE: [1, 28, 28]}, "have shape (1, 8, 8), but the run's model takes"),
    ({wire.RUN_CLASSES: 10**9, wire.RUN_INPUT_SHAPE: [1, 8, 8]}, "declares 1000000000 classes"),
], ids=["labels-beyond-the-run", "other-shape", "server-sized-model"])
def test_records_that_do_not_fit_the_run_are_declined_with_the_reason(owner, declared, reason):
    assert reason in _declined(owner.round(ROUND, extra=declared))
    assert load_ledger(owner.state).releases == []


def test_server_cannot_pick_the_ledger_folder(owner, tmp_path, monkeypatch):
    """A SuperNode started without a state folder (a bare flower-supernode) used the server's run-dir for its
    ledger, so a server that changed run-dir handed the owner a fresh, empty ledger every run."""
    home = tmp_path / "owner-home"
    monkeypatch.setenv("FEDPRIV_STATE_HOME", str(home))
    context = owner.context()
    del context.node_config["state-dir"]
    model = model_from_config(ROUND, (1, 8, 8), 10, seed=0)
    for r, run_dir in ((1, tmp_path / "server-a"), (2, tmp_path / "server-b")):
        config = ConfigRecord({**replace(ROUND, run_dir=str(run_dir)).to_dict(kebab=True), "server-round": r,
                               "run-uid": "run-a", "run-dir": str(run_dir)})
        msg = Message(RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: config}),
                      dst_node_id=1, message_type="train")
        assert wire.ARRAYS in train_for_owner(msg, context, OwnerPolicy()).content.array_records
    assert not (tmp_path / "server-a").exists() and not (tmp_path / "server-b").exists()
    assert len(load_ledger(home / "owners" / "owner").releases) == 2, "both runs composed in the owner's own ledger"
