"""``fedpriv client``: one data owner's Flower SuperNode, checked before it connects.

Everything that belongs to the data owner travels as Flower node config: where its data is,
its state folder (privacy ledger), its privacy policy and its display name. The server never
sees or sets these; the ClientApp enforces the policy on every round (client/app.py). The checks here turn the
usual mistakes (a missing key, a bad data file, a corrupted ledger, an unreachable server) into
one line before any process starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


from fedpriv.common import wire
from fedpriv.common.config import check_port
from fedpriv.common.errors import UserInputError
from fedpriv.client.ledger import load_ledger
from fedpriv.client.owner_policy import OwnerPolicy
from fedpriv.common.processes import descendants, die_with_parent, venv_env


@dataclass(frozen=True)
class ClientSpec:
    """What ``fedpriv client`` was asked to run."""

    server: str                 # HOST:PORT of the SuperLink
    data: str                   # npz:PATH, csv:PATH, parquet:PATH, images:DIR, or partition:I/N of the run's dataset
    state_dir: Path
    policy: OwnerPolicy
    name: str
    ca_cert: Path | None        # None with --insecure
    private_key: Path | None    # None with --insecure
    local_port: int


def parse_server(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserInputError(f"--server '{server}' must be HOST:PORT, e.g. 10.0.0.5:9092")
    return host.strip("[]"), int(port)


def node_config(spec: ClientSpec) -> str:
    """Flower's ``--node-config`` string (TOML values)."""
    items: dict[str, object] = {wire.NODE_STATE_DIR: str(spec.state_dir.resolve()), wire.NODE_CLIENT_NAME: spec.name,
                                **spec.policy.to_node_config()}
    if spec.data.startswith("partition:"):
        index, total = _partition(spec.data)
        items.update({wire.NODE_PARTITION_ID: index, wire.NODE_NUM_PARTITIONS: total})
    elif spec.data.startswith("npz:"):
        items[wire.NODE_DATA_PATH] = str(Path(spec.data[4:]).expanduser().resolve())
    else:  # csv:, parquet:, images: travel with their format (a bare path is an .npz)
        fmt, _, path = spec.data.partition(":")
        items[wire.NODE_DATA_PATH] = f"{fmt}:{Path(path).expanduser().resolve()}"
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def _partition(data: str) -> tuple[int, int]:
    try:
        index, total = (int(v) for v in data[len("partition:"):].split("/"))
    except ValueError:
        raise UserInputError(f"--data '{data}' must be partition:I/N (e.g. partition:0/3) or npz:PATH") from None
    if not 0 <= index < total:
        raise UserInputError(f"--data '{data}': partition index must be in 0..{total - 1}")
    return index, total


def preflight(spec: ClientSpec, connect_timeout: float = 5.0) -> None:
    """Fail fast, with one line, on anything that would make the SuperNode useless.

    Each refusal is a one-line :class:`~common.errors.FedprivError`: ``spec.local_port`` outside
    1..65535 a :class:`~common.errors.ConfigError`, the policy a ``PrivacyPolicyError``, the data a
    ``DataError``, an unreachable server or bad keys a plain ``FedprivError``.
    """
    from fedpriv.common.certificates import check_key_pair, load_certificate, load_openssh_private_key

    check_port("local-port", spec.local_port)
    spec.policy.validate()
    if spec.data.startswith("npz:"):
        path = Path(spec.data[4:]).expanduser()
        from fedpriv.common.accounting import check_delta
        from fedpriv.common.datasets import npz_records

        x, _, _ = npz_records(path)  # raises a clear error for a missing or malformed file
        check_delta(spec.policy.delta, len(x))
    elif spec.data.startswith(("csv:", "parquet:", "images:")):
        from fedpriv.common.accounting import check_delta
        from fedpriv.common.tabular import check_owner_file

        check_delta(spec.policy.delta, check_owner_file(spec.data))  # file-level mistakes, before connecting
    elif spec.data.startswith("partition:"):
        _partition(spec.data)
    else:
        raise UserInputError(f"--data '{spec.data}' must be npz:PATH, csv:PATH, parquet:PATH, images:DIR or partition:I/N")
    _check_state_dir(spec.state_dir)
    if spec.private_key is not None:
        load_openssh_private_key(spec.private_key)
        public = spec.private_key.with_name(spec.private_key.name + ".pub")
        if public.exists():
            check_key_pair(spec.private_key, public)
    if spec.ca_cert is not None:
        load_certificate(spec.ca_cert, "--ca certificate")
    host, port = parse_server(spec.server)
    try:
        with socket.create_connection((host, port), timeout=connect_timeout):
            pass
    except OSError as exc:
        raise UserInputError(f"cannot reach the server at {spec.server} ({exc.strerror or exc}); "
                             "check --server and that 'fedpriv server' is running") from None


def _check_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(f"--state-dir {state_dir} is not writable ({exc.strerror}); choose another folder") from None
    load_ledger(state_dir)  # a corrupted or foreign ledger (new or old layout) stops the client here, untouched


def supernode_argv(spec: ClientSpec) -> list[str]:
    argv = ["flower-supernode", "--superlink", spec.server, "--node-config", node_config(spec),
            "--port", str(spec.local_port)]
    if spec.ca_cert is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(spec.ca_cert), "--auth-supernode-private-key", str(spec.private_key)]
    return argv


def run_supernode(argv: list[str], insecure: bool = False) -> tuple[int, str]:
    """Run the SuperNode in the foreground, echoing its log; map known failures to one line.

    The SuperNode starts a SuperExec child that may outlive it and keep the log pipe open, so the
    wait is on the SuperNode itself, and every descendant seen meanwhile is stopped afterwards.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=venv_env(),
                            preexec_fn=die_with_parent)
    tail: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.strip())
            del tail[:-40]

    threading.Thread(target=pump, daemon=True).start()
    family: set[int] = set()
    try:
        while proc.poll() is None:
            family.update(descendants(proc.pid))
            time.sleep(0.5)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=15)
        raise
    finally:
        for pid in family:
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    time.sleep(0.3)  # let the pump catch the last lines
    code = proc.returncode
    text = "\n".join(tail)
    if code == 0:
        return 0, ""
    if "Failed to activate SuperNode" in text or "No SuperNode found" in text:
        return code, "the server refused this client: its public key is not registered there (ask the operator to add it)"
    if insecure:
        return code, ("TLS handshake with the server failed: it did not accept a plaintext (--insecure) client; "
                      "connect with --ca and --key")
    if "Server disconnected" in text or "SSL" in text or "certificate" in text.lower():
        return code, "TLS handshake with the server failed: check --ca, and do not use --insecure against a TLS server"
    return code, f"the SuperNode exited with code {code}: {tail[-1] if tail else 'no output'}"
