"""A simulation in which some data owners send malformed updates; used by the tests.

client-0 sends NaN weights, client-1 a tensor of the wrong shape, client-2 an update a thousand
times larger than DP-SGD could produce; the others are the real, honest ClientApp. The server is
the real ServerApp loop. Usage: python -m tests.apps.malicious_simulation RUN_DIR
"""

from __future__ import annotations

import sys

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedpriv.client.app import simulation_client_app
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.server.app import build_server_app
from fedpriv.simulations.inprocess_backend import run_inprocess
from tests.conftest import PREVIOUS_TRAINING

app = ClientApp()
CFG = RunConfig(num_clients=5, num_rounds=2, **PREVIOUS_TRAINING)  # "learnt from the honest two" within 2 rounds
honest = None  # the honest ClientApp of the run, made in __main__ once its run folder is known


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest(message=msg, context=context)
    pid = int(context.node_config["partition-id"])
    if pid > 2:
        return reply
    sent = msg.content[wire.ARRAYS]
    arrays = reply.content[wire.ARRAYS]
    tampered = {}
    for i, name in enumerate(arrays.keys()):
        value = arrays[name].numpy().copy()
        if pid == 0 and i == 0:
            value[...] = np.nan
        elif pid == 1 and i == 0:
            value = np.zeros((3, 3), dtype=value.dtype)
        elif pid == 2:
            value = sent[name].numpy() + 1000.0 * (value - sent[name].numpy()) + 10.0
        tampered[name] = Array(value)
    reply.content[wire.ARRAYS] = ArrayRecord(tampered)
    return reply


if __name__ == "__main__":
    cfg = RunConfig(**{**CFG.to_dict(), "run_dir": sys.argv[1]}).validate()
    honest = simulation_client_app(cfg)
    run_inprocess(build_server_app(cfg), app, 5, workers=2)
