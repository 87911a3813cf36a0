"""``fedpriv federation``: server and N clients as separate OS processes on 127.0.0.1.

Fresh certificates, free ports, one log file per process in the run folder, a live view of the
rounds, and every process stopped on completion, on error and on Ctrl-C (no orphans).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from fedpriv.common.certificates import make_certificates
from fedpriv.common.config import RunConfig, to_flags
from fedpriv.common.errors import UserInputError
from fedpriv.common.processes import Child, free_port, venv_env, wait_for_port

CLI = [sys.executable, "-m", "fedpriv.simulations.cli"]
SERVER_READY = "server listening on"  # `fedpriv server` prints it once every client key is registered


def owner_policy_flags(cfg: RunConfig) -> list[str]:
    """``fedpriv client`` flags for the owners of a local federation: whoever runs it owns every client,
    so their policy is the run's own settings (``OwnerPolicy.of_simulation``), as in ``fedpriv simulate``."""
    from fedpriv.client.owner_policy import OwnerPolicy

    policy = OwnerPolicy.of_simulation(cfg)
    return to_flags({"budget_epsilon": policy.budget_epsilon, "min_noise_multiplier": policy.min_noise_multiplier,
                     "delta": policy.delta, "accountant": policy.accountant, "poisson_sampling": policy.poisson_sampling,
                     "allow_no_dp": not policy.require_dp, "secure_mode": policy.secure_mode},
                    switches=("allow_no_dp", "secure_mode"))


class LocalFederation:
    """The processes of one local federation; use as a context manager so they always stop."""

    def __init__(self, cfg: RunConfig, run_dir: Path, port: int | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.port = port or free_port()
        self.control_port = free_port()  # the operator's Control API (127.0.0.1 only)
        self.certs = self.run_dir / "certs"
        self.server: Child | None = None
        self.clients: dict[str, Child] = {}

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def make_certs(self) -> None:
        make_certificates(self.certs, num_clients=self.cfg.num_clients, force=True)

    def start_server(self) -> Child:
        argv = [*CLI, "server", "--certs", str(self.certs), "--host", "127.0.0.1", "--port", str(self.port),
                "--control-port", str(self.control_port), *self.cfg.to_flags()]
        self.server = Child("server", argv, self.run_dir / "logs" / "server.log", env=venv_env(),
                            cwd=Path(__file__).resolve().parents[1])
        return self.server

    def start_client(self, index: int) -> Child:
        name = f"client-{index}"
        argv = [*CLI, "client", "--server", f"127.0.0.1:{self.port}",
                "--data", f"partition:{index}/{self.cfg.num_clients}",
                "--state-dir", str(self.run_dir / "clients" / name), "--name", name,
                "--ca", str(self.certs / "ca.crt"), "--key", str(self.certs / "clients" / name),
                *owner_policy_flags(self.cfg)]
        child = Child(name, argv, self.run_dir / "logs" / f"{name}.log", env=venv_env(),
                      cwd=Path(__file__).resolve().parents[1])
        self.clients[name] = child
        return child

    def start(self, server_timeout: float = 120) -> None:
        self.make_certs()
        self.start_server()
        if not wait_for_port("127.0.0.1", self.port, server_timeout, self.server):
            raise UserInputError(f"the server did not come up: {self.server.tail(2)} (see {self.server.log_path})")
        if not self._keys_registered(server_timeout + 15 * self.cfg.num_clients):
            raise UserInputError(f"the server did not register the client keys: {self.server.tail(2)} "
                                 f"(see {self.server.log_path})")
        for i in range(self.cfg.num_clients):
            self.start_client(i)

    def _keys_registered(self, timeout: float) -> bool:
        """Wait for the server's ready line: its port opens before it registers the client keys (one
        ``flwr`` call per key), and a client whose key is not registered yet is refused for good."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.server.poll() is None:
            if any(line.startswith(SERVER_READY) for line in self.server.tail(50).splitlines()):
                return True
            time.sleep(0.2)
        return False

    def wait(self, on_tick: Callable[[], None] | None = None, timeout: float = 24 * 3600) -> int:
        """Wait for the server process to end; returns its exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.server.poll()
            if code is not None:
                return code
            if on_tick:
                on_tick()
            time.sleep(0.5)
        raise UserInputError(f"the federation did not finish within {timeout:.0f} s")

    def stop(self) -> None:
        for child in list(self.clients.values()):
            child.stop(grace=5)
        if self.server is not None:
            self.server.stop(grace=15)
