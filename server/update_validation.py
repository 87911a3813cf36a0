"""What the server accepts from one client's reply, and at what weight, from its own configuration.

Threat model: the server trusts no number a client reports where that number changes what the
aggregate reveals or how much one client can move it. So

* the bound on an update's norm is computed from the server's configuration (learning rate,
  momentum, local epochs, batch size, clipping, noise) and the records it expects a client to hold,
  never from the step count or size in the reply (``update_norm_bound``); ``--no-dp`` runs get one too;
* the weight FedAvg gives an update is the server's (``server_weight``): 1 each under central DP,
  whatever the reply says; otherwise the reported record count held to the range of records the
  server expects of one client, and a weight that is not a positive finite number drops the update;
* under client-side central clipping the update must be clipped as claimed, and whether it was
  clipped (adaptive clipping's norm bit) is read off the update, not off the reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord

from fedpriv.common.config import RunConfig
from fedpriv.common.errors import UserInputError
from fedpriv.server.strategy_factory import weight_key

if TYPE_CHECKING:
    from fedpriv.common.datasets import Dataset

# Without DP-SGD nothing clips gradients, so the bound assumes a mean batch gradient of at most this norm
# (times the slack: 10 in all, 2.3x the largest seen in honest rounds, see README "Privacy guarantees").
NO_DP_GRADIENT_NORM = 5.0
# The clipped gradients' part of the bound assumes all of them aligned and batches up to this many times
# their expected size; honest rounds come nowhere near (their gradients are not aligned).
GRADIENT_SLACK = 2.0
# The DP noise's norm exceeds its mean sqrt(d) by t with probability at most exp(-t^2/2): 1.5e-8 for t = 6.
NOISE_TAIL = 6.0
# Below this an update is zero for all purposes (float32 norms of it underflow): the client did not train,
# and Flower's clipping would divide by its norm.
MIN_UPDATE_NORM = 1e-10
# Client-side clipping happens in float32 on the client; the server allows this relative excess.
CLIPPED_TOLERANCE = 1e-3


def update_problem(update: ArrayRecord, reference: ArrayRecord, max_norm: float | None = None) -> str | None:
    """Why an update must be dropped (wrong keys, shapes, dtypes, non-finite values, no change at all,
    a change larger than ``max_norm``), or None."""
    if list(update.keys()) != list(reference.keys()):
        missing = set(reference.keys()) - set(update.keys())
        extra = set(update.keys()) - set(reference.keys())
        return f"parameter names differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    decoded: dict[str, np.ndarray] = {}  # each array decoded once: the server checks every reply of every round
    for name in reference.keys():
        ref, got = reference[name], update[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"parameter '{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"parameter '{name}' has dtype {got.dtype}, expected {ref.dtype}"
        try:
            values = decoded[name] = got.numpy()
        except (ValueError, TypeError) as exc:
            return f"parameter '{name}' cannot be decoded ({exc})"
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"parameter '{name}' contains NaN or infinite values"
    norm = _norm(decoded, reference)
    if norm < MIN_UPDATE_NORM:
        return f"update is zero (norm {norm:.3g}): the model came back unchanged"
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g} the server's config allows"
    return None


def update_norm(update: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of (update - reference) over all floating-point parameters."""
    return _norm({name: update[name].numpy() for name in reference.keys()}, reference)


def _norm(values: dict[str, np.ndarray], reference: ArrayRecord) -> float:
    total = 0.0
    for name in reference.keys():
        ref = reference[name].numpy()
        if np.issubdtype(ref.dtype, np.floating):
            total += float(np.sum((values[name].astype(np.float64) - ref) ** 2))
    return total ** 0.5


def momentum_sums(steps: np.ndarray, momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_t c_t, sqrt(sum_t c_t^2))`` over t = 1..T, with c_t = (1 - mu^(T-t+1)) / (1 - mu).

    PyTorch's SGD with momentum (v_t = mu v_(t-1) + g_t, p_t = p_(t-1) - lr v_t) has moved the weights
    after T steps by -lr * sum_t c_t g_t: step t's gradient counts c_t <= 1/(1-mu) times.
    """
    t = np.asarray(steps, dtype=np.float64)
    mu = float(momentum)
    powers = mu * (1.0 - mu**t) / (1.0 - mu)  # sum_(j=1..T) mu^j
    squares = mu**2 * (1.0 - mu ** (2 * t)) / (1.0 - mu**2)  # sum_(j=1..T) mu^(2j)
    return (t - powers) / (1.0 - mu), np.sqrt(t - 2.0 * powers + squares) / (1.0 - mu)


def local_training_bound(num_params: int, client_sizes: tuple[int, int], *, learning_rate: float, momentum: float,
                         local_epochs: int, batch_size: int, clip: float | None, noise_multiplier: float) -> float:
    """The most one honest round of local SGD can move the weights, for any client holding between
    ``client_sizes[0]`` and ``client_sizes[1]`` records (``clip=None``: without DP-SGD).

    A client of n records runs T = epochs * k steps, k = ceil(n/B) batches per epoch, and Opacus divides
    each step's clipped sum (norm <= C per record) and its N(0, sigma^2 C^2 I_d) noise by the expected
    batch b = int(n/k) (<= B; n itself below one batch). After T steps the clipped gradients have moved
    the weights by at most lr*C*sum c_t (``GRADIENT_SLACK`` more for Poisson batches above their
    expected size), and the noise, a Gaussian vector of std lr*sigma*C*sqrt(sum c_t^2)/b per coordinate
    (:func:`momentum_sums`), by at most that times sqrt(d) + ``NOISE_TAIL`` but with probability 1.5e-8.
    For each k the fewest records give the smallest b for the same T, so only those sizes are evaluated.
    Without DP nothing clips the gradients: ``NO_DP_GRADIENT_NORM`` stands in for C, and there is no noise.
    """
    smallest = max(1, int(client_sizes[0]))
    largest = max(smallest, int(client_sizes[1]))
    k = np.arange(-(-smallest // batch_size), -(-largest // batch_size) + 1, dtype=np.int64)
    n = np.maximum(smallest, (k - 1) * batch_size + 1)
    drift, spread = momentum_sums(local_epochs * k, momentum)
    gradient = GRADIENT_SLACK * (clip if clip is not None else NO_DP_GRADIENT_NORM) * drift
    noise = 0.0 if clip is None else noise_multiplier * clip * (math.sqrt(num_params) + NOISE_TAIL) * spread / (n // k)
    return float(learning_rate * np.max(gradient + noise))


def update_norm_bound(cfg: RunConfig, num_params: int, client_sizes: tuple[int, int]) -> float:
    """The largest update norm the server accepts: ``--max-update-norm``, or (0) derived from the
    server's own config by :func:`local_training_bound`, with DP-SGD's clip and noise when ``cfg.dp``."""
    if cfg.max_update_norm > 0:
        return float(cfg.max_update_norm)
    return local_training_bound(num_params, client_sizes, learning_rate=cfg.learning_rate, momentum=cfg.momentum,
                                local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                                clip=cfg.max_grad_norm if cfg.dp else None, noise_multiplier=cfg.noise_multiplier)


def client_records(cfg: RunConfig, data: Dataset) -> tuple[int, int]:
    """``(fewest, most)`` records the server expects one client to hold; never a client's own claim.

    ``--max-client-records`` set (deployments, where owners bring their own data): each owner is
    assumed to hold at least one batch and at most that many. Unset: the run's partitioning of the
    server's own training set (same function and seed as the clients'), i.e. exactly what simulated
    clients and ``fedpriv federation``'s partitions hold.
    """
    if cfg.max_client_records > 0:
        return min(cfg.batch_size, cfg.max_client_records), cfg.max_client_records
    from fedpriv.common.partitioning import partition

    try:
        parts = partition(data.y_train, len(data.x_train), cfg.num_clients, cfg.partitioning, seed=cfg.seed,
                          alpha=cfg.dirichlet_alpha, classes_per_client=cfg.classes_per_client)
    except UserInputError as exc:
        raise UserInputError(f"{exc} (the server splits its own training set to know how many records a client "
                             "holds; where owners bring their own data, set --max-client-records)") from None
    sizes = [len(p) for p in parts]
    return min(sizes), max(sizes)


@dataclass(frozen=True)
class UpdateLimits:
    """What one round accepts from a client, all from the server's own configuration."""

    max_norm: float  # L2 norm of (update - global model)
    weight_key: str  # the reply metric the strategy weighs updates by
    weights: tuple[float, float] | None  # (lowest, highest) weight; None: every update weighs 1 (central DP)
    clipped_to: float | None = None  # client-side central clipping: the norm clients must have clipped to


def update_limits(cfg: RunConfig, num_params: int, client_sizes: tuple[int, int],
                  clipping_norm: float | None = None) -> UpdateLimits:
    """This round's limits. ``clipping_norm`` is the central clipping norm sent to clients this round
    (client-side modes; adaptive clipping changes it every round): their updates must respect it."""
    max_norm = update_norm_bound(cfg, num_params, client_sizes)
    clipped_to = clipping_norm if cfg.central_dp.startswith("client") else None
    if clipped_to is not None:
        max_norm = min(max_norm, clipped_to * (1.0 + CLIPPED_TOLERANCE))
    weights = None if cfg.central_dp != "off" else (float(client_sizes[0]), float(client_sizes[1]))
    return UpdateLimits(max_norm, weight_key(cfg), weights, clipped_to)


def server_weight(metrics: Any, limits: UpdateLimits) -> tuple[float | None, str | None]:
    """``(weight, why)``: the weight the server gives an update, and why it is not the reported one.

    Under central DP every update weighs 1 (the noise is calibrated to an equal-weight mean), whatever
    the reply says. Otherwise the reported record count, held to ``limits.weights``; a count that is
    not a positive finite number gives ``(None, why)``: the update is dropped.
    """
    reported = metrics.get(limits.weight_key) if hasattr(metrics, "get") else None
    if limits.weights is None:
        why = f"reported {limits.weight_key} {reported!r} ignored: every update weighs 1"
        return 1.0, None if reported == 1 else why
    if isinstance(reported, bool) or not isinstance(reported, (int, float)) or not (0 < reported < math.inf):
        return None, f"weight {limits.weight_key}={reported!r} is not a positive number of records"
    low, high = limits.weights
    if reported > high:
        return high, f"weight {reported:g} capped to {high:g}, the most records the server expects of a client"
    if reported < low:
        return low, f"weight {reported:g} raised to {low:g}, the fewest records the server expects of a client"
    return float(reported), None


def norm_bit(update: ArrayRecord, reference: ArrayRecord, limits: UpdateLimits) -> int:
    """Adaptive client-side clipping's bit (was the update clipped?), read off the update itself: a clipped
    update has norm C. Flower would read the reply's own bit, which a client can forge or leave out."""
    assert limits.clipped_to is not None
    return int(update_norm(update, reference) >= limits.clipped_to * (1.0 - CLIPPED_TOLERANCE))

