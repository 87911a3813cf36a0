"""A stranger holding the federation's CA certificate and a key pair of its own gets nothing.

Issue 12: with the Control API served on the clients' address and no Control authentication
(Flower 1.42 without OIDC), a stranger registered its own key with ``flwr supernode register``,
connected a SuperNode and listed runs. ``fedpriv server`` now serves the Control (and Runtime) API
only on the operator's loopback address and admits the owners' keys itself at start.

One machine stands in for two: the fleet address 127.0.0.2 is "the network" (all a stranger can
reach), 127.0.0.1 is the operator's own machine. Real processes, bounded waits, always stopped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedpriv.common.certificates import make_certificates
from fedpriv.common.config import RunConfig
from fedpriv.simulations.federation import CLI, SERVER_READY
from fedpriv.common.processes import Child, free_port, venv_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
FLEET_HOST = "127.0.0.2"  # where data owners (and strangers) connect
OPERATOR_HOST = "127.0.0.1"  # the server machine itself


def _flwr(home: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], cwd=home, capture_output=True,
                          text=True, timeout=timeout, env=venv_env({"FLWR_HOME": str(home)}))


def _stranger_home(tmp_path: Path, ca_cert: Path, address: str) -> Path:
    """A ``flwr`` configuration as any data owner could write it: the shared CA, the clients' address."""
    home = tmp_path / "stranger-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "stranger"\n\n[superlink.stranger]\n'
                                      f'address = "{address}"\nroot-certificates = "{ca_cert}"\n')
    return home


def _runs(home: Path) -> list[dict]:
    res = _flwr(home, "ls", "fedpriv", "--format", "json", timeout=60)
    try:
        return json.loads(res.stdout).get("runs", [])
    except ValueError:
        return []


def _wait_for(predicate, timeout: float, server: Child, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert server.poll() is None, f"the server exited while waiting for {what}:\n{server.tail(30)}"
        assert time.monotonic() < deadline, f"{what} within {timeout} s:\n{server.tail(30)}"
        time.sleep(0.5)


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def test_stranger_with_ca_and_own_key_can_neither_register_connect_list_start_nor_stop(fedpriv, tmp_path):
    run_dir = tmp_path / "fed"
    certs = make_certificates(tmp_path / "certs", hosts=["localhost", OPERATOR_HOST, FLEET_HOST], num_clients=1)
    stranger = make_certificates(tmp_path / "stranger", num_clients=1)  # only its client key pair is used
    port, control_port = free_port(FLEET_HOST), free_port(OPERATOR_HOST)
    cfg = RunConfig(num_clients=1, num_rounds=1, min_clients=1, local_epochs=1, round_timeout=120,
                    run_dir=str(run_dir)).validate()
    argv = [*CLI, "server", "--certs", str(certs.ca_cert.parent), "--host", FLEET_HOST, "--port", str(port),
            "--control-port", str(control_port), *cfg.to_flags()]
    server = Child("server", argv, run_dir / "logs" / "server.log", env=venv_env(), cwd=ROOT)
    owner: Child | None = None
    try:
        _wait_for(lambda: SERVER_READY in server.tail(50), 120, server, "the server's ready line")
        operator = run_dir / "flwr-home"  # the operator's own flwr configuration, written by fedpriv server
        _wait_for(lambda: len(_runs(operator)) == 1, 60, server, "the operator's run")
        run_id = str(_runs(operator)[0]["run-id"])

        home = _stranger_home(tmp_path, certs.ca_cert, f"{FLEET_HOST}:{port}")
        attempts = {
            "register": ("supernode", "register", str(stranger.client_public_keys[0]), "stranger"),
            "list nodes": ("supernode", "ls", "stranger"),
            "list runs": ("ls", "stranger"),
            "start a run": ("run", str(ROOT), "stranger"),
            "stop the run": ("stop", run_id, "stranger"),
        }
        with ThreadPoolExecutor(len(attempts) + 1) as pool:  # all at once: each is a separate process
            # The stranger's SuperNode, on the clients' address: its key is not registered.
            joining = pool.submit(fedpriv, "client", "--server", f"{FLEET_HOST}:{port}", "--data", "partition:0/1",
                                  "--state-dir", str(tmp_path / "stranger-state"), "--ca", str(certs.ca_cert),
                                  "--key", str(stranger.client_private_keys[0]), "--max-wait", "2",
                                  "--max-retries", "2", timeout=150)
            results = {what: pool.submit(_flwr, home, *args) for what, args in attempts.items()}
            results = {what: future.result() for what, future in results.items()}
            refused = joining.result()
        succeeded = {what: res.stdout[-300:] for what, res in results.items() if res.returncode == 0}
        assert succeeded == {}, f"a stranger's Control API calls went through: {succeeded}"
        assert all("403" in res.stdout + res.stderr for res in results.values()), results
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert "not registered" in refused.stderr.strip().splitlines()[-1]
        # Nor is the Control API listening anywhere on the clients' address.
        with pytest.raises(OSError):
            socket.create_connection((FLEET_HOST, control_port), timeout=2).close()

        # The operator, on loopback, still sees exactly its own run, still going, and only the owner's key.
        runs = _runs(operator)
        assert [str(r["run-id"]) for r in runs] == [run_id]
        assert not str(runs[0]["status"]).startswith("finished"), runs
        nodes = _flwr(operator, "supernode", "ls", "fedpriv", "--format", "json", timeout=60)
        assert nodes.returncode == 0, nodes.stdout + nodes.stderr
        assert len(json.loads(nodes.stdout)["nodes"]) == 1, nodes.stdout

        # The registered owner joins through the same clients' address and the run completes.
        owner = Child("client-0", [*CLI, "client", "--server", f"{FLEET_HOST}:{port}", "--data", "partition:0/1",
                                   "--state-dir", str(run_dir / "clients" / "client-0"), "--name", "client-0",
                                   "--ca", str(certs.ca_cert), "--key", str(certs.client_private_keys[0])],
                      run_dir / "logs" / "client-0.log", env=venv_env(), cwd=ROOT)
        assert server.proc.wait(timeout=180) == 0, server.tail(40)
        report = json.loads((run_dir / "report.json").read_text())
        assert [r["trained"] for r in report["rounds"]] == [["client-0"]]
    finally:
        if owner is not None:
            owner.stop(grace=5)
        server.stop(grace=15)
    time.sleep(1)
    assert _processes_mentioning(str(run_dir)) == []
