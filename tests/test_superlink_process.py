"""The SuperLink entry point's SQLite lock wait (see server/superlink_process.py)."""

from __future__ import annotations

from flwr.supercore import sql_mixin
from flwr.supercore.sql_mixin import SqlMixin

from fedpriv.server.superlink_process import BUSY_TIMEOUT_MS, patch_sqlite_busy_timeout


class _Store(SqlMixin):
    """The smallest Flower SQL store: Flower's own connection setup, no tables."""


def test_patched_connections_wait_longer_for_the_lock_and_keep_flowers_other_pragmas(monkeypatch) -> None:
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # undone after the test
    original = dict(sql_mixin.SQLITE_PRAGMAS)
    assert int(original["busy_timeout"]) < BUSY_TIMEOUT_MS

    patch_sqlite_busy_timeout()
    store = _Store(":memory:")
    store.initialize()

    assert store.query("PRAGMA busy_timeout")[0]["timeout"] == BUSY_TIMEOUT_MS
    assert store.query("PRAGMA foreign_keys")[0]["foreign_keys"] == 1
    assert {k: v for k, v in sql_mixin.SQLITE_PRAGMAS if k != "busy_timeout"} == \
        {k: v for k, v in original.items() if k != "busy_timeout"}


# --------------------------------------------------------------------------- the address split (issue 12)

import asyncio  # noqa: E402

import pytest  # noqa: E402

from fedpriv.common.certificates import make_certificates  # noqa: E402
from fedpriv.common.errors import UserInputError  # noqa: E402
from fedpriv.server.superlink import ServerTLS, check_bind  # noqa: E402
from fedpriv.server.superlink_process import FleetOnlyElsewhere, pop_fleet_address  # noqa: E402
from fedpriv.common.processes import free_port  # noqa: E402

OPERATOR = ("127.0.0.1", 9093)


def _call(path: str, server, kind: str = "http") -> tuple[bool, list[dict]]:
    """Through the gate for the operator's address OPERATOR: (whether Flower's app was called, what
    the gate sent itself)."""
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"] if "path" in scope else scope["type"])

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": kind, "path": path, "server": server}
    asyncio.run(FleetOnlyElsewhere(app, OPERATOR)(scope, receive, send))
    return bool(reached), sent


@pytest.mark.parametrize("path", ["/v1/control/register-node", "/v1/control/list-runs", "/v1/control/start-run",
                                  "/v1/control/stop-run", "/v1/runtime/acquire-task", "/v1/fleet/pull-messages"])
def test_the_operators_address_reaches_every_api(path):
    assert _call(path, OPERATOR)[0]


@pytest.mark.parametrize("server", [("127.0.0.2", 9092), ("10.0.0.5", 9093), ("127.0.0.1", 9092), None])
@pytest.mark.parametrize("path", ["/v1/control/register-node", "/v1/control/list-nodes", "/v1/control/list-runs",
                                  "/v1/control/start-run", "/v1/control/stop-run", "/v1/runtime/acquire-task",
                                  "/v1/runtime/push-messages", "/docs", "/openapi.json", "/", "/v1/fleetx"])
def test_any_other_address_gets_403_for_everything_but_the_fleet_api(path, server):
    reached, sent = _call(path, server)
    assert not reached
    assert sent[0]["status"] == 403 and b"operator only" in sent[1]["body"]
    reached, sent = _call(path, server, kind="websocket")
    assert not reached and sent == [{"type": "websocket.close", "code": 1008}]


@pytest.mark.parametrize("path", ["/v1/fleet/register-node", "/v1/fleet/activate-node", "/v1/fleet/pull-messages",
                                  "/v1/fleet/push-object", "/health"])
def test_the_fleet_api_and_health_answer_everywhere(path):
    assert _call(path, ("127.0.0.2", 9092))[0]


def test_lifespan_events_pass_through():
    assert _call("", None, kind="lifespan")[0]


def test_pop_fleet_address():
    assert pop_fleet_address(["--host", "127.0.0.1", "--fleet-address", "0.0.0.0:9092", "--insecure"]) == \
        (("0.0.0.0", 9092), ["--host", "127.0.0.1", "--insecure"])
    assert pop_fleet_address(["--fleet-address=[::]:9092"]) == (("::", 9092), [])
    assert pop_fleet_address(["--port", "9093"]) == (None, ["--port", "9093"])
    for bad in (["--fleet-address"], ["--fleet-address", "9092"], ["--fleet-address", "h:0"],
                ["--fleet-address", "h:x"]):
        with pytest.raises(SystemExit):
            pop_fleet_address(bad)


def test_check_bind_refuses_clashing_ports_and_a_certificate_without_loopback(tmp_path):
    port = free_port()
    for host in ("127.0.0.1", "0.0.0.0", "localhost"):
        with pytest.raises(UserInputError, match="must differ"):
            check_bind(host, port, False, port)
    check_bind("127.0.0.2", port, False, port)  # same number on another address: no clash
    public = make_certificates(tmp_path / "a", hosts=["server.example.org", "10.0.0.5"], num_clients=1)
    tls = ServerTLS(public.ca_cert, public.server_cert, public.server_key, tuple(public.client_public_keys))
    with pytest.raises(UserInputError, match="does not name 127.0.0.1"):
        check_bind("0.0.0.0", free_port(), False, free_port(), tls)
    good = make_certificates(tmp_path / "b", hosts=["server.example.org", "127.0.0.1"], num_clients=1)
    check_bind("0.0.0.0", free_port(), False, free_port(),
               ServerTLS(good.ca_cert, good.server_cert, good.server_key, tuple(good.client_public_keys)))
