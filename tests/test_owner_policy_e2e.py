"""A server that asks for less privacy than the owners allow, against real `fedpriv client` processes.

Real processes over TLS on 127.0.0.1: `fedpriv server` with `--no-dp` (or with too little noise) and
two `fedpriv client` owners on their default policy. Every round must be declined with the owner's
reason, no update may leave, the ledgers must hold no release, and the server's report says why.
"""

from __future__ import annotations

import json
import time

import pytest

from fedpriv.client.ledger import load_ledger
from fedpriv.common.config import RunConfig
from fedpriv.simulations.federation import CLI, LocalFederation
from fedpriv.common.processes import Child, venv_env, wait_for_port
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def _start_owner(fed: LocalFederation, index: int, state, extra: list[str]) -> Child:
    name = f"client-{index}"
    argv = [*CLI, "client", "--server", f"127.0.0.1:{fed.port}", "--data", f"partition:{index}/2",
            "--state-dir", str(state), "--name", name, "--ca", str(fed.certs / "ca.crt"),
            "--key", str(fed.certs / "clients" / name), *extra]  # the owner's own policy: defaults unless given
    child = Child(name, argv, fed.run_dir / "logs" / f"{name}.log", env=venv_env(), cwd=ROOT)
    fed.clients[name] = child
    return child


@pytest.mark.parametrize("server_asks, reason", [
    ({"dp": False}, "server asked for dp=false; this owner requires DP"),
    ({"noise_multiplier": 0.3}, "server asked for noise multiplier 0.3; this owner requires at least 0.5"),
], ids=["no-dp", "too-little-noise"])
def test_owners_decline_every_round_a_server_weakens(tmp_path, server_asks, reason):
    run_dir = tmp_path / "fed"
    cfg = RunConfig(num_clients=2, num_rounds=1, min_clients=2, round_timeout=120, run_dir=str(run_dir),
                    **server_asks).validate()
    states = [tmp_path / f"owner-{i}" for i in range(2)]
    with LocalFederation(cfg, run_dir) as fed:
        fed.make_certs()
        fed.start_server()
        assert wait_for_port("127.0.0.1", fed.port, 120, fed.server), fed.server.tail(20)
        assert fed._keys_registered(150), fed.server.tail(20)
        for i, state in enumerate(states):
            _start_owner(fed, i, state, [])
        assert fed.wait(timeout=500) == 0, fed.server.tail(30)
        time.sleep(1)
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1]
    for r in report["rounds"]:
        assert r["trained"] == [] and r["declined"] == ["client-0", "client-1"]
        assert r["decline_reasons"] == {"client-0": reason, "client-1": reason}
    assert f"client-0 declined: {reason}" in (run_dir / "report.md").read_text()
    for state in states:
        ledger = load_ledger(state)
        assert ledger.releases == [], "no update left the owner's machine, so nothing was charged"
        assert [d.reason for d in ledger.declines] == [reason]
    for i in range(2):
        log = (run_dir / "logs" / f"client-{i}.log").read_text()
        assert "owner policy: DP required, budget epsilon 10" in log
