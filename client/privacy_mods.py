"""Flower client mods for the server's privacy options, applied only when a message asks for them.

Flower's ``secaggplus_mod`` (SecAgg+, behind client/secagg_guard.py's checks against a server that
lies about dropouts) and ``fixedclipping_mod`` / ``adaptiveclipping_mod``
(central DP with client-side clipping) each fail on a training message that was not meant for
them, so one ClientApp serving every kind of run dispatches on what the message carries.
SecAgg+ speaks Flower's legacy FitIns/FitRes records; ``_named_records`` translates those to and
from this project's message layout, so the training code is the same with or without it.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.app import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpriv.client.secagg_guard import guarded_secaggplus_mod
from fedpriv.common import wire

ARRAY_NAMES = wire.ARRAY_NAMES  # set by server/secure_aggregation.py: legacy Parameters carry no names
FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


def privacy_mods(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Route a training message through SecAgg+ and/or client-side clipping when it asks for them."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return guarded_secaggplus_mod(msg, ctxt, _named_records(call_next))
    config = msg.content.config_records.get(wire.CONFIG)
    if config is not None and KEY_CLIPPING_NORM in config:
        clipping = adaptiveclipping_mod if str(config.get(wire.CENTRAL_DP, "")).endswith("adaptive") else fixedclipping_mod
        return clipping(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _named_records(call_next: ClientAppCallable) -> ClientAppCallable:
    """Present SecAgg+'s FitIns as our records, and our reply as the FitRes SecAgg+ masks.

    The reply keeps its metrics and privacy records: they are the client's public privacy
    accounting, sent in the clear beside the masked vector (SecAgg+ hides the model, not them).
    """

    def call(msg: Message, ctxt: Context) -> Message:
        fit_config = dict(msg.content.config_records[FITINS_CONFIG])
        names = [str(n) for n in fit_config.pop(ARRAY_NAMES)]
        legacy = msg.content.array_records[FITINS_ARRAYS]
        arrays = ArrayRecord({name: Array(legacy[key].numpy()) for name, key in zip(names, legacy.keys(), strict=True)})
        inner = Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(fit_config)}),
                        metadata=msg.metadata)
        reply = call_next(inner, ctxt)
        if reply.has_error():
            return reply
        content = reply.content
        metrics = content.metric_records[wire.METRICS]
        # A client that declined (privacy budget) contributes weight 0 and the unchanged global model.
        trained = content.array_records.get(wire.ARRAYS, arrays)
        weight = int(metrics.get(wire.NUM_EXAMPLES, 0)) if wire.ARRAYS in content.array_records else 0
        out = RecordDict({
            wire.METRICS: metrics,
            wire.PRIVACY: content.config_records[wire.PRIVACY],
            "fitres.parameters": ArrayRecord({str(i): trained[name] for i, name in enumerate(names)}),
            "fitres.num_examples": MetricRecord({"num_examples": weight}),
            "fitres.metrics": ConfigRecord({}),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
        })
        return Message(out, reply_to=msg)

    return call
