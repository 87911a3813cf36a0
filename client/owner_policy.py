"""The data owner's privacy policy, enforced on the owner's machine whatever the server asks.

Local DP protects an owner's records *from the server*, so no privacy-relevant value is taken from
the server's message on faith. The split:

* **Taken from the policy** (the server's values are ignored): whether DP may be off, delta, the
  accountant that decides, Poisson or fixed-partition batch sampling, CSPRNG noise (secure mode
  can only be switched on by the server, never off), the budget.
* **Chosen by the server, checked here**: the noise multiplier (at least the owner's minimum).
* **Chosen by the server, safe by construction**: learning rate, momentum, local epochs, batch
  size, clipping norm, model family and sizes, strategy, augmentation views (count, shift, flip),
  and the model's weights. DP-SGD's guarantee does not depend on the optimiser, the architecture or
  the weights (every trainable parameter's gradient is clipped per sample and noised; the update is
  post-processing of those noisy gradients; a record's views are clipped as one record). Clipping
  holds for any weights because no per-sample norm can read below the truth through rounding
  (client/ghost_norm.py: weights a server chose to make a record's gradient cancel in float32
  lifted it to 2307 C before), and the epochs and batch size
  only change how many steps run at which sample rate: the budget check computes the epsilon of
  exactly those steps *before* training, and the ledger is charged with what really ran *before*
  the update leaves.

A round the policy does not allow is declined with a reason the server's report shows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from fedpriv.common.config import DECISION_ACCOUNTANTS, RunConfig
from fedpriv.common.errors import PrivacyPolicyError

Mechanism = tuple[float, float, int]  # common.accounting's (noise, rate, steps); imported lazily: it loads Opacus

# Defaults of `fedpriv client`. Budget 10: the upper end of what "How to DP-fy ML" (Ponomareva et al.,
# JAIR 2023) calls a reasonable guarantee for ML models (epsilon <= 10; <= 1 strong). Minimum noise
# 0.5: below it one DP-SGD step at a usual sample rate already costs epsilon in the tens, and Opacus'
# accountants lose precision; the budget stays the binding check.
DEFAULT_BUDGET = 10.0
DEFAULT_MIN_NOISE = 0.5
DEFAULT_DELTA = 1e-5

NODE_CONFIG_KEYS = {  # Flower node-config keys: set by `fedpriv client` on its own SuperNode
    "require_dp": "policy-require-dp",
    "delta": "policy-delta",
    "accountant": "policy-accountant",
    "poisson_sampling": "policy-poisson-sampling",
    "min_noise_multiplier": "policy-min-noise-multiplier",
    "budget_epsilon": "policy-budget-epsilon",
    "secure_mode": "policy-secure-mode",
}


@dataclass(frozen=True)
class OwnerPolicy:
    """What one data owner allows. ``budget_epsilon=math.inf`` means no budget."""

    require_dp: bool = True
    delta: float = DEFAULT_DELTA
    accountant: str = "rdp"
    poisson_sampling: bool = True
    min_noise_multiplier: float = DEFAULT_MIN_NOISE
    budget_epsilon: float = DEFAULT_BUDGET
    secure_mode: bool = False

    def validate(self) -> "OwnerPolicy":
        """One-line errors for a policy that cannot be enforced; returns self."""
        if self.accountant not in DECISION_ACCOUNTANTS:
            raise PrivacyPolicyError(f"--accountant '{self.accountant}' cannot decide an owner's budget; choose "
                                 f"{' or '.join(DECISION_ACCOUNTANTS)} (gdp is an approximation, not an upper bound)")
        if not 0.0 < self.delta < 1.0:
            raise PrivacyPolicyError(f"--delta must be in (0, 1) (got {self.delta}); a usual choice is 1e-5")
        if not (self.min_noise_multiplier >= 0 and math.isfinite(self.min_noise_multiplier)):
            raise PrivacyPolicyError(f"--min-noise-multiplier must be >= 0 (got {self.min_noise_multiplier})")
        if not self.budget_epsilon > 0:  # NaN fails too
            raise PrivacyPolicyError(f"--budget-epsilon must be > 0, or 'inf' for no budget (got {self.budget_epsilon})")
        return self

    # ------------------------------------------------------------- transport
    def to_node_config(self) -> dict[str, Any]:
        """Flower node-config items (TOML values) for the owner's own SuperNode."""
        values = asdict(self)
        values["budget_epsilon"] = -1.0 if math.isinf(self.budget_epsilon) else float(self.budget_epsilon)
        return {NODE_CONFIG_KEYS[k]: v for k, v in values.items()}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "OwnerPolicy":
        """The policy a SuperNode was started with; the defaults for any key it lacks.

        A SuperNode started without ``fedpriv client`` (a bare ``flower-supernode``, or Flower's own
        simulation runtime under ``flwr run``) gets the default policy, never one from the server.
        """
        values: dict[str, Any] = {}
        for name, key in NODE_CONFIG_KEYS.items():
            if key in node_config:
                values[name] = node_config[key]
        if "budget_epsilon" in values and float(values["budget_epsilon"]) < 0:
            values["budget_epsilon"] = math.inf
        return cls(**_typed(values)).validate()

    @classmethod
    def of_simulation(cls, cfg: RunConfig) -> "OwnerPolicy":
        """The policy of ``fedpriv simulate``'s clients: the user owns every simulated data set.

        Their settings are the simulation's own flags, chosen on this machine. A gdp run still decides
        budgets with RDP (gdp is shown in the report, never decides); --budget-epsilon 0 means none.
        """
        return cls(require_dp=cfg.dp, delta=cfg.delta,
                   accountant=cfg.accountant if cfg.accountant in DECISION_ACCOUNTANTS else "rdp",
                   poisson_sampling=cfg.poisson_sampling,
                   min_noise_multiplier=cfg.noise_multiplier if cfg.dp else 0.0,
                   budget_epsilon=cfg.budget_epsilon if cfg.budget_epsilon > 0 else math.inf,
                   secure_mode=cfg.secure_mode).validate()

    # ------------------------------------------------------------- enforcement
    def resolve(self, asked: RunConfig) -> RunConfig:
        """The training config this owner actually runs: the server's, with the policy's values in force."""
        return replace(asked, dp=asked.dp or self.require_dp, delta=self.delta, accountant=self.accountant,
                       poisson_sampling=self.poisson_sampling, secure_mode=asked.secure_mode or self.secure_mode)

    def refusal(self, asked: RunConfig, num_records: int) -> str | None:
        """Why this owner declines a round the server asked for, or ``None`` if the policy allows it.

        The budget is checked separately (:meth:`over_budget`), against the ledger.
        """
        if not asked.dp and self.require_dp:
            return "server asked for dp=false; this owner requires DP"
        if asked.dp and asked.noise_multiplier < self.min_noise_multiplier:
            return (f"server asked for noise multiplier {asked.noise_multiplier:g}; this owner requires at least "
                    f"{self.min_noise_multiplier:g}")
        if self.delta >= 1.0 / max(num_records, 1):
            return (f"this owner's delta {self.delta:g} is not below 1/n for its {num_records} records; such a delta "
                    "allows leaking a whole record")
        return None

    def planned(self, run: RunConfig, num_records: int) -> Mechanism:
        """The history entry the round would add, from the config this owner actually runs."""
        from fedpriv.common.accounting import round_mechanism

        return round_mechanism(run.noise_multiplier, num_records, run.batch_size, run.local_epochs,
                               self.poisson_sampling)

    def over_budget(self, epsilon_after: float) -> bool:
        return epsilon_after > self.budget_epsilon

    def describe(self) -> str:
        budget = "no budget" if math.isinf(self.budget_epsilon) else f"budget epsilon {self.budget_epsilon:g}"
        return (f"{'DP required' if self.require_dp else 'DP optional'}, {budget}, delta {self.delta:g}, "
                f"{self.accountant}, {'Poisson' if self.poisson_sampling else 'fixed-partition'} sampling, "
                f"noise multiplier >= {self.min_noise_multiplier:g}" + (", CSPRNG noise" if self.secure_mode else ""))


def _typed(values: dict[str, Any]) -> dict[str, Any]:
    """Node-config values (TOML or strings) coerced to the policy's field types, one-line errors."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        try:
            if name in ("require_dp", "poisson_sampling", "secure_mode"):
                if isinstance(value, str):
                    if value.lower() not in ("true", "false"):
                        raise ValueError(value)
                    value = value.lower() == "true"
                out[name] = bool(value)
            elif name == "accountant":
                out[name] = str(value)
            else:
                out[name] = float(value)
        except (TypeError, ValueError):
            raise PrivacyPolicyError(f"node config {NODE_CONFIG_KEYS[name]}={value!r} is not valid") from None
    return out
