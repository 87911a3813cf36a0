"""Entry point that runs Flower's ``flower-superlink`` with a longer SQLite busy timeout.

Why: Flower 1.42 opens its SuperLink state with ``PRAGMA busy_timeout = 5000``. With ten SuperNodes
pushing replies at once on a 2-core machine, a request can wait more than 5 s for SQLite's write lock
(each write is short, but its thread is starved of CPU). Flower then answers that push with HTTP 500
and the SuperNode drops the reply for good, so the round waits out ``--round-timeout`` without that
client. Waiting longer for the lock only delays a write; it never changes what is written.

With ``--fleet-address HOST:PORT`` (what ``fedpriv server`` passes) it also splits the addresses.
Flower 1.42 serves its Fleet, Control and Runtime APIs from one HTTP server on ``--host:--port``,
and without OIDC its Control API authenticates nobody: whoever reaches that port can register a
SuperNode key (``flwr supernode register``), list, start and stop runs, and the Runtime API
(unauthenticated in subprocess isolation) would let them claim the ServerApp's task. So Flower's
own app listens on two sockets: Flower's ``--host:--port`` is the operator's address (loopback
only) and answers everything; the fleet address answers only the Fleet API, where SuperNode
authentication admits registered keys only, and ``/health`` (see :class:`FleetOnlyElsewhere`).
"""

from __future__ import annotations

import importlib
import ipaddress
import socket
import sys

import fedpriv.common  # noqa: F401  (first: turns Flower's telemetry off before flwr is imported)

BUSY_TIMEOUT_MS = 120_000
FLEET_ADDRESS_FLAG = "--fleet-address"
FLEET_PATH_PREFIX = "/v1/fleet/"  # every Fleet API route; SuperNodes call nothing else on the SuperLink
PUBLIC_PATHS = frozenset({"/health"})
REFUSED = b"not served on this address: the Control and Runtime APIs answer the operator only\n"


def patch_sqlite_busy_timeout(timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
    """Make every SQLite connection Flower opens in this process wait ``timeout_ms`` for a lock."""
    from flwr.supercore import sql_mixin

    pragmas = [(name, value) for name, value in sql_mixin.SQLITE_PRAGMAS if name != "busy_timeout"]
    sql_mixin.SQLITE_PRAGMAS = (("busy_timeout", str(timeout_ms)), *pragmas)


class FleetOnlyElsewhere:
    """ASGI wrapper around Flower's SuperLink app: off the operator's address, only the Fleet API.

    Contract: a request reaches Flower unchanged if its connection was accepted on the operator's
    address ``operator`` (Flower's ``--host:--port``), or if its path is a Fleet API route or
    ``/health``. Any other request (Control API: register/list/start/stop; Runtime API; ``/docs``)
    is answered 403 before Flower sees it. The decision uses the local address the TCP connection
    was accepted on (``scope["server"]``, from the socket's ``getsockname``), never a header, so a
    client cannot pick it; a connection whose local address is unknown counts as not the operator's.
    """

    def __init__(self, app, operator: tuple[str, int]) -> None:
        self.app = app
        self.operator = (_normal_host(operator[0]), int(operator[1]))

    def allows(self, scope: dict) -> bool:
        server = scope.get("server")
        if server and (_normal_host(str(server[0])), server[1]) == self.operator:
            return True
        path = scope.get("path", "")
        return path.startswith(FLEET_PATH_PREFIX) or path in PUBLIC_PATHS

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(REFUSED)).encode())]})
            await send({"type": "http.response.body", "body": REFUSED})
        else:
            await send({"type": "websocket.close", "code": 1008})


def _normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def pop_fleet_address(argv: list[str]) -> tuple[tuple[str, int] | None, list[str]]:
    """``(host, port)`` of ``--fleet-address HOST:PORT`` (or ``=``), and ``argv`` without it."""
    rest, fleet = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == FLEET_ADDRESS_FLAG or arg.startswith(FLEET_ADDRESS_FLAG + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                sys.exit(f"{FLEET_ADDRESS_FLAG} needs HOST:PORT (got {value!r})")
            fleet = (host.strip("[]"), int(port))
            continue
        rest.append(arg)
        i += 1
    return fleet, rest


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (bound here, so a taken port fails before Flower starts)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    return sock


def serve_split(fleet: tuple[str, int]) -> None:
    """Run Flower's SuperLink app on the operator's address (all APIs) and on ``fleet`` (Fleet API).

    Flower's own pieces do the work: its flag parsing and checks, its FastAPI app and lifespan
    (state, SuperExec, the ServerApp's Runtime API connection to ``--host:--port``), its TLS and
    uvicorn settings; only the second listening socket and :class:`FleetOnlyElsewhere` are ours.
    ``_parse_superlink_lifespan_config`` is private to Flower: if a Flower upgrade renames it, the
    SuperLink fails to start (closed), it does not fall back to serving everything.
    """
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # the module, not the function of the same name that flwr.superlink.cli exports
    flower_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")

    config = flower_cli._parse_superlink_lifespan_config()  # Flower's flags, from sys.argv
    if not _is_loopback(config.host):
        sys.exit(f"with {FLEET_ADDRESS_FLAG}, --host (the operator's Control API) must be a loopback address "
                 f"(got {config.host})")
    fleet_ip = _normal_host(fleet[0])
    if fleet[1] == config.port and fleet_ip in (_normal_host(config.host), "0.0.0.0", "::"):
        sys.exit(f"{FLEET_ADDRESS_FLAG} {fleet[0]}:{fleet[1]} overlaps the operator's {config.host}:{config.port}")
    sockets = [_listen(config.host, config.port), _listen(*fleet)]
    operator = sockets[0].getsockname()[:2]  # as scope["server"] will show it
    app = FleetOnlyElsewhere(create_app(config, flower_cli.SuperLinkLifespan), operator)
    print(f"SuperLink: Fleet API on {fleet[0]}:{fleet[1]}; Control and Runtime APIs on "
          f"{config.host}:{config.port} only", flush=True)
    uvicorn.Server(uvicorn.Config(
        app=app, host=config.host, port=config.port, reload=False, access_log=True, workers=1,
        log_config=get_uvicorn_log_config(console_handler.level), proxy_headers=False,
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
    )).run(sockets=sockets)


def main() -> None:
    patch_sqlite_busy_timeout()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    fleet, flower_args = pop_fleet_address(sys.argv[1:])
    sys.argv = ["flower-superlink", *flower_args]
    if fleet is None:
        flower_superlink()  # Flower's own command: every API on --host:--port
    else:
        serve_split(fleet)


if __name__ == "__main__":
    main()
