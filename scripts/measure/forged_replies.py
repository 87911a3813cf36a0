"""Each forged reply alone against the server: accepted, dropped, or a server crash? (README: what the server trusts)

Run from anywhere: .venv/bin/python scripts/measure/forged_replies.py (about a minute on 2 cores).
"""
import json, math, sys, tempfile, traceback, logging
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
logging.disable(logging.WARNING)
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY, SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from fedpriv.client.app import simulation_client_app
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.server.app import build_server_app
from fedpriv.simulations.inprocess_backend import DirectGrid

def forge(kind, cfg):
    honest = simulation_client_app(cfg)
    app = ClientApp()
    wk = wire.UNIT_WEIGHT if cfg.central_dp != "off" else wire.NUM_EXAMPLES
    @app.train()
    def train(msg, context):
        reply = honest(message=msg, context=context)
        if int(context.node_config[PARTITION_ID_KEY]) != 1:
            return reply
        m, sent = reply.content[wire.METRICS], msg.content[wire.ARRAYS]
        if kind == "weight 1e9": m[wk] = 10**9
        if kind == "weight 1e-9": m[wk] = 1e-9
        if kind == "weight -5": m[wk] = -5
        if kind == "+1000, steps 1e9":
            m["steps"] = 10**9; reply.content[wire.ARRAYS] = ArrayRecord({k: Array(v.numpy() + 1000.0) for k, v in sent.items()})
        if kind == "-5 x model": reply.content[wire.ARRAYS] = ArrayRecord({k: Array(-5.0 * v.numpy()) for k, v in sent.items()})
        if kind == "zero update": reply.content[wire.ARRAYS] = ArrayRecord({k: Array(v.numpy().copy()) for k, v in sent.items()})
        if kind == "extra metric": m["surprise"] = 1.0
        if kind == "steps list": m["steps"] = [1, 2]
        return reply
    return app

for dp, central in [(True, "off"), (False, "off"), (True, "server-fixed")]:
    for kind in ["weight 1e9", "weight 1e-9", "weight -5", "+1000, steps 1e9", "-5 x model", "zero update", "extra metric", "steps list"]:
        d = tempfile.mkdtemp()
        cfg = RunConfig(num_clients=4, num_rounds=1, local_epochs=1, dp=dp, central_dp=central, run_dir=d).validate()
        run = Run.create_empty(run_id=7)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
        grid = DirectGrid(forge(kind, cfg), 4, run, workers=1)
        try:
            build_server_app(cfg)(grid=grid, context=Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}))
            r = json.loads((Path(d) / "report.json").read_text())["rounds"][0]
            out = "accepted" if "client-1" in r["trained"] else "dropped: " + r["rejected"].get("client-1", "?")[:70]
        except Exception as exc:
            out = f"SERVER CRASH {type(exc).__name__}: {str(exc)[:60]}"
        finally:
            grid.shutdown()
        print(f"dp={dp} central={central} {kind:18s} -> {out}", flush=True)
