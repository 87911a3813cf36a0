"""Membership-inference statistics: AUC, TPR at low FPR, and the epsilon lower bound they imply.

Pure numpy/scipy on scores, no models (the run-folder side is ``simulations/audit.py``).
Convention: a higher score means "more likely a member"; a loss attack uses ``score = -loss``.

Why an epsilon *lower* bound: an (epsilon, delta)-DP training run forces every membership test
to satisfy ``TPR <= e^eps * FPR + delta`` and ``1 - FPR <= e^eps * (1 - TPR) + delta``. A test
whose (conservatively bounded) TPR and FPR break these for some eps proves the real epsilon
is at least that eps. Choosing the best threshold and then measuring it on the same records
would overstate the bound, so the threshold is chosen on one half and measured on the other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import betaincinv
from scipy.stats import rankdata

CONFIDENCE = 0.95  # of each one-sided Clopper-Pearson bound (TPR from below, FPR from above)
LOW_FPRS = (0.01, 0.001)


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(a random member outscores a random non-member), ties counting 1/2 (Mann-Whitney U)."""
    m, n = len(member_scores), len(nonmember_scores)
    ranks = rankdata(np.concatenate([member_scores, nonmember_scores]))  # average ranks for ties
    u = ranks[:m].sum() - m * (m + 1) / 2
    return float(u / (m * n))


def roc_counts(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score t, descending: ``(t, #members >= t, #non-members >= t)``."""
    thresholds = np.unique(np.concatenate([member_scores, nonmember_scores]))[::-1]
    tp = len(member_scores) - np.searchsorted(np.sort(member_scores), thresholds, side="left")
    fp = len(nonmember_scores) - np.searchsorted(np.sort(nonmember_scores), thresholds, side="left")
    return thresholds, tp, fp


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float | None:
    """Best TPR among thresholds whose empirical FPR is <= ``fpr``.

    None when there are fewer than ``1/fpr`` non-members: then the only admissible threshold lets
    no non-member through, and the number says nothing about that FPR.
    """
    n = len(nonmember_scores)
    if n < math.ceil(1.0 / fpr - 1e-9):
        return None
    _, tp, fp = roc_counts(member_scores, nonmember_scores)
    allowed = fp <= math.floor(fpr * n + 1e-9)
    return float(tp[allowed].max() / len(member_scores)) if allowed.any() else 0.0


def clopper_pearson_lower(k, n, confidence: float = CONFIDENCE) -> np.ndarray:
    """One-sided exact lower confidence bound on a binomial proportion from ``k`` of ``n``."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    bound = betaincinv(np.maximum(k, 1), n - k + 1, 1 - confidence)
    return np.where(k <= 0, 0.0, bound)


def clopper_pearson_upper(k, n, confidence: float = CONFIDENCE) -> np.ndarray:
    """One-sided exact upper confidence bound on a binomial proportion from ``k`` of ``n``."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    bound = betaincinv(k + 1, np.maximum(n - k, 1), confidence)
    return np.where(k >= n, 1.0, bound)


def epsilon_lower_bound(tp, m, fp, n, delta: float, confidence: float = CONFIDENCE) -> np.ndarray:
    """``max(log((TPR-delta)/FPR), log((1-FPR-delta)/(1-TPR)), 0)`` with TPR bounded from below
    and FPR from above (Clopper-Pearson), from ``tp`` of ``m`` members and ``fp`` of ``n`` non-members."""
    return implied_epsilon(clopper_pearson_lower(tp, m, confidence), clopper_pearson_upper(fp, n, confidence), delta)


def implied_epsilon(tpr, fpr, delta: float) -> np.ndarray:
    """The largest eps that a test with these rates breaks: ``max(log((TPR-delta)/FPR),
    log((1-FPR-delta)/(1-TPR)), 0)``. Given the true rates, the test's own epsilon; given
    conservative bounds on them, a lower bound (:func:`epsilon_lower_bound`)."""
    tpr, fpr = np.asarray(tpr, dtype=float), np.asarray(fpr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) - log(0) is NaN: that side shows nothing
        direct = np.log(np.maximum(tpr - delta, 0.0)) - np.log(fpr)
        complement = np.log(np.maximum(1.0 - fpr - delta, 0.0)) - np.log(1.0 - tpr)
    return np.fmax(np.fmax(direct, complement), 0.0)


def split_halves(num_members: int, num_nonmembers: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks choosing, within each group, a random half for threshold selection."""
    def half(count: int) -> np.ndarray:
        mask = np.zeros(count, dtype=bool)
        mask[rng.permutation(count)[: count // 2]] = True
        return mask

    return half(num_members), half(num_nonmembers)


@dataclass(frozen=True)
class ThresholdTest:
    """One threshold ("member if score >= threshold") measured on one set of records."""

    threshold: float
    members: int
    nonmembers: int
    true_positives: int
    false_positives: int
    tpr: float
    fpr: float
    tpr_lower: float
    fpr_upper: float
    epsilon_lower_bound: float


def measure(member_scores: np.ndarray, nonmember_scores: np.ndarray, threshold: float, delta: float) -> ThresholdTest:
    """TPR, FPR, their confidence bounds and the epsilon bound of one fixed threshold."""
    m, n = len(member_scores), len(nonmember_scores)
    tp, fp = int((member_scores >= threshold).sum()), int((nonmember_scores >= threshold).sum())
    return ThresholdTest(
        threshold=float(threshold), members=m, nonmembers=n, true_positives=tp, false_positives=fp,
        tpr=tp / m, fpr=fp / n, tpr_lower=float(clopper_pearson_lower(tp, m)),
        fpr_upper=float(clopper_pearson_upper(fp, n)),
        epsilon_lower_bound=float(epsilon_lower_bound(tp, m, fp, n, delta)),
    )


def best_threshold(member_scores: np.ndarray, nonmember_scores: np.ndarray, delta: float) -> float:
    """The threshold with the largest epsilon bound on these records (ties: largest TPR - FPR).

    Returned halfway to the next lower score, which gives the same counts here but does not sit
    on one record's score, so it carries over to new records better.
    """
    thresholds, tp, fp = roc_counts(member_scores, nonmember_scores)
    m, n = len(member_scores), len(nonmember_scores)
    eps = epsilon_lower_bound(tp, m, fp, n, delta)
    best = int(np.lexsort((tp / m - fp / n, eps))[-1])  # last key is primary
    if best + 1 < len(thresholds) and np.isfinite(thresholds[best + 1]):
        return float((thresholds[best] + thresholds[best + 1]) / 2)
    return float(thresholds[best])


def epsilon_ceiling(members: int, nonmembers: int, delta: float) -> float:
    """The largest bound these set sizes can show at all: a perfect attack (TPR 1, FPR 0)."""
    return float(epsilon_lower_bound(members, members, 0, nonmembers, delta))


@dataclass(frozen=True)
class AttackResult:
    """One attack's numbers: descriptive ones on every record, the epsilon bound held out."""

    name: str
    score: str  # what is thresholded: "member if <score> >= threshold"
    auc: float
    tpr_at_fpr: dict[str, float | None]  # keys "0.01", "0.001"; None = too few non-members
    selection: ThresholdTest   # the chosen threshold on the half that chose it (optimistic)
    evaluation: ThresholdTest  # the same threshold on the other half: the reported bound

    def to_dict(self) -> dict:
        return asdict(self)


def run_attack(name: str, score: str, member_scores: np.ndarray, nonmember_scores: np.ndarray,
               member_select: np.ndarray, nonmember_select: np.ndarray, delta: float) -> AttackResult:
    """AUC and TPR at low FPR on all records; threshold chosen on the selection half, bound on the rest."""
    ms, ns = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    threshold = best_threshold(ms[member_select], ns[nonmember_select], delta)
    return AttackResult(
        name=name,
        score=score,
        auc=auc(ms, ns),
        tpr_at_fpr={f"{f:g}": tpr_at_fpr(ms, ns, f) for f in LOW_FPRS},
        selection=measure(ms[member_select], ns[nonmember_select], threshold, delta),
        evaluation=measure(ms[~member_select], ns[~nonmember_select], threshold, delta),
    )


def class_calibrated_scores(losses: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``-(loss - median) / MAD`` within each class, over all candidate records together.

    Some classes are harder than others for members and non-members alike; measuring a loss
    against its class's typical loss removes that spread. The statistics use no membership
    labels, so the scores stay a fair attack.
    """
    scores = np.empty(len(losses), dtype=float)
    for cls in np.unique(labels):
        sel = labels == cls
        med = np.median(losses[sel])
        mad = np.median(np.abs(losses[sel] - med))
        scores[sel] = -(losses[sel] - med) / (mad if mad > 0 else 1.0)
    return scores
