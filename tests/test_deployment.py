"""Server and clients as real processes over TLS on 127.0.0.1: the run, and the faults it survives."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedpriv.common.certificates import make_certificates
from fedpriv.common.config import RunConfig
from fedpriv.client.ledger import load_ledger
from fedpriv.common.accounting import epsilon_for
from fedpriv.simulations.federation import LocalFederation
from tests.conftest import PREVIOUS_TRAINING_FLAGS
from tests.test_cli_errors import assert_clean_error

pytestmark = pytest.mark.e2e


def _rounds(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "report.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def _wait_for_round(fed: LocalFederation, run_dir: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_rounds(run_dir)) < n:
        assert time.monotonic() < deadline, f"round {n} did not complete in {timeout} s"
        assert fed.server.poll() is None, fed.server.tail(20)
        time.sleep(0.5)


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def _processes_left_after(text: str, within: float) -> list[str]:
    """The processes still mentioning ``text`` once ``within`` seconds have passed, or as soon as there are
    none (the same bound as sleeping ``within`` seconds and then looking, without the wait when all are gone)."""
    deadline = time.monotonic() + within
    while (left := _processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _ledger(run_dir: Path, client: str):
    return load_ledger(run_dir / "clients" / client)


def test_federation_command_with_secure_aggregation_runs_and_leaves_no_process(fedpriv, tmp_path):
    run_dir = tmp_path / "fed"
    result = fedpriv("federation", "--num-clients", "3", "--num-rounds", "2", "--secure-aggregation",
                     *PREVIOUS_TRAINING_FLAGS, "--run-dir", str(run_dir), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(r["trained"] == ["client-0", "client-1", "client-2"] for r in report["rounds"])
    # SecAgg+ over TLS between real processes: the server only unmasked the sum, and the model learnt from it.
    assert all(r["aggregation"] == "secagg+" for r in report["rounds"])
    assert all(r["secagg_clipped"] == {} for r in report["rounds"])  # no value beyond the quantiser's range
    assert "secure_aggregation" in report["privacy"]["guarantees"]
    assert report["rounds"][-1]["metrics"]["accuracy"] > 0.2
    for name in ("server", "superlink", "client-0", "client-1", "client-2"):
        assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0, name
    for client, entry in report["privacy"]["clients"].items():
        ledger = _ledger(run_dir, client)
        assert len(ledger.releases) == 2
        assert entry["epsilon"] == pytest.approx(ledger.releases[-1].epsilon)
    assert _processes_left_after(str(run_dir), within=2) == []


def test_client_killed_mid_run(tmp_path):
    run_dir = tmp_path / "fed"
    cfg = RunConfig(num_clients=3, num_rounds=2, min_clients=2, round_timeout=75, run_dir=str(run_dir)).validate()
    with LocalFederation(cfg, run_dir) as fed:
        fed.start()
        _wait_for_round(fed, run_dir, 1)
        fed.clients["client-2"].kill()
        assert fed.wait(timeout=400) == 0, fed.server.tail(30)
    report = json.loads((run_dir / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["trained"] == ["client-0", "client-1", "client-2"]
    assert rounds[1]["trained"] == ["client-0", "client-1"]
    assert "client-2" in rounds[1]["missed"]
    assert "client-2 missed the round" in (run_dir / "report.md").read_text()
    # The killed client's ledger is whole and agrees with itself: every entry it holds was really spent.
    ledger = _ledger(run_dir, "client-2")
    assert 1 <= len(ledger.releases) <= 2 and ledger.releases[0].round == 1
    assert ledger.releases[-1].epsilon == pytest.approx(ledger.epsilon(1e-5, "rdp"), rel=1e-9)
    assert _processes_mentioning(str(run_dir)) == []


def test_server_killed_and_restarted_resumes_without_losing_or_double_counting(tmp_path):
    run_dir = tmp_path / "fed"
    cfg = RunConfig(num_clients=2, num_rounds=3, min_clients=2, round_timeout=120, run_dir=str(run_dir)).validate()
    with LocalFederation(cfg, run_dir) as fed:
        fed.start()
        _wait_for_round(fed, run_dir, 1)
        fed.server.kill()  # SIGKILL: no clean-up, as in a crash
        time.sleep(3)
        assert len(_rounds(run_dir)) < 3
        fed.start_server()  # same run folder, same port: resumes after the last checkpointed round
        assert fed.wait(timeout=500) == 0, fed.server.tail(30)
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert "resuming" in (run_dir / "logs" / "server.log").read_text()
    privacy = report["privacy"]
    for client, entry in privacy["clients"].items():
        on_disk = _ledger(run_dir, client).releases
        # The report's ledger is the client's: nothing lost, nothing added.
        assert [(e["round"], e["steps"]) for e in entry["ledger"]] == [(e.round, e.steps) for e in on_disk]
        mechanisms = [e.mechanism() for e in on_disk]
        assert entry["epsilon"] == pytest.approx(epsilon_for(mechanisms, 1e-5, "rdp"), rel=1e-9)
        # Rounds 1..3 each counted exactly once in this run's history; a round trained before the crash
        # but never aggregated may appear once more in the ledger (that privacy was spent).
        assert [h["round"] for h in entry["history"]] == [1, 2, 3]
        assert len(on_disk) - len(entry["history"]) in (0, 1)
    assert _processes_mentioning(str(run_dir)) == []


def test_unregistered_and_plaintext_clients_are_refused(fedpriv, tmp_path):
    run_dir = tmp_path / "fed"
    cfg = RunConfig(num_clients=1, num_rounds=1, min_clients=1, run_dir=str(run_dir)).validate()
    stranger = make_certificates(tmp_path / "other", num_clients=1)
    with LocalFederation(cfg, run_dir) as fed:
        fed.make_certs()
        fed.start_server()
        from fedpriv.common.processes import wait_for_port

        assert wait_for_port("127.0.0.1", fed.port, 120, fed.server), fed.server.tail(20)
        # The server's ready line comes once it has registered its client keys (was: a fixed 5 s sleep).
        assert fed._keys_registered(150), fed.server.tail(20)
        common = ["--server", f"127.0.0.1:{fed.port}", "--data", "partition:0/1", "--max-wait", "5",
                  "--max-retries", "2"]
        with ThreadPoolExecutor(2) as pool:  # two separate client processes, at once
            unregistered = pool.submit(fedpriv, "client", *common, "--state-dir", str(tmp_path / "s1"), "--ca",
                                       str(fed.certs / "ca.crt"), "--key", str(stranger.client_private_keys[0]),
                                       timeout=180)
            plaintext = pool.submit(fedpriv, "client", *common, "--state-dir", str(tmp_path / "s2"), "--insecure",
                                    timeout=180)
            unregistered, plaintext = unregistered.result(), plaintext.result()
        assert unregistered.returncode == 2
        assert "not registered" in unregistered.stderr.strip().splitlines()[-1]
        assert plaintext.returncode == 2
        assert "TLS" in plaintext.stderr.strip().splitlines()[-1]
    assert _processes_mentioning(str(run_dir)) == []


def test_client_and_server_bad_input(fedpriv, fedpriv_in_process, tmp_path):
    """Two cases as real child processes (the SuperNode that cannot reach the server, and a state folder
    locked by another process); the rest through the same command in this process (each child spent
    ~5 s starting), bounded in time like the children."""
    certs = make_certificates(tmp_path / "certs", num_clients=1)
    good = ["--data", "partition:0/1", "--ca", str(certs.ca_cert), "--key", str(certs.client_private_keys[0])]
    # unreachable server (nothing listens on a fresh free port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_clean_error(fedpriv("client", "--server", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "a"), *good,
                               timeout=60), "cannot reach")
    # a state folder held by another running client (a listening port stands in for a reachable server)
    from fedpriv.client.ledger import client_lock

    with socket.socket() as listening, client_lock(tmp_path / "held"):
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert_clean_error(fedpriv("client", "--server", f"127.0.0.1:{listening.getsockname()[1]}", "--state-dir",
                                   str(tmp_path / "held"), *good, timeout=60), "held by another running")
    in_process = fedpriv_in_process  # from here on, in this process
    # missing key
    assert_clean_error(in_process("client", "--server", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "b"),
                               "--data", "partition:0/1", "--ca", str(certs.ca_cert), "--key",
                               str(tmp_path / "nokey"), timeout=60), "nokey")
    # key that does not match its .pub
    other = make_certificates(tmp_path / "other", num_clients=1)
    mismatched = tmp_path / "mixed"
    mismatched.write_bytes(certs.client_private_keys[0].read_bytes())
    (tmp_path / "mixed.pub").write_bytes(other.client_public_keys[0].read_bytes())
    assert_clean_error(in_process("client", "--server", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "c"),
                               "--data", "partition:0/1", "--ca", str(certs.ca_cert), "--key", str(mismatched),
                               timeout=60), "does not match")
    # corrupted ledger: refused, and left as it was
    for layout in ("ledger.json", "ledgers/0123456789abcdef.json"):  # this layout and the previous one
        state = tmp_path / "d" / layout.replace("/", "-")
        bad = state / layout
        bad.parent.mkdir(parents=True)
        bad.write_text("{not json")
        assert_clean_error(in_process("client", "--server", f"127.0.0.1:{port}", "--state-dir", str(state), *good,
                                   timeout=60), "corrupted")
        assert bad.read_text() == "{not json"
    # owner policy: gdp cannot decide a budget; a delta at or above 1/records
    assert_clean_error(in_process("client", "--server", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "e"), *good,
                               "--accountant", "gdp", timeout=60), "cannot decide")
    import numpy as np

    np.savez(tmp_path / "small.npz", x=np.zeros((50, 1, 8, 8), np.float32), y=np.arange(50) % 10)
    assert_clean_error(in_process("client", "--server", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "f"),
                               "--data", f"npz:{tmp_path / 'small.npz'}", "--delta", "0.05", *good[2:], timeout=60),
                       "not below 1/n")
    # state dir that is not writable (a path under a regular file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(in_process("client", "--server", f"127.0.0.1:{port}", "--state-dir", str(blocker / "s"), *good,
                               timeout=60), "--state-dir")
    # server: port in use, insecure off loopback, missing certificate
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert_clean_error(in_process("server", "--certs", str(certs.ca_cert.parent), "--port",
                                   str(busy.getsockname()[1]), "--run-dir", str(tmp_path / "r1"), timeout=60), "in use")
    assert_clean_error(in_process("server", "--insecure", "--host", "0.0.0.0", "--run-dir", str(tmp_path / "r2"),
                               timeout=60), "--insecure")
    certs.server_cert.unlink()
    assert_clean_error(in_process("server", "--certs", str(certs.ca_cert.parent), "--run-dir", str(tmp_path / "r3"),
                               timeout=60))
