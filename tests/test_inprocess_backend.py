"""The in-process simulation transport: Flower Grid semantics without a LinkState."""

from __future__ import annotations

import os
import threading
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.run import Run

from fedpriv.simulations.inprocess_backend import DirectGrid, run_inprocess, worker_count



def _echo_app(delay: float = 0.0) -> ClientApp:
    """Replies with its partition id and how many messages its node has seen (state kept in the Context)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("fail", 0):
            raise ValueError("client exploded")
        msg.content["config"]["mutated"] = 1  # must not reach the server's copy
        seen = int(context.state["seen"]["n"]) + 1 if "seen" in context.state else 1
        context.state["seen"] = ConfigRecord({"n": seen})
        start = time.time()  # wall clock: comparable across the worker processes
        time.sleep(delay)
        metrics = MetricRecord({"pid": int(context.node_config["partition-id"]), "seen": seen, "start": start,
                                "end": time.time(), "os-pid": os.getpid()})
        return Message(RecordDict({"m": metrics}), reply_to=msg)

    return app


def _message(node_id: int, **config) -> Message:
    return Message(RecordDict({"config": ConfigRecord(config)}), node_id, "train")


def test_nodes_get_partitions_and_keep_state_across_messages(task_identity):
    grid = DirectGrid(_echo_app(), 4, Run.create_empty(run_id=7), workers=2)
    try:
        nodes = list(grid.get_node_ids())
        assert len(set(nodes)) == 4
        for expected_seen in (1, 2):
            sent = [_message(n) for n in nodes]
            replies = list(grid.send_and_receive(sent, timeout=30))
            assert len(replies) == 4
            by_id = {m.metadata.message_id: m for m in sent}
            pids = set()
            for reply in replies:
                request = by_id[reply.metadata.reply_to_message_id]
                assert reply.metadata.src_node_id == request.metadata.dst_node_id
                assert reply.metadata.dst_node_id == request.metadata.src_node_id
                assert reply.metadata.message_id and reply.metadata.run_id == 7
                assert reply.content["m"]["seen"] == expected_seen
                pids.add(reply.content["m"]["pid"])
                assert "mutated" not in request.content["config"]  # the client worked on a copy
            assert pids == {0, 1, 2, 3}
    finally:
        grid.shutdown()


def test_client_exception_becomes_an_error_reply(task_identity):
    grid = DirectGrid(_echo_app(), 2, Run.create_empty(run_id=7), workers=2)
    try:
        good, bad = grid.get_node_ids()
        replies = {m.metadata.src_node_id: m for m in grid.send_and_receive([_message(good), _message(bad, fail=1)],
                                                                             timeout=30)}
        assert not replies[good].has_error()
        assert replies[bad].has_error() and "client exploded" in replies[bad].error.reason
    finally:
        grid.shutdown()


def test_pull_returns_only_finished_replies_and_each_once(task_identity):
    grid = DirectGrid(_echo_app(delay=0.3), 1, Run.create_empty(run_id=7), workers=1)
    try:
        (node,) = grid.get_node_ids()
        ids = list(grid.push_messages([_message(node)]))
        assert list(grid.pull_messages(ids)) == []  # still training
        deadline = time.monotonic() + 10
        got = []
        while not got and time.monotonic() < deadline:
            got = list(grid.pull_messages(ids))
            time.sleep(0.02)
        assert len(got) == 1 and list(grid.pull_messages(ids)) == []
    finally:
        grid.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_node_runs_its_messages_one_at_a_time_while_nodes_run_in_parallel(task_identity, workers):
    grid = DirectGrid(_echo_app(delay=0.3), 2, Run.create_empty(run_id=7), workers=workers)
    try:
        a, b = grid.get_node_ids()
        replies = list(grid.send_and_receive([_message(a), _message(a), _message(b)], timeout=30))
    finally:
        grid.shutdown()
    spans = {a: [], b: []}
    for reply in replies:
        spans[reply.metadata.src_node_id].append((reply.content["m"]["start"], reply.content["m"]["end"]))
    a1, a2 = sorted(spans[a])
    assert a2[0] >= a1[1]  # node a: its second message only after its first
    (b1,) = spans[b]
    pids = {r.content["m"]["os-pid"] for r in replies}
    if workers == 1:  # one thread of this process, one message at a time
        assert pids == {os.getpid()}
    else:  # node b overlapped with node a, in another forked worker
        assert b1[0] < a1[1] or b1[0] < a2[1]
        assert len(pids) == 2 and os.getpid() not in pids


def test_run_inprocess_drives_a_server_app_and_returns():
    seen: list[int] = []
    server = ServerApp()

    @server.main()
    def main(grid, context: Context) -> None:
        nodes = list(grid.get_node_ids())
        replies = grid.send_and_receive([_message(n) for n in nodes], timeout=30)
        seen.extend(int(r.content["m"]["pid"]) for r in replies)

    run_inprocess(server, _echo_app(), 3, workers=2)
    assert sorted(seen) == [0, 1, 2]
    assert threading.active_count() < 20  # the pool's threads were released


@pytest.mark.parametrize(("client_cpus", "cpus", "expected"), [(1, 2, 2), (2, 2, 1), (4, 2, 1), (0.5, 2, 4), (1, 8, 8)])
def test_worker_count_follows_ray_rule(client_cpus, cpus, expected):
    assert worker_count(client_cpus, cpus) == expected
