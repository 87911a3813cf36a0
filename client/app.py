"""The Flower ClientApp: budget check, DP-SGD round, cumulative accounting, persistent ledger.

The server sends the run's training config with the global weights; everything that belongs
to one data owner (partition or data file, state folder, budget) comes from the node config.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy_mods import privacy_mods
from common import records
from common.config import RunConfig

if TYPE_CHECKING:
    from client.local_data import LocalData

# PyTorch, Opacus and SciPy are imported inside train(), not here: Flower's Deployment Runtime starts
# a fresh ClientApp process for every message, and three of SecAgg+'s four messages per round never
# reach train() (2.6 s to load this module instead of 13 s or more on 2 cores).
log = logging.getLogger("fedpriv.client")
app = ClientApp(mods=[privacy_mods])  # SecAgg+ and central-DP clipping, when a round asks


def ledger_path(state_dir: Path, data: LocalData) -> Path:
    """A data owner's ledger is keyed by its data's fingerprint, so it follows the data across runs."""
    return state_dir / "ledgers" / f"{data.fingerprint}.json"


def _state_dir(cfg: RunConfig, context: Context, data: LocalData) -> Path:
    if "state-dir" in context.node_config:
        return Path(str(context.node_config["state-dir"])).expanduser()
    return Path(cfg.run_dir) / "clients" / data.client_id


def _budget(cfg: RunConfig, context: Context) -> float:
    """The data owner's own budget wins over the run's; 0 means none."""
    own = float(context.node_config.get("budget-epsilon", 0.0) or 0.0)
    return own if own > 0 else cfg.budget_epsilon


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: refuse if over budget, else train with DP-SGD and persist the ledger first."""
    import torch

    from client.dp_training import planned_mechanism, train_round
    from client.local_data import local_data
    from common.models import model_from_config
    from common.privacy import LedgerEntry, PrivacyLedger

    cfg = RunConfig.from_mapping(dict(msg.content[records.CONFIG]), ignore_unknown=True)
    server_round = int(msg.content[records.CONFIG].get("server-round", 0))
    run_id = str(msg.content[records.CONFIG].get("run-uid", msg.metadata.run_id))
    if "partition-id" in context.node_config:  # simulated clients share the machine's cores
        torch.set_num_threads(max(1, int(cfg.client_cpus)))
    data = local_data(cfg, dict(context.node_config))
    path = ledger_path(_state_dir(cfg, context, data), data)
    ledger = PrivacyLedger.load_or_create(path, data.client_id, cfg.accountant, cfg.delta)

    privacy = ConfigRecord({"client-id": data.client_id, "accountant": cfg.accountant, "fingerprint": data.fingerprint})
    budget = _budget(cfg, context)
    if cfg.dp and budget > 0:
        planned = ledger.epsilon_if(*planned_mechanism(len(data.x), cfg))
        if planned > budget:
            reason = f"round {server_round} would raise epsilon to {planned:.3f} > budget {budget:.3f}"
            log.warning("%s declines to train: %s", data.client_id, reason)
            privacy["decline-reason"] = reason
            metrics = MetricRecord({records.NUM_EXAMPLES: 0, records.DECLINED: 1, "epsilon": ledger.epsilon()})
            return Message(RecordDict({records.METRICS: metrics, records.PRIVACY: privacy}), reply_to=msg)

    model = model_from_config(cfg, data.input_shape, data.num_classes)
    model.load_state_dict(msg.content[records.ARRAYS].to_torch_state_dict())
    # Sampling and noise must be unpredictable to the server: seed from the OS' CSPRNG, never from the config.
    result = train_round(model, data.x, data.y, cfg, ledger.history(), seed=secrets.randbits(63))

    if cfg.dp:
        ledger.entries.append(LedgerEntry(run_id, server_round, result.noise_multiplier, result.sample_rate,
                                          result.steps, result.epsilon))
        ledger.save(path)  # persisted before the update leaves this machine
    privacy.update({  # the whole ledger, so the server's report can account for every round ever trained
        "ledger-run": [e.run_id for e in ledger.entries], "ledger-round": [e.round for e in ledger.entries],
        "ledger-noise": [e.noise_multiplier for e in ledger.entries],
        "ledger-rate": [e.sample_rate for e in ledger.entries], "ledger-steps": [e.steps for e in ledger.entries],
    } if ledger.entries else {})
    metrics = MetricRecord({
        records.NUM_EXAMPLES: result.num_examples,
        records.UNIT_WEIGHT: 1,
        records.DECLINED: 0,
        "train-loss": result.train_loss,
        "epsilon": result.epsilon,
        "steps": result.steps,
        "sample-rate": result.sample_rate,
        "noise-multiplier": result.noise_multiplier,
    })
    content = RecordDict({records.ARRAYS: ArrayRecord(result.state_dict), records.METRICS: metrics,
                          records.PRIVACY: privacy})
    return Message(content, reply_to=msg)
