"""``fedpriv server``: a Flower SuperLink with TLS and SuperNode authentication, plus the run on it.

Flower's Deployment Runtime does the networking: ``flower-superlink`` serves clients over TLS,
admits only SuperNodes whose public key was registered (``flwr supernode register``), and runs
the ServerApp submitted with ``flwr run``. This module makes that one step: start the SuperLink
(its state in a SQLite database inside the run folder, so a restart keeps registrations), register
the data owners' keys, submit the run with the run config, follow it, and stop the SuperLink.

Who can do what (issue 12): the clients' address (``--host:--port``) serves only the Fleet API, so
there a key that ``fedpriv server`` did not register is refused by SuperNode authentication and
nothing else is answered. The Control API (register keys, list/start/stop runs), which Flower 1.42
without OIDC does not authenticate, and the ServerApp's Runtime API listen on
``127.0.0.1:--control-port`` only: only the operator, on the server machine (or through an SSH
tunnel to it), controls runs, and the allowed keys are exactly the ones registered here at start.
The assumption: nobody untrusted has a shell on the server machine (loopback is open to its
local users).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedpriv.common.config import RunConfig, check_port
from fedpriv.common.errors import UserInputError
from fedpriv.common.processes import Child, port_in_use, venv_env, wait_for_port
from fedpriv.server.flower_app import toml_value, write_app_project

CONNECTION = "fedpriv"
OPERATOR_HOST = "127.0.0.1"  # the Control and Runtime APIs listen here only
CONTROL_PORT = 9093  # Flower's usual Control API port


@dataclass(frozen=True)
class ServerTLS:
    """The SuperLink's TLS material and the registered client public keys."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_public_keys: tuple[Path, ...]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int, insecure: bool, control_port: int = CONTROL_PORT,
               tls: "ServerTLS | None" = None) -> None:
    """Refuse plaintext off loopback, taken or clashing ports, and a server certificate that does
    not name 127.0.0.1 (``fedpriv server`` and the ServerApp reach the Control and Runtime APIs
    there, over the same TLS), before anything starts.

    Every refusal is a one-line :class:`~common.errors.FedprivError` naming the option; ports
    outside 1..65535 (0 included: Flower needs a real port) are a
    :class:`~common.errors.ConfigError`."""
    check_port("port", port)
    check_port("control-port", control_port)
    if insecure and not is_loopback(host):
        raise UserInputError(f"--insecure is only allowed on loopback addresses (got --host {host}); "
                             "create certificates with 'fedpriv certs' and drop --insecure")
    if port == control_port and (host in ("0.0.0.0", "::", "localhost") or _same_ip(host, OPERATOR_HOST)):
        raise UserInputError(f"--port and --control-port are both {port} on {OPERATOR_HOST}; the clients' "
                             "port and the operator's Control API port must differ")
    if port_in_use(host, port):
        raise UserInputError(f"--port {port} on {host} is already in use; pick another port")
    if port_in_use(OPERATOR_HOST, control_port):
        raise UserInputError(f"--control-port {control_port} on {OPERATOR_HOST} is already in use; pick another port")
    if tls is not None and not _names_loopback(tls.server_cert):
        raise UserInputError(f"server certificate {tls.server_cert} does not name {OPERATOR_HOST}, where the "
                             "Control API listens; remake it with 'fedpriv certs --host <clients address> "
                             f"--host {OPERATOR_HOST} --force'")


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _names_loopback(server_cert: Path) -> bool:
    from cryptography import x509

    from fedpriv.common.certificates import load_certificate

    try:
        names = load_certificate(server_cert, "server certificate").extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        return False
    return ipaddress.ip_address(OPERATOR_HOST) in names


class SuperLink:
    """A running ``flower-superlink`` and the ``flwr`` CLI configured to talk to it.

    Clients reach ``host:port`` (Fleet API only); the ``flwr`` CLI here, like the ServerApp, uses
    ``127.0.0.1:control_port``, the only address that answers the Control and Runtime APIs.
    """

    def __init__(self, run_dir: Path, host: str, port: int, tls: ServerTLS | None,
                 control_port: int = CONTROL_PORT) -> None:
        self.run_dir, self.host, self.port, self.tls = Path(run_dir), host, port, tls
        self.control_port = control_port
        self.home = self.run_dir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = venv_env({"FLWR_HOME": str(self.home)})
        self.child: Child | None = None
        self._write_connection()

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{OPERATOR_HOST}:{self.control_port}"']
        lines.append(f'root-certificates = "{self.tls.ca_cert}"' if self.tls else "insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        # Flower's flower-superlink, with a longer SQLite lock wait and every API but the Fleet API on
        # the operator's loopback address only (see server/superlink_process.py)
        fleet_host = f"[{self.host}]" if ":" in self.host else self.host
        argv = [sys.executable, "-m", "fedpriv.server.superlink_process", "--host", OPERATOR_HOST,
                "--port", str(self.control_port), "--fleet-address", f"{fleet_host}:{self.port}",
                "--database", str(self.home / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.tls:
            argv += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                     "--ssl-keyfile", str(self.tls.server_key), "--enable-supernode-auth"]
        else:
            argv += ["--insecure"]
        self.child = Child("superlink", argv, self.run_dir / "logs" / "superlink.log", env=self.env, cwd=self.run_dir)
        probe_host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        if not (wait_for_port(OPERATOR_HOST, self.control_port, timeout, self.child)
                and wait_for_port(probe_host, self.port, timeout, self.child)):
            tail = self.child.tail(3).replace("\n", " | ")
            self.stop()
            raise UserInputError(f"the SuperLink did not start on {self.host}:{self.port} ({tail}); "
                                 f"see {self.run_dir / 'logs' / 'superlink.log'}")
        time.sleep(1.0)  # the HTTP stack answers TCP slightly before its APIs are ready

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.run_dir, capture_output=True, text=True,
                              timeout=timeout)

    def register_keys(self) -> int:
        """Register every client public key (already registered ones are fine). Returns the count.

        This is the only way a key gets in: the Control API that registers keys answers on the
        operator's loopback address only, so the allowed SuperNodes are the ``.pub`` files given to
        ``fedpriv server`` (plus those a previous start with the same run folder registered).
        """
        if not self.tls:
            return 0
        for key in self.tls.client_public_keys:
            res = self.flwr("supernode", "register", str(key), CONNECTION, "--format", "json")
            out = res.stdout + res.stderr
            if res.returncode != 0 and "already" not in out.lower():
                raise UserInputError(f"could not register client key {key}: {_last_line(out)}")
        return len(self.tls.client_public_keys)

    def stop_unfinished_runs(self) -> list[int]:
        """Stop runs a crashed server left behind in the SuperLink's state.

        Its ServerApp process can outlive a SIGKILL of ``fedpriv server`` and reconnect to the
        restarted SuperLink (same address, same state), driving the old run beside the resumed one:
        clients would train each round twice. Returns the stopped run ids.
        """
        res = self.flwr("ls", CONNECTION, "--format", "json", timeout=60)
        try:
            runs = json.loads(res.stdout).get("runs", [])
        except ValueError:
            return []
        stale = [int(r["run-id"]) for r in runs if not str(r.get("status", "")).startswith("finished")]
        for run_id in stale:
            self.flwr("stop", str(run_id), CONNECTION, timeout=60)
        return stale

    def submit(self, cfg: RunConfig) -> int:
        """``flwr run`` the app with ``cfg`` as run config; returns Flower's run id."""
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in cfg.to_dict(kebab=True).items())
        app_dir = write_app_project(self.run_dir / "flower-app")  # the installed package, not a source tree
        res = self.flwr("run", str(app_dir), CONNECTION, "--run-config", overrides, timeout=300)
        match = re.search(r"started run (\d+)", res.stdout + res.stderr)
        if res.returncode != 0 or not match:
            raise UserInputError(f"flwr run failed: {_last_line(res.stdout + res.stderr)}")
        return int(match.group(1))

    def status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            runs = json.loads(res.stdout).get("runs", [])
            return str(runs[0]["status"]) if runs else "unknown"
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def wait(self, run_id: int, poll: Callable[[], None] | None = None, timeout: float = 24 * 3600) -> str:
        """Block until the run finishes (calling ``poll`` in between); returns the final status."""
        deadline = time.monotonic() + timeout
        last_check = 0.0
        while time.monotonic() < deadline:
            if self.child is not None and self.child.poll() is not None:
                raise UserInputError(f"the SuperLink exited unexpectedly; see {self.child.log_path}")
            if poll:
                poll()
            if time.monotonic() - last_check > 3:
                last_check = time.monotonic()
                status = self.status(run_id)
                if status.startswith("finished"):
                    return status
            time.sleep(0.5)
        return "timeout"

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
