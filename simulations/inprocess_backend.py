"""In-process simulation: the ServerApp's Grid hands each message straight to the ClientApp.

Why not Flower's Simulation Engine (``run_simulation``, still available as ``--simulation-backend
ray``): measured on 2 cores (50 clients, digits CNN, 3 rounds), Ray was most of a short run's wall
time (8.4 s before the first actor ran a client, 8.0 s more while the other actors imported torch
and Opacus, 3.2 s of shutdown). The engine's message bus also polls its in-memory LinkState every
0.1 s with one lookup per virtual SuperNode, each scanning every queued message; with ClientApps
in threads of the same process under that engine, the polling slowed local training by 60 %
(0.154 s vs 0.096 s per client round, MNIST-1D CNN).

What stays Flower's: the same ``ServerApp`` and ``ClientApp`` objects (mods included), talking
through Flower's ``Grid`` interface with Flower ``Message``s, ``Context``s and error replies, as on
the Simulation Engine. What this module adds is only the transport: :class:`DirectGrid` runs each
pushed message on a worker and returns the reply when it is pulled. Like Ray's actor pool it runs
one client per ``client-cpus`` of the machine at a time (in processes forked from this one when
there are several, since DP-SGD's Python-heavy steps would wait for the GIL in threads), passes
each message by copy, handles a SuperNode's messages one at a time, and turns a ClientApp
exception into an error reply. It does not give GPU scheduling, and a worker that dies (e.g.
killed for memory) fails the rest of the run's messages: use Ray for those cases.
"""


from __future__ import annotations

import copy
import importlib
import multiprocessing
import os
import secrets
import threading
import traceback
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from logging import getLogger
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = getLogger("fedpriv.simulation")


def worker_count(client_cpus: float, cpus: int | None = None) -> int:
    """Clients trained at once: the machine's CPUs over each client's share, at least one (Ray's rule)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, int(cpus // max(client_cpus, 1e-9)))


_WORKER_APP: ClientApp | None = None  # set in the parent just before forking; inherited by the workers


def _run_in_worker(message: Message, context: Context) -> tuple[Message, Context]:
    """Body of a forked worker task: the same ClientApp call, its Context going back with the reply."""
    assert _WORKER_APP is not None, "worker forked without a ClientApp"
    return _call_app(_WORKER_APP, message, context), context


def _call_app(app: ClientApp, msg: Message, context: Context) -> Message:
    try:
        return app(message=msg, context=context)
    except Exception as ex:  # the server sees an error reply, as from the Simulation Engine
        log.error("ClientApp failed on node %s: %s\n%s", context.node_id, ex, traceback.format_exc())
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex).__name__}: {ex}"),
                       reply_to=msg)


class DirectGrid(Grid):
    """A Grid whose SuperNodes are ClientApp calls: in this thread pool, or in forked worker processes.

    With one worker the ClientApp runs in a thread of this process. With more, each runs in one of
    ``workers`` processes forked from this one when the grid is made (so they start with PyTorch,
    Opacus and the ``preload`` modules already imported, in milliseconds): training is Python-heavy
    (Opacus' hooks, the optimizer), and threads of one process would mostly wait for the GIL.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run: Run, workers: int,
                 preload: tuple[str, ...] = ()) -> None:
        self._app, self._run = client_app, run
        ids: set[int] = set()
        while len(ids) < num_nodes:  # random 63-bit ids, as the SuperLink assigns them
            ids.add(secrets.randbits(63) or 1)
        self._contexts = {
            node_id: Context(run_id=run.run_id, node_id=node_id, state=RecordDict(), run_config={},
                             node_config={PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes})
            for i, node_id in enumerate(sorted(ids))
        }
        self._node_locks = {node_id: threading.Lock() for node_id in self._contexts}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clientapp")
        self._processes = _fork_workers(client_app, workers, preload) if workers > 1 else None
        self._pending: dict[str, Future[Message]] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- Grid interface
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no SuperNode {msg.metadata.dst_node_id} in this simulation")
            msg.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            future = self._pool.submit(self._handle, copy.deepcopy(msg))
            with self._lock:
                self._pending[message_id] = future
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            done = [i for i in message_ids if i in self._pending and self._pending[i].done()]
            futures = [self._pending.pop(i) for i in done]
        return [f.result() for f in futures]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        with self._lock:
            futures = [self._pending[i] for i in ids]
        wait(futures, timeout=timeout)
        return self.pull_messages(ids)

    # ----------------------------------------------------------------- running
    def _handle(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        with self._node_locks[node_id]:  # a SuperNode runs its messages one after another
            if self._processes is None:
                reply = _call_app(self._app, copy.deepcopy(msg), self._contexts[node_id])
            else:  # pickled both ways, as Ray does; the node's updated Context comes back with the reply
                try:
                    reply, self._contexts[node_id] = self._processes.submit(
                        _run_in_worker, msg, self._contexts[node_id]).result()
                except BrokenProcessPool as ex:  # a worker died (e.g. out of memory): every later call fails too
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                          reason=f"simulation worker process died: {ex}"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def shutdown(self) -> None:
        """Wait for running ClientApps (a timed-out round may leave some), then release threads and workers."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)


def _fork_workers(app: ClientApp, workers: int, preload: tuple[str, ...]) -> ProcessPoolExecutor:
    """``workers`` processes forked now, each holding ``app`` and the ``preload`` modules."""
    global _WORKER_APP
    for module in preload:  # imported once here rather than once per worker after the fork
        importlib.import_module(module)
    _WORKER_APP = app
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    wait([pool.submit(_noop) for _ in range(workers)])
    return pool


def _noop() -> int:
    return os.getpid()


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_supernodes: int, workers: int,
                  preload: tuple[str, ...] = ()) -> None:
    """Run ``server_app`` against ``num_supernodes`` virtual SuperNodes served by ``client_app``."""
    run = Run.create_empty(run_id=secrets.randbits(63) or 1)
    # Messages take their sender from the task identity, as run_simulation and the ServerApp
    # process set it for their ServerApp.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    grid = DirectGrid(client_app, num_supernodes, run, workers, preload)
    context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config={})
    try:
        server_app(grid=grid, context=context)
    finally:
        grid.shutdown()
