"""The run's report: ``report.json`` for machines, ``report.md`` and PNG plots for people.

``report.json`` holds each client's full mechanism history, so anyone can recompute epsilon
with an accountant of their own choosing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.common.atomic_io import read_json, write_json, write_text
from fedpriv.common.errors import UserInputError

GUARANTEE = (
    "Each client's records are protected by sample-level ({eps}, {delta})-differential privacy "
    "against everyone who sees that client's model updates — the server and, through the global "
    "model, every other client: adding or removing any single record of a client changes the "
    "probability of anything they can observe by at most a factor e^epsilon, except with probability delta. "
    "Epsilon is composed over every local DP-SGD step of every round the client took part in "
    "({accountant} accountant); the number shown is the largest over all clients."
)
USER_LEVEL = (
    "Each client's data as a whole is protected by user-level ({eps}, {delta})-differential privacy ({mode} "
    "central DP with Flower's DP strategy): replacing everything one client holds changes the probability of "
    "any sequence of global models by at most a factor e^epsilon, except with probability delta. It covers "
    "{releases} noisy releases, each the average of the clipped updates of {sampled} of {population} clients "
    "(RDP accountant), {charged}"
)
# How the releases were charged; amplification by sampling holds only against whoever cannot know the cohort.
USER_LEVEL_CHARGED = {
    "everyone": "and every client was in every cohort, so there is no amplification by sampling.",
    "visible": ("each charged in full, as if the client had been in every cohort (without amplification by "
                "sampling): this report lists who trained in every round, so its readers know the cohorts."),
}
USER_LEVEL_AMPLIFIED = (
    " Against someone who sees only the global models (not this report's participation lists, not the server, "
    "no sampled client), the cohorts were secret, drawn with the operating system's CSPRNG: amplification by "
    "sampling without replacement gives user-level ({eps}, {delta})-DP against them."
)
USER_LEVEL_NOT_AMPLIFIED = (
    " Amplification is claimed against no one: the cohorts were not secret from the party the guarantee is "
    "against (drawn with a predictable generator, or picked by the server itself under secure aggregation)."
)
CENTRAL_NOISE = {
    True: " Central-DP noise came from the operating system's CSPRNG (--secure-mode).",
    False: (" Central-DP noise came from NumPy's default pseudo-random generator, not a CSPRNG: pass --secure-mode "
            "in production, where a predictable generator lets the noise be subtracted."),
}
SECURE_AGGREGATION = (
    "Secure aggregation (Flower's SecAgg+) was on: in every round the server learned only the weighted sum "
    "of the sampled clients' updates, never one client's update. This assumes an honest-but-curious server, "
    "one that runs the protocol as written and relays the clients' public keys unchanged, and that fewer than "
    "{threshold} of a client's {shares} SecAgg+ neighbours collude with it. Each client also refused to unmask "
    "whenever the server's dropout lists contradicted themselves or the earlier stages (a client both active "
    "and dropped, one outside its neighbours, lists that changed), so lying about dropouts reveals no update; "
    "a server that substitutes public keys is not detected (SecAgg+ has no key authentication). {clipped} "
    "It hides updates from the server, not from the global model."
)
SECAGG_CLIPPED = {
    True: "The quantiser clipped {count} weight-scaled values beyond ±8 (rounds {rounds}), so the aggregate is "
          "wrong at those values; raise --secagg-max-weight.",
    False: "No value fell outside the quantiser's range.",
}
SECURE_MODE = {
    True: "Local DP-SGD noise and batch sampling were drawn from the operating system's cryptographically secure "
          "generator, with Opacus' secure-mode recipe against floating-point attacks (--secure-mode).",
    False: "Local DP-SGD noise came from PyTorch's default pseudo-random generator, not Opacus' secure_mode: "
           "fine for experiments; pass --secure-mode in production, where a predictable generator weakens the guarantee.",
}
OWNER_POLICY = (
    "Threat model: local DP protects each owner's records from the server, so the server is not trusted for it. "
    "Each client enforced its owner's own policy (DP required unless the owner allowed otherwise, its delta, "
    "its accountant, its minimum noise, its budget), charged its own ledger before any update left, and declined "
    "rounds its policy did not allow; the epsilon shown is what the clients report from their ledgers."
)
NO_DP = (
    "This run trained **without differential privacy**: epsilon is infinite, and nothing bounds what "
    "the server or other clients can learn about any single record from the model updates."
)


@dataclass
class RunReport:
    """Everything a run reports, built round by round by the server."""

    run: dict[str, Any]
    delta: float
    accountant: str
    dp: bool
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    central: dict[str, Any] = field(default_factory=dict)  # user-level DP: releases and epsilon
    run_dir: Path | None = field(default=None, compare=False)  # the folder it was loaded from (not persisted)

    # ------------------------------------------------------------- building
    def record_training(self, client_id: str, server_round: int, noise: float, rate: float, steps: int,
                        epsilon: float, ledger: list[dict] | None = None) -> None:
        """Add one round of a client's local training, with its cumulative epsilon.

        ``ledger`` is the client's whole ledger: it can hold more than this run's history (earlier
        runs on the same data, rounds trained before a server restart), and epsilon covers all of it.
        """
        entry = self.clients.setdefault(client_id, {"epsilon": 0.0 if self.dp else math.inf, "history": []})
        entry["history"].append({"round": server_round, "noise_multiplier": noise, "sample_rate": rate,
                                 "steps": steps, "epsilon": epsilon})
        entry["epsilon"] = epsilon
        if ledger is not None:
            entry["ledger"] = ledger

    def record_central_release(self, server_round: int, noise_multiplier: float, sampled: int, population: int,
                               secret_cohort: bool = False) -> None:
        """Add one round's central-DP release and recompute the user-level epsilons over all of them.

        ``epsilon`` charges every release in full (no amplification): it holds against anyone, readers of
        this report (which lists every cohort) included. ``epsilon_amplified`` exists only when some cohort
        was ``secret_cohort`` (CSPRNG-sampled, picked by a trusted server: ``amplification_holds``) and
        smaller than the population; it holds only against those who see the global models alone.
        """
        from fedpriv.common.accounting import user_level_epsilon  # dp-accounting is imported only by central-DP runs

        releases = self.central.setdefault("releases", [])
        releases.append({"round": server_round, "noise_multiplier": noise_multiplier, "sampled": sampled,
                         "population": population, "secret_cohort": bool(secret_cohort)})
        self.central["epsilon"] = user_level_epsilon(releases, self.delta, amplification=False)
        if any(r.get("secret_cohort") and r["sampled"] < r["population"] for r in releases):
            self.central["epsilon_amplified"] = user_level_epsilon(releases, self.delta, amplification=True)
        else:
            self.central.pop("epsilon_amplified", None)

    def user_epsilon(self) -> float | None:
        return self.central.get("epsilon") if self.central else None

    def add_round(self, server_round: int, metrics: dict[str, float], participation: dict[str, Any]) -> None:
        extra = {"user_epsilon": self.user_epsilon()} if self.central else {}
        if "epsilon_amplified" in self.central:  # only against those who see the global models alone
            extra["user_epsilon_amplified"] = self.central["epsilon_amplified"]
        self.rounds.append({"round": server_round, "metrics": metrics, "max_epsilon": self.max_epsilon(),
                            **extra, **participation})

    def max_epsilon(self) -> float:
        if not self.dp:
            return math.inf
        return max((c["epsilon"] for c in self.clients.values()), default=0.0)

    # ------------------------------------------------------------ persisting
    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "rounds": self.rounds,
            "privacy": {"dp": self.dp, "delta": self.delta, "accountant": self.accountant,
                        "max_epsilon": self.max_epsilon(), "clients": self.clients, "central": self.central,
                        "guarantees": self.guarantees()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunReport":
        privacy = data["privacy"]
        clients = {cid: {**c, "epsilon": float(c["epsilon"]),
                         "history": [{**h, "epsilon": float(h["epsilon"])} for h in c["history"]]}
                   for cid, c in privacy["clients"].items()}
        rounds = [{**r, "max_epsilon": float(r.get("max_epsilon", 0.0))} for r in data["rounds"]]
        return cls(run=data.get("run", {}), delta=float(privacy["delta"]), accountant=privacy["accountant"],
                   dp=bool(privacy.get("dp", True)), rounds=rounds, clients=clients,
                   central=dict(privacy.get("central", {})))

    @classmethod
    def load(cls, run_dir: Path) -> "RunReport":
        path = Path(run_dir) / "report.json"
        if not path.is_file():
            raise UserInputError(f"{run_dir} holds no report.json; pass the folder of a finished or running run")
        try:
            report = cls.from_dict(read_json(path))
        except (ValueError, KeyError, TypeError) as exc:
            raise UserInputError(f"{path} is not a valid fedpriv report ({exc.__class__.__name__}: {exc})") from None
        report.run_dir = Path(run_dir)
        return report

    def write(self, run_dir: Path, plots: bool = True) -> None:
        """Write report.json, report.md and (optionally) the plots, each atomically."""
        run_dir = Path(run_dir)
        write_json(run_dir / "report.json", self.to_dict())
        write_text(run_dir / "report.md", self.markdown())
        if plots:
            self.plot(run_dir)

    # -------------------------------------------------------------- rendering
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for r in self.rounds:
            names += [k for k in r["metrics"] if k not in names]
        return names

    def guarantees(self) -> dict[str, str]:
        """One plain sentence per guarantee that holds for this run (and what does not hold)."""
        found = {"local_dp": GUARANTEE.format(eps=_fmt_eps(self.max_epsilon()), delta=f"{self.delta:g}",
                                              accountant=self.accountant.upper()) if self.dp else NO_DP}
        if self.dp and self.accountant == "gdp":
            found["local_dp"] += (" GDP is a central-limit approximation, not a bound: for few steps or small noise "
                                  "it can understate epsilon; use rdp for a guarantee.")
        releases = self.central.get("releases", [])
        if releases:
            everyone = all(r["sampled"] >= r["population"] for r in releases)
            found["user_level_dp"] = USER_LEVEL.format(
                eps=_fmt_eps(self.central["epsilon"]), delta=f"{self.delta:g}", mode=self.run.get("central_dp", ""),
                releases=len(releases), sampled=releases[-1]["sampled"], population=releases[-1]["population"],
                charged=USER_LEVEL_CHARGED["everyone" if everyone else "visible"])
            if "epsilon_amplified" in self.central:
                found["user_level_dp"] += USER_LEVEL_AMPLIFIED.format(eps=_fmt_eps(self.central["epsilon_amplified"]),
                                                                      delta=f"{self.delta:g}")
            elif not everyone:
                found["user_level_dp"] += USER_LEVEL_NOT_AMPLIFIED
            found["user_level_dp"] += CENTRAL_NOISE[bool(self.run.get("secure_mode"))]
        if self.run.get("secure_aggregation"):
            clipped = {r["round"]: sum(r.get("secagg_clipped", {}).values()) for r in self.rounds}
            clipped = {n: c for n, c in clipped.items() if c}
            found["secure_aggregation"] = SECURE_AGGREGATION.format(
                threshold=self.run.get("secagg_threshold", "?"), shares=self.run.get("secagg_shares", "?"),
                clipped=SECAGG_CLIPPED[bool(clipped)].format(
                    count=sum(clipped.values()), rounds=", ".join(map(str, clipped))))
        if self.dp:
            found["noise_source"] = SECURE_MODE[bool(self.run.get("secure_mode"))]
            found["owner_policy"] = OWNER_POLICY
        return found

    def markdown(self) -> str:
        lines = ["# fedpriv run report", ""]
        for key, value in self.run.items():
            lines.append(f"- **{key}**: {value}")
        lines += ["", "## Privacy guarantees", ""]
        lines += [f"- {sentence}" for sentence in self.guarantees().values()]
        names = self.metric_names()
        user = " user-level epsilon |" if self.central else ""
        lines += ["", "## Rounds", "", "| round | " + " | ".join(names) + f" | max epsilon |{user} clients trained |",
                  "|---" * (len(names) + 3 + bool(user)) + "|"]
        for r in self.rounds:
            vals = " | ".join(_fmt(r["metrics"].get(n)) for n in names)
            user_eps = f" {_fmt_eps(r.get('user_epsilon') or 0.0)} |" if user else ""
            lines.append(f"| {r['round']} | {vals} | {_fmt_eps(r['max_epsilon'])} |{user_eps} {len(r.get('trained', []))} |")
        lines += ["", "## Per-client privacy", "",
                  "| client | rounds trained | steps | earlier rounds in its ledger | epsilon (all of them) |",
                  "|---|---|---|---|---|"]
        for cid in sorted(self.clients, key=_natural):
            c = self.clients[cid]
            earlier = max(0, len(c.get("ledger", c["history"])) - len(c["history"]))
            lines.append(f"| {cid} | {len(c['history'])} | {sum(h['steps'] for h in c['history'])} | {earlier} | "
                         f"{_fmt_eps(c['epsilon'])} |")
        left_out = [r for r in self.rounds if r.get("declined") or r.get("rejected") or r.get("missed")]
        if left_out:
            lines += ["", "## Clients left out of rounds", ""]
            for r in left_out:
                for cid in r.get("declined", []):
                    why = r.get("decline_reasons", {}).get(cid, "privacy budget")
                    lines.append(f"- round {r['round']}: {cid} declined: {why}")
                for cid, why in r.get("rejected", {}).items():
                    lines.append(f"- round {r['round']}: update of {cid} dropped: {why}")
                for cid in r.get("missed", []):
                    lines.append(f"- round {r['round']}: {cid} missed the round (no reply)")
        lines += ["", "Plots: `metrics.png` (test metrics per round), `epsilon.png` (cumulative epsilon per client).", ""]
        return "\n".join(lines)

    def plot(self, run_dir: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.metric_names()
        fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.5 * max(len(names), 1), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names):
            pts = [(r["round"], r["metrics"][name]) for r in self.rounds if name in r["metrics"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set_xlabel("round")
            ax.set_ylabel(f"test {name}")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{self.run.get('model', '')} on {self.run.get('dataset', '')}")
        fig.tight_layout()
        _save_fig(fig, run_dir / "metrics.png")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        for cid in sorted(self.clients, key=_natural):
            hist = [h for h in self.clients[cid]["history"] if math.isfinite(h["epsilon"])]
            if hist:
                ax.plot([h["round"] for h in hist], [h["epsilon"] for h in hist], marker=".", label=cid)
        ax.set_xlabel("round")
        ax.set_ylabel(f"cumulative epsilon (delta={self.delta:g})")
        ax.set_title("per-client privacy loss" if self.dp else "no DP: epsilon is infinite")
        if self.clients and self.dp and len(self.clients) <= 20:
            ax.legend(fontsize="small", ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save_fig(fig, run_dir / "epsilon.png")
        plt.close(fig)


def _save_fig(fig, path: Path) -> None:
    from fedpriv.common.atomic_io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def _fmt_eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _natural(name: str) -> tuple:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, -1)
