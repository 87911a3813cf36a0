"""``fedpriv audit``: a membership-inference attack on a finished run's final global model.

Members are the records of the clients whose updates entered the global model (their
partitions of the run's training split); non-members are the server's held-out test records,
which no client ever trained on. Both sets are rebuilt from ``config.json`` exactly as the
run built them (seeded split and partitioning). The statistics live in ``common/audit.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpriv.common import audit as stats
from fedpriv.common.atomic_io import write_json
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import Dataset, dataset_options, load_dataset
from fedpriv.common.errors import UserInputError
from fedpriv.common.models import check_fit, model_from_config
from fedpriv.common.partitioning import partition
from fedpriv.common.accounting import data_fingerprint
from fedpriv.server.checkpoint import FINAL_MODEL
from fedpriv.server.report import RunReport
from fedpriv.server.run_dir import load_run_config

AUDIT_FILE = "audit.json"
MIN_RECORDS = 20  # per side; fewer cannot say anything
LOSS_CAP = 1e30  # stands in for a NaN or infinite loss, finite so that class statistics stay finite
CAVEAT = ("This is a sanity check with a weak black-box attack on one training run: it can only show "
          "a lower bound on epsilon, never that the model is private. The bound treats each record as "
          "an independent trial (the usual one-run heuristic).")


@dataclass(frozen=True)
class AuditInputs:
    """What the audit needs from a run folder, checked for consistency."""

    cfg: RunConfig
    report: RunReport
    data: Dataset
    model: nn.Module
    member_index: np.ndarray  # indices into data.x_train of records that trained the global model
    trained_clients: list[str]


def load_run(run_dir: Path) -> AuditInputs:
    """Read config, report and final model of ``run_dir``; rebuild the data and the member set."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    report = RunReport.load(run_dir)
    _check_report_matches(cfg, report, run_dir)
    model_path = run_dir / FINAL_MODEL
    if not model_path.is_file():
        raise UserInputError(f"{run_dir} holds no {FINAL_MODEL}; the run has not finished, and the audit needs its final model")
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples,
                        **dataset_options(cfg))
    check_fit(cfg.model, data.input_shape, data.labelled, cfg.dataset, cfg.augment_views, cfg.cnn_arch)
    model = model_from_config(cfg, data.input_shape, data.num_classes)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # torch raises many types for damaged or mismatched files
        raise UserInputError(f"{model_path} does not fit the {cfg.model} model of config.json on {cfg.dataset} "
                             f"({exc.__class__.__name__}); was the config edited after the run?") from None
    trained = sorted({c for r in report.rounds for c in r.get("trained", [])})
    if not trained:
        raise UserInputError(f"{run_dir}: no client update ever entered the global model; there are no members to test")
    parts = partition(data.y_train, len(data.x_train), cfg.num_clients, cfg.partitioning, seed=cfg.seed,
                      alpha=cfg.dirichlet_alpha, classes_per_client=cfg.classes_per_client)
    members = []
    for cid in trained:
        idx = parts[_partition_id(cid, cfg.num_clients)]
        _check_ledger_matches(run_dir, cid, data.x_train[idx], None if data.y_train is None else data.y_train[idx])
        members.append(idx)
    return AuditInputs(cfg, report, data, model, np.sort(np.concatenate(members)), trained)


def _check_ledger_matches(run_dir: Path, client_id: str, x: np.ndarray, y: np.ndarray | None) -> None:
    """A DP client's ledger records its data's fingerprint with every release: a rebuilt partition must match.

    Catches a dataset file changed after the run, which would silently audit the wrong records.
    """
    from fedpriv.client.ledger import LEDGER_FILE, load_ledger

    state_dir = run_dir / "clients" / client_id
    if not (state_dir / LEDGER_FILE).is_file():
        return
    names = {r.fingerprint for r in load_ledger(state_dir).releases}
    if names and data_fingerprint(np.ascontiguousarray(x), None if y is None else np.ascontiguousarray(y)) not in names:
        raise UserInputError(f"{run_dir}: the data rebuilt from config.json for {client_id} is not the data its privacy "
                             "ledger was kept for; was the dataset file changed after the run?")


def _check_report_matches(cfg: RunConfig, report: RunReport, run_dir: Path) -> None:
    summary = {"model": cfg.model, "dataset": cfg.dataset, "clients": cfg.num_clients, "rounds": cfg.num_rounds}
    for key, value in summary.items():
        if key in report.run and report.run[key] != value:
            raise UserInputError(f"{run_dir}: config.json says {key}={value!r} but report.json says "
                                 f"{report.run[key]!r}; the folder mixes two runs")
    if report.dp != cfg.dp or (cfg.dp and not math.isclose(report.delta, cfg.delta)):
        raise UserInputError(f"{run_dir}: config.json and report.json disagree on DP (dp, delta); the folder mixes two runs")
    if len(report.rounds) < cfg.num_rounds:
        raise UserInputError(f"{run_dir}: report.json has {len(report.rounds)} of {cfg.num_rounds} rounds; "
                             "audit a finished run")


def _partition_id(client_id: str, num_clients: int) -> int:
    match = re.fullmatch(r"client-(\d+)", client_id)
    if not match or int(match.group(1)) >= num_clients:
        raise UserInputError(f"client '{client_id}' trained on its own data, not on a partition of the run's dataset; "
                             "the audit needs a simulated run (fedpriv simulate) to know the members")
    return int(match.group(1))


@torch.no_grad()
def per_record_loss(model: nn.Module, model_name: str, x: np.ndarray, y: np.ndarray | None,
                    batch_size: int = 512) -> np.ndarray:
    """Each record's training loss: cross-entropy, or the autoencoder's mean squared reconstruction error."""
    model.eval()
    losses = []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))
        out = model(xb).double()  # float32 rounds a well-fit record's loss to 0: ties would hide the signal
        if model_name == "autoencoder":
            losses.append(nn.functional.mse_loss(out, xb.double(), reduction="none").flatten(1).mean(dim=1))
        else:
            yb = torch.from_numpy(np.ascontiguousarray(y[start:start + batch_size]))
            losses.append(nn.functional.cross_entropy(out, yb, reduction="none"))
    return torch.cat(losses).numpy()


def audit_run(run_dir: Path, seed: int = 0) -> dict:
    """Attack the final model of ``run_dir``, write ``audit.json`` and return its content."""
    run_dir = Path(run_dir)
    inputs = load_run(run_dir)
    cfg, data = inputs.cfg, inputs.data
    rng = np.random.default_rng(seed)
    size = min(len(inputs.member_index), len(data.x_test))
    if size < MIN_RECORDS:
        raise UserInputError(f"{run_dir}: only {size} records on the smaller side (members or test records); "
                             f"the audit needs at least {MIN_RECORDS}")
    member_idx = np.sort(rng.choice(inputs.member_index, size, replace=False))
    test_idx = np.sort(rng.choice(len(data.x_test), size, replace=False))
    x_m, x_n = data.x_train[member_idx], data.x_test[test_idx]
    y_m = None if data.y_train is None else data.y_train[member_idx]
    y_n = None if data.y_test is None else data.y_test[test_idx]
    # A diverged model can output NaN or inf: such a record counts as the worst fit of all.
    loss_m = np.nan_to_num(per_record_loss(inputs.model, cfg.model, x_m, y_m), nan=LOSS_CAP, posinf=LOSS_CAP)
    loss_n = np.nan_to_num(per_record_loss(inputs.model, cfg.model, x_n, y_n), nan=LOSS_CAP, posinf=LOSS_CAP)
    select_m, select_n = stats.split_halves(size, size, rng)
    # Control: the same attack on the run's untrained initial model sees no training at all, so
    # its AUC is ~0.5 unless members and non-members differ in distribution (then no bound is fair).
    initial = model_from_config(cfg, data.input_shape, data.num_classes, seed=cfg.seed)
    control_auc = stats.auc(-per_record_loss(initial, cfg.model, x_m, y_m), -per_record_loss(initial, cfg.model, x_n, y_n))

    delta = inputs.report.delta
    loss_name = "reconstruction MSE" if cfg.model == "autoencoder" else "cross-entropy"
    attacks = [stats.run_attack("loss threshold", f"-({loss_name})", -loss_m, -loss_n, select_m, select_n, delta)]
    if y_m is not None:
        calibrated = stats.class_calibrated_scores(np.concatenate([loss_m, loss_n]), np.concatenate([y_m, y_n]))
        attacks.append(stats.run_attack("class-calibrated", "-(loss - class median) / class MAD",
                                        calibrated[:size], calibrated[size:], select_m, select_n, delta))
    # The headline attack is picked on the selection half too, so the reported bound stays held out.
    headline = max(attacks, key=lambda a: (a.selection.epsilon_lower_bound, -attacks.index(a)))
    held_out = len(select_m) - int(select_m.sum()), len(select_n) - int(select_n.sum())
    theory, source = theoretical_epsilon(inputs.report)
    result = {
        "run_dir": str(run_dir.resolve()),
        "model": cfg.model, "dataset": cfg.dataset, "dp": cfg.dp, "seed": seed,
        "theoretical": {"epsilon": theory, "delta": delta, "source": source},
        "records": {"members_available": int(len(inputs.member_index)), "nonmembers_available": int(len(data.x_test)),
                    "members": size, "nonmembers": size, "selection_half": [int(select_m.sum()), int(select_n.sum())],
                    "evaluation_half": list(held_out), "trained_clients": inputs.trained_clients},
        "mean_loss": {"members": float(loss_m.mean()), "nonmembers": float(loss_n.mean())},
        "attacks": [a.to_dict() for a in attacks],
        "control": {"auc_initial_model": control_auc,
                    "meaning": "the loss attack against the run's untrained initial model; ~0.5 when members "
                               "and non-members come from the same distribution"},
        "empirical_epsilon": {"lower_bound": headline.evaluation.epsilon_lower_bound, "attack": headline.name,
                              "ceiling": stats.epsilon_ceiling(*held_out, delta),
                              "confidence_each_bound": stats.CONFIDENCE, "confidence": round(2 * stats.CONFIDENCE - 1, 6),
                              "threshold_selection": "chosen on a random half of the records, measured on the other half"},
        "caveat": CAVEAT,
    }
    result["meaning"] = meaning(result)
    write_json(run_dir / AUDIT_FILE, result)
    return result


def theoretical_epsilon(report: RunReport) -> tuple[float, str]:
    """The record-level epsilon the run promises for its final model, and where it comes from.

    Local DP-SGD gives the largest client epsilon (every record belongs to one client, and the
    global model is post-processing of the updates). User-level central DP covers any change to
    one client's data, so any one record too: the smaller of the two holds.
    """
    local = report.max_epsilon()
    user = report.user_epsilon()
    if user is not None and user < local:
        return float(user), "user-level central DP"
    return local, f"local DP-SGD, largest client epsilon ({report.accountant.upper()})" if report.dp else "no DP"


def meaning(result: dict) -> str:
    """The numbers in one plain sentence."""
    emp, theo = result["empirical_epsilon"], result["theoretical"]
    attack = next(a for a in result["attacks"] if a["name"] == emp["attack"])
    eps_lb, eps_th = emp["lower_bound"], float(theo["epsilon"])
    shown = (f"which implies the model's true epsilon is at least {eps_lb:.2f}" if eps_lb > 0
             else "which is too weak to show any epsilon above 0")
    head = (f"The {attack['name']} attack tells training records from unseen ones with AUC {attack['auc']:.3f} "
            f"(0.5 = guessing), {shown} ({emp['confidence']:.0%} confidence; this many records cannot show "
            f"more than {emp['ceiling']:.2f})")
    if math.isinf(eps_th):
        return head + "; the run has no DP, so there is no theoretical epsilon to compare with."
    if eps_lb > eps_th:
        return head + (f", MORE than the theoretical epsilon {eps_th:.2f}: the accounting or the DP training is "
                       "broken, or this is a rare statistical fluke; investigate.")
    return head + f", consistent with the theoretical epsilon {eps_th:.2f} at delta {theo['delta']:g}."


def audit_table(result: dict):
    """A rich table: one row per attack."""
    from rich.table import Table

    theo = result["theoretical"]
    eps_th = float(theo["epsilon"])
    table = Table(title=f"membership-inference audit: {result['model']} on {result['dataset']} — "
                        f"{'DP' if result['dp'] else 'no DP'}, theoretical ε "
                        f"{'∞' if math.isinf(eps_th) else f'{eps_th:.2f}'} at δ={theo['delta']:g}")
    for name in ("attack", "AUC", "TPR@FPR 1%", "TPR@FPR 0.1%", "held-out TPR/FPR", "ε ≥"):
        table.add_column(name, justify="left" if name == "attack" else "right")
    for a in result["attacks"]:
        ev = a["evaluation"]
        table.add_row(a["name"], f"{a['auc']:.3f}", *[_fmt_rate(a["tpr_at_fpr"][k]) for k in ("0.01", "0.001")],
                      f"{ev['tpr']:.3f} / {ev['fpr']:.3f}", f"{ev['epsilon_lower_bound']:.2f}")
    return table


def _fmt_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def notes(result: dict) -> list[str]:
    """Lines printed under the table."""
    rec = result["records"]
    lines = [f"records: {rec['members']} members (of {rec['members_available']}) and {rec['nonmembers']} held-out "
             f"non-members; threshold chosen on {rec['selection_half'][0]}+{rec['selection_half'][1]}, "
             f"bound measured on {rec['evaluation_half'][0]}+{rec['evaluation_half'][1]}"]
    for fpr, need in (("0.01", 100), ("0.001", 1000)):
        if any(a["tpr_at_fpr"][fpr] is None for a in result["attacks"]):
            lines.append(f"TPR at FPR {float(fpr):.1%}: n/a, {rec['nonmembers']} non-members are too few (needs >= {need})")
    lines.append(f"control: the loss attack against the untrained initial model has AUC "
                 f"{result['control']['auc_initial_model']:.3f} (about 0.5 = both sets alike before training)")
    if not any(a["name"] == "class-calibrated" for a in result["attacks"]):
        lines.append("no labels (autoencoder): only the reconstruction-loss attack runs")
    lines += [result["meaning"], result["caveat"]]
    return lines


# ------------------------------------------------- fedpriv audit --mechanism (client/mechanism_audit.py)
def mechanism_table(audits: list):  # list[client.mechanism_audit.MechanismAudit]
    """A rich table: one row per grad-sample mode audited, bound beside the theory."""
    from rich.table import Table

    first = audits[0]
    table = Table(title=f"DP-SGD mechanism audit: one step, Dirac canary, q={first.sample_rate:g}, "
                        f"C={first.max_grad_norm:g}, δ={first.delta:g}"
                        + (", secure noise" if first.secure_mode else ""))
    for name in ("mode", "σ", "steps", "held-out TPR / FPR", "ε ≥", "ε̂", "theory ε",
                 f"{first.accountant} ε", "σ measured", "result"):
        table.add_column(name, justify="left" if name in ("mode", "result") else "right")
    for a in audits:
        ev = a.attack.evaluation
        sigma = f"{a.noise_multiplier:g}" + ("" if a.noise_scale == 1 else f" ×{a.noise_scale:g}")
        table.add_row(a.mode, sigma, f"2×{a.trials}", f"{ev.tpr:.3f} / {ev.fpr:.4f}", f"{a.epsilon_lower_bound:.2f}",
                      "∞" if math.isinf(a.epsilon_estimate) else f"{a.epsilon_estimate:.2f}",
                      f"{a.theoretical_epsilon:.2f}", f"{a.accounted_epsilon:.2f}",
                      f"{a.noise_std:.3f} ± {a.noise_std_error:.3f}", "ok" if a.passed else "[bold red]FAIL[/]")
    return table


def mechanism_notes(audits: list) -> list[str]:
    """Lines printed under the mechanism table: what the columns mean, and each failure in words."""
    first = audits[0]
    ev = first.attack.evaluation
    lines = [f"each row: {first.trials} real private steps with the canary and {first.trials} without "
             "(make_private + train_step, weights reset each step); the threshold is chosen on half of each, "
             f"ε ≥ is measured on the other {ev.members}+{ev.nonmembers} (Clopper-Pearson 95 % on TPR and on FPR, "
             f"90 % together; these trials cannot show more than {first.ceiling:.2f}); ε̂ is the same test without "
             "confidence bounds",
             "theory ε: tight ε of one step at the claimed σ (dp_accounting PLD); "
             f"{first.accountant} ε: what the project's accountant books for it; σ measured: std of the released "
             "update without the canary, in units of C (should be the claimed σ)"]
    if any(a.noise_scale != 1 for a in audits):
        lines.append(f"--noise-scale {first.noise_scale:g}: the noise actually added was deliberately scaled "
                     "(a self-test: below 1 the audit should fail)")
    for a in audits:
        if a.violated:
            lines.append(f"{a.mode}: ε ≥ {a.epsilon_lower_bound:.2f} exceeds the theoretical {a.theoretical_epsilon:.2f}: "
                         f"this step leaks more than σ={a.noise_multiplier:g} allows; noise or clipping is broken")
        if a.noise_short:
            lines.append(f"{a.mode}: the measured noise std {a.noise_std:.3f} ± {a.noise_std_error:.3f} is below the "
                         f"claimed σ={a.noise_multiplier:g}")
    if all(a.passed for a in audits):
        lines.append("every mode is consistent with the claimed noise (a lower bound: this cannot prove privacy, "
                     "it catches a step that adds less noise or clips less than claimed)")
    return lines

