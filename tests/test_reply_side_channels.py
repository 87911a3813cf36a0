"""What leaves an owner's machine besides the DP update: nothing that depends on its records.

Local DP bounds what the *noised update* reveals. Anything else in the reply that is a function of
the records -- a training loss, a hash of the data, a name derived from that hash -- bypasses the
noise: a server holding a candidate dataset (all records but one known, the last from a short
list) compares the value with its own computation and learns the missing record outright. These
tests play that server: two owners whose datasets differ in one record (same size, same seed for
everything the owner shares) must send replies that differ in nothing but the noised weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from fedpriv.common import wire
from fedpriv.common.accounting import data_fingerprint
from test_owner_policy import ROUND, Owner

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def _neighbouring_owners(tmp_path: Path, name: str | None) -> tuple[Owner, Owner]:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 1, 8, 8)).astype(np.float32), np.arange(200) % 10
    owners = []
    for tag, first in (("a", x[0]), ("b", 50 * np.ones_like(x[0]))):  # record 0 replaced by an outlier
        data = tmp_path / f"records-{tag}.npz"
        np.savez(data, x=np.concatenate([first[None], x[1:]]), y=y)
        owner = Owner(data, tmp_path / f"state-{tag}")
        if name is None:
            owner.context = _unnamed(owner)
        owners.append(owner)
    return owners[0], owners[1]


def _unnamed(owner: Owner):
    """A SuperNode started without a client name (e.g. under plain ``flwr run``)."""
    base = owner.context

    def context():
        ctx = base()
        ctx.node_config.pop("client-name")
        return ctx
    return context


def _everything_but_the_weights(reply: Message) -> dict:
    content = reply.content
    assert wire.ARRAYS in content.array_records, "the round must have trained"
    return {"metrics": dict(content[wire.METRICS]), "privacy": dict(content[wire.PRIVACY])}


@pytest.mark.parametrize("name", ["owner", None], ids=["named", "unnamed"])
def test_a_dp_reply_carries_nothing_of_the_records_but_the_noised_update(tmp_path, monkeypatch, name):
    monkeypatch.setenv("FEDPRIV_STATE_HOME", str(tmp_path / "state-home"))
    first, second = _neighbouring_owners(tmp_path, name)
    replies = [_everything_but_the_weights(owner.round(ROUND)) for owner in (first, second)]
    if name is None:  # two owners on one machine: their own, distinct names, not computable from the data
        ids = [r["privacy"].pop(wire.CLIENT_ID) for r in replies]
        for owner, owner_id in zip((first, second), ids):
            with np.load(owner.data) as f:
                fingerprint = data_fingerprint(np.ascontiguousarray(f["x"]), np.ascontiguousarray(f["y"]))
            assert owner_id.startswith("owner-") and fingerprint[:8] not in owner_id
        assert ids[0] != ids[1]
        # the same owner keeps its name (and so its ledger) across rounds and restarts
        assert first.round(ROUND, server_round=2).content[wire.PRIVACY][wire.CLIENT_ID] == ids[0]
    assert replies[0] == replies[1]


def test_a_reply_without_dp_still_reports_its_training_loss(tmp_path):
    """No privacy is claimed there, and the loss is what an operator debugging a run looks at."""
    first, _ = _neighbouring_owners(tmp_path, "owner")
    from fedpriv.client.owner_policy import OwnerPolicy

    reply = first.round(replace(ROUND, dp=False), policy=OwnerPolicy(require_dp=False))
    assert np.isfinite(reply.content[wire.METRICS][wire.TRAIN_LOSS])
