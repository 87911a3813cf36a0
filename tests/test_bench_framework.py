"""Smoke tests of ``fedpriv bench framework|scale|deployment|peer`` at tiny sizes (no timed asserts).

Unit tests check the analysis on hand-made timelines and the one-line errors; the e2e tests run
each kind of measured child once (a simulation, the plain loop, Flower's Opacus example workflow,
a SecAgg+ federation of processes) and render the benches' tables from what they return.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from fedpriv.simulations.bench import deployment, framework, peer_example, runner, scale, shared
from fedpriv.simulations.bench import peer as peer_bench  # "peer" names a child result below
from fedpriv.simulations.cli import app


# ---------------------------------------------------------------------------------------- unit
@pytest.mark.parametrize("args, needle", [
    (["framework", "--clients", "1"], "--clients"),
    (["framework", "--num-rounds", "0"], "--num-rounds"),
    (["scale", "--clients", "50", "--small", "100"], "--small"),
    (["scale", "--num-rounds", "1"], "--num-rounds"),
    (["deployment", "--clients", "2"], "SecAgg+"),
    (["peer", "--num-rounds", "1"], "--num-rounds"),
])
def test_bad_input_is_one_line(args, needle):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


def _sim_result(wall: float = 30.0) -> runner.ChildResult:
    """A simulation child's report with round numbers chosen by hand (launch at t=100)."""
    rounds = [{"round": 1, "start": 110.0, "end": 120.0, "clients": 2},
              {"round": 2, "start": 120.0, "end": 122.0, "clients": 2},
              {"round": 3, "start": 122.0, "end": 125.0, "clients": 2}]
    trace = [{"pid": 1, "in": 117.0, "out": 118.0, "proc_start": 111.0},
             {"pid": 2, "in": 118.0, "out": 118.5, "proc_start": 111.0},
             {"pid": 1, "in": 120.5, "out": 121.0, "proc_start": 111.0}]
    marks = {"main": 101.0, "imported": 106.0, "simulate": 107.0, "returned": 127.0}
    return runner.ChildResult("sim", "t", wall, {"marks": marks, "rounds": rounds, "trace": trace, "launch": 100.0})


def test_breakdown_from_marks_rounds_and_trace():
    parts = framework.sim_breakdown(_sim_result())
    assert parts["interpreter+imports"] == pytest.approx(6.0)
    assert parts["setup to round 1"] == pytest.approx(3.0)
    assert parts["round 1: until first client runs"] == pytest.approx(7.0)
    assert parts["round 1: rest"] == pytest.approx(3.0)
    assert parts["rounds 2..R (each, median)"] == pytest.approx(2.5)
    assert parts["client handler (each call, median)"] == pytest.approx(0.5)
    assert parts["final write + shutdown"] == pytest.approx(2.0)
    assert parts["interpreter exit"] == pytest.approx(3.0)


def test_tables_compute_ratios_from_medians():
    sim = _sim_result()
    peer_rounds = [{"round": r, "start": 0.0, "fit_end": 4.0, "end": 5.0 * (r == 1) + 7.5} for r in (1, 2, 3)]
    peer = runner.ChildResult("peer", "p", 60.0, {"rounds": peer_rounds})
    base = {"num_clients": 2, "num_rounds": 3, "dataset": "digits", "local_epochs": 1}
    _, speedup, train_speedup = peer_bench.peer_table({"sim": [sim], "peer": [peer]}, base)
    assert speedup == pytest.approx(7.5 / 2.5) and train_speedup == pytest.approx(4.0 / 2.5)

    slow = runner.ChildResult("sim", "t", 30.0, {"rounds": [{"start": 0, "end": 9}, {"start": 9, "end": 14},
                                                        {"start": 14, "end": 19}]})
    _, growth = scale.scale_table({10: [sim], 100: [slow]}, per_round=2, num_rounds=3, mnist1d_samples=100)
    assert growth == pytest.approx(5.0 / 2.5)

    runs = {(3, False): [{"seconds": [2.0, 4.0], "wall": 50}], (3, True): [{"seconds": [6.0, 6.0], "wall": 70}]}
    table = deployment.deployment_table(runs, num_rounds=2, local_epochs=1)
    assert list(table.columns[3].cells) == ["2.00"]

    row = framework.FrameworkRow(2, sims=[sim], loops=[runner.ChildResult("loop", "l", 20.0, {"compute_s": 12.0})])
    assert row.ratio() == pytest.approx(30.0 / 12.0)


def test_tree_memory_sums_a_process_and_its_children():
    code = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3)']); time.sleep(3); p.wait()"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with runner.TreeMemory(proc.pid, interval=0.1) as memory:
        time.sleep(1.5)
    proc.wait()
    assert memory.peak_procs >= 2
    assert memory.peak_pss > 0 and memory.peak_rss >= memory.peak_pss


def test_runner_kills_the_whole_tree_on_timeout(tmp_path):
    """The shared runner (every bench's child processes): a child out of time leaves nothing behind."""
    import os

    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    with pytest.raises(subprocess.TimeoutExpired):
        runner.run_process([sys.executable, "-c", code], tmp_path / "log", env=dict(os.environ), timeout=3,
                           memory=False)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{grandchild}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # killed, waiting for its (also killed) parent's reaper
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} outlived the timeout")
    done = runner.run_process([sys.executable, "-c", "print('hi')"], tmp_path / "log2", env=dict(os.environ),
                              timeout=30)
    assert done.code == 0 and done.wall_s > 0 and (tmp_path / "log2").read_text().strip() == "hi"


def test_peer_loader_yields_dict_batches_of_the_same_records(monkeypatch):
    import numpy as np

    from fedpriv.client.local_data import local_data
    from fedpriv.common.config import RunConfig

    cfg = RunConfig(num_clients=4, batch_size=16)
    monkeypatch.setenv("FEDPRIV_PEER_CONFIG", json.dumps(cfg.to_dict(kebab=True)))
    _, data, train_loader, test_loader = peer_example._peer_load_data(1, 4)
    batch = next(iter(train_loader))
    assert set(batch) == {"image", "label"}
    assert tuple(batch["image"].shape[1:]) == data.input_shape and batch["label"].dtype.is_floating_point is False
    mine = local_data(cfg, {"partition-id": 1, "num-partitions": 4})
    assert np.array_equal(np.stack([train_loader.dataset[i]["image"].numpy() for i in range(len(mine.x))]), mine.x)
    assert 0 < len(test_loader.dataset) < len(train_loader.dataset)


# ---------------------------------------------------------------------------------------- e2e
@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    """One tiny simulation child in the scale bench's shape: 4 clients, 2 sampled per round, 2 rounds."""
    work = tmp_path_factory.mktemp("bench-sim")
    cfg = shared.sim_config(scale.scale_config(4, 2, 2, 1000), work / "run", local_epochs=1)
    return cfg, runner.run_child("sim", {"config": cfg}, "smoke", timeout=240)


@pytest.mark.e2e
def test_simulation_and_loop_children(sim_run, tmp_path):
    cfg, sim = sim_run
    assert [r["clients"] for r in sim.data["rounds"]] == [2, 2]
    assert len(sim.data["trace"]) == 4  # every training message went through the traced ClientApp
    parts = framework.sim_breakdown(sim)
    assert all(math.isfinite(v) and v >= 0 for k, v in parts.items() if k != "interpreter exit"), parts
    assert sim.peak_procs >= 1 and sim.peak_pss > 0  # the in-process simulation is one process

    loop = runner.run_child("loop", {"config": {**cfg, "run_dir": str(tmp_path)}, "threads": 1}, "smoke", timeout=240)
    assert loop.data["compute_s"] > 0 and loop.data["threads"] == 1
    row = framework.FrameworkRow(4, sims=[sim], loops=[loop])
    ratio, parts_table = framework.framework_tables([row], {**cfg, "_train_size": 800})
    assert math.isfinite(row.ratio()) and parts_table.row_count == len(parts) + 1
    _, growth = scale.scale_table({4: [sim], 8: [sim]}, per_round=2, num_rounds=2, mnist1d_samples=1000)
    assert growth == pytest.approx(1.0)


@pytest.mark.e2e
def test_peer_workflow_child(sim_run, tmp_path):
    base = peer_bench.peer_config(2, 2, 1, "digits")
    peer = runner.run_child("peer", {"config": shared.sim_config(base, tmp_path / "peer")}, "smoke", timeout=240)
    rounds = peer.data["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["start"] <= r["fit_end"] <= r["end"] for r in rounds)  # fit, then federated evaluate
    _, speedup, _ = peer_bench.peer_table({"sim": [sim_run[1]], "peer": [peer]}, base)
    assert math.isfinite(speedup) and speedup > 0


def test_deployment_configs_differ_only_in_secure_aggregation(tmp_path):
    plain, secure = (deployment.deployment_config(3, 1, 1, s, 240, tmp_path) for s in (False, True))
    assert {k for k in plain if plain[k] != secure[k]} == {"secure_aggregation"} and secure["secure_aggregation"]


@pytest.mark.e2e
def test_deployment_run(tmp_path):
    """Plain aggregation: SecAgg+ rounds take twice as long here and tests/test_secure_aggregation.py runs them."""
    cfg = deployment.deployment_config(3, 1, 1, False, 240, tmp_path / "fed")
    out = deployment.deployment_run(cfg, tmp_path / "fed", timeout=300)
    assert out["aggregation"] == ["plain"] and len(out["seconds"]) == 1 and out["seconds"][0] > 0
    assert out["wall"] >= out["seconds"][0]
