"""One training round under Flower's SecAgg+ workflow, driven from our own round loop.

Flower's ``SecAggPlusWorkflow`` runs the protocol (key setup, secret sharing, masked vectors,
unmasking, dropout recovery); this module only adapts it to our loop: it hands the workflow the
clients our strategy already sampled, keeps the unmasked weighted average it produces, and keeps
each client's privacy record (plain metadata that travels beside the masked vector). The server
never holds an individual client's model: only masked vectors and their sum.

That holds for an honest-but-curious server, which runs the workflow as written and relays the
clients' public keys unchanged. The clients (client/secagg_guard.py) refuse to unmask when the
server's node lists contradict themselves or the earlier stages, so a server that lies about who
dropped out learns nothing more; one that substitutes keys is not detected (SecAgg+ has no PKI).
Values the quantiser clips are counted by each client and returned in ``SecureRound.clipped``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedpriv.common import wire
from fedpriv.common.config import RunConfig

log = logging.getLogger("fedpriv.server")

ARRAY_NAMES = wire.ARRAY_NAMES  # fit-config key: the model's array names, since legacy Parameters are unnamed


@dataclass
class SecureRound:
    """What a SecAgg+ round left the server with."""

    aggregate: ArrayRecord | None  # the unmasked weighted average, None if the protocol halted
    replies: list[Message]  # per-client replies of the masked-vector stage (metrics and privacy only)

    @property
    def clipped(self) -> dict[str, int]:
        """Client id -> how many of its (weight-scaled) values SecAgg+'s quantiser clipped to its range.

        Only clients that clipped any; their part of the aggregate is wrong at those values.
        """
        counts = {str(m.content[wire.PRIVACY].get(wire.CLIENT_ID, f"node-{m.metadata.src_node_id}")):
                  int(m.content[wire.METRICS].get(wire.SECAGG_CLIPPED, 0))
                  for m in self.replies if wire.METRICS in m.content.metric_records}
        return {client: n for client, n in sorted(counts.items()) if n}


def run_secure_round(grid: Grid, messages: list[Message], arrays: ArrayRecord, cfg: RunConfig,
                     server_round: int) -> SecureRound:
    """Run SecAgg+ over the clients ``messages`` address; return the average and the replies."""
    shares, threshold = cfg.secagg_parameters(len(messages))
    workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                                  max_weight=cfg.secagg_max_weight, timeout=cfg.round_timeout)
    fit_config = dict(messages[0].content[wire.CONFIG]) if messages else {}
    fit_config[ARRAY_NAMES] = list(arrays.keys())
    sample = _GivenSample([m.metadata.dst_node_id for m in messages], fit_config)
    state = RecordDict({
        MAIN_PARAMS_RECORD: arrays,
        MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
    })
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=sample)
    recorder = _RecordingGrid(grid)
    workflow(recorder, context)
    aggregate = None
    if sample.aggregate is not None:
        legacy = compat.parameters_to_arrayrecord(sample.aggregate, keep_input=True)
        # Dequantisation yields float64; the model keeps its own dtypes.
        aggregate = ArrayRecord({name: Array(legacy[key].numpy().astype(arrays[name].numpy().dtype))
                                 for name, key in zip(arrays.keys(), legacy.keys(), strict=True)})
    replies = [m for m in recorder.replies if not m.has_error() and wire.PRIVACY in m.content.config_records]
    outcome = SecureRound(aggregate, replies)
    if outcome.clipped:
        log.warning("round %d: SecAgg+ quantisation clipped values beyond +-%g after scaling by weight / "
                    "--secagg-max-weight (client: count): %s; the aggregate is wrong there. A larger "
                    "--secagg-max-weight scales them down, at some cost in precision", server_round,
                    workflow.clipping_range, outcome.clipped)
    return outcome


class _RecordingGrid:
    """The grid, remembering every reply, so the loop can read each client's privacy record."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies: list[Message] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


@dataclass
class _Node:
    """The one attribute of a ClientProxy that SecAgg+ uses."""

    node_id: int


class _GivenSample(LegacyStrategy):
    """A legacy strategy that hands SecAgg+ the nodes our loop sampled and keeps the unmasked aggregate.

    Sampling and the strategy's own aggregation (FedAvg, FedProx, FedAdam) stay in the round loop, so
    secure aggregation changes nothing else about a run.
    """

    def __init__(self, node_ids: list[int], fit_config: dict[str, Any]) -> None:
        self.node_ids = node_ids
        self.fit_config = fit_config
        self.aggregate: Parameters | None = None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001 - Flower's signature
        return [(_Node(nid), FitIns(parameters, dict(self.fit_config))) for nid in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001
        # SecAgg+ puts the same unmasked weighted average into every result.
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def initialize_parameters(self, client_manager):  # noqa: ANN001
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001
        return None
