"""The run configuration: one dataclass, validated once, shared by CLI, ServerApp and ClientApp.

Keys are snake_case in Python and kebab-case in Flower's run config (``pyproject.toml``,
``flwr run . --run-config``) and in the training messages the server sends to clients.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

from fedpriv.common.errors import ConfigError

MODELS = ("cnn", "rnn", "autoencoder", "mlp")
DATA_FORMATS = ("npz", "csv", "parquet", "images")  # --dataset FORMAT:PATH (common/tabular.py)
BUILTIN_DATASETS = ("digits", "mnist1d")
PARTITIONINGS = ("iid", "dirichlet", "shards")
# Flower's Byzantine-robust rules: they need every client's own update and are not a mean (RunConfig.validate).
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm", *ROBUST_STRATEGIES)
SERVER_LR_DEFAULTS = {"fedadam": 0.01, "fedavgm": 1.0}  # --server-learning-rate 0: the strategy's own default
ACCOUNTANTS = ("rdp", "prv", "gdp")
DECISION_ACCOUNTANTS = ("rdp", "prv")  # upper bounds: the only ones a budget decision may use (gdp approximates)
CENTRAL_DP_MODES = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
SIMULATION_BACKENDS = ("in-process", "ray")
# "auto" = the fastest exact mode for the model family (client/grad_sample_modes.py);
# "bookkeeping" = our single-backward-pass exact clipping (client/bookkeeping.py).
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost", "bookkeeping")
RNN_CELLS = ("gru", "lstm")  # Opacus' DPGRU / DPLSTM (common/models.py)
CNN_NORMS = ("none", "group")  # --cnn-norm (common/models.py)
# --cnn-arch (common/models.py): fixed wavelet features + class layer; the same + the card's two conv blocks;
# one conv block; the card's two + FC 128; the card's two alone
CNN_ARCHS = ("scatter", "scatter-conv", "compact", "card", "card-conv")
MAX_AUGMENT_VIEWS = 16  # --augment-views: each view is a forward and backward pass (client/augmentation.py)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one federated run. Defaults are the README's main job.

    Frozen: a resolved value is never rewritten in place (``dataclasses.replace`` makes the next one), so a
    config handed to the server, a client or a caller stays what it was when it was checked."""

    model: str = field(default="cnn", metadata={"help": "Model family: cnn, rnn, autoencoder or mlp (tables)."})
    dataset: str = field(
        default="digits",
        metadata={"help": "digits, mnist1d, npz:PATH (arrays x and y; y optional for the autoencoder), csv:PATH, parquet:PATH or images:DIR (one sub-folder per class)."},
    )
    label_column: str = field(default="", metadata={"help": "csv/parquet: the label column (none for the autoencoder)."})
    categories: str = field(default="", metadata={"help": "csv/parquet/images: the shared category schema, a JSON object {column: [values]} inline or a file (simulation: sorted from the data when absent)."})
    image_size: int = field(default=32, metadata={"help": "images: side every image is resized to (RGB, NxN)."})
    mnist1d_samples: int = field(default=10_000, metadata={"help": "Samples MNIST-1D generates locally."})
    num_clients: int = field(default=10, metadata={"help": "Number of data owners (virtual clients)."})
    num_rounds: int = field(default=20, metadata={"help": "Federated rounds."})
    fraction_train: float = field(default=1.0, metadata={"help": "Fraction of clients sampled per round."})
    min_clients: int = field(default=2, metadata={"help": "Minimum clients per round."})
    partitioning: str = field(default="iid", metadata={"help": "iid, dirichlet or shards."})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (smaller = more skew)."})
    classes_per_client: int = field(default=2, metadata={"help": "Classes per client for 'shards'."})
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out share for the server's test set."})
    seed: int = field(default=0, metadata={"help": "Seed for data split, partitioning and model init."})
    strategy: str = field(default="fedavgm", metadata={"help": "fedavg, fedprox, fedadam, fedavgm (server momentum) or a robust rule."})
    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx proximal weight."})
    server_learning_rate: float = field(default=0.0, metadata={"help": "Server step size of fedadam (eta) and fedavgm (0 = the strategy's default: fedadam 0.01, fedavgm 1.0)."})
    server_momentum: float = field(default=0.8, metadata={"help": "fedavgm: momentum of the server's SGD on the averaged update (Hsu et al. 2019), in [0, 1); other strategies have none."})
    server_ema: float = field(default=0.0, metadata={"help": "Decay of the exponential moving average of the global model's iterates that the server evaluates and releases (0 = off; post-processing, no privacy cost)."})
    trimmed_beta: float = field(default=0.2, metadata={"help": "fedtrimmedavg: fraction of updates cut from each end, per coordinate, before averaging (in [0, 0.5); must trim at least one update per side)."})
    num_malicious: int = field(default=0, metadata={"help": "krum, multikrum, bulyan: Byzantine clients per round the rule must withstand (0 = the most it can with the clients per round: m > 2f+2 for Krum and MultiKrum, m >= 4f+3 for Bulyan). MultiKrum averages the m - f best-scored updates."})
    max_update_norm: float = field(default=0.0, metadata={"help": "Largest L2 norm of a client's model update the server accepts (0 = derived from this config: the most local training with these lr, momentum, epochs, batch size, clip and noise can move a client of up to --max-client-records records; see README)."})
    max_client_records: int = field(default=0, metadata={"help": "Most records the server credits one client with: caps FedAvg's weight and bounds the local steps in the update norm bound (0 = the largest share the run's partitioning gives the server's own training set, exact in simulation; set it in deployments)."})
    local_epochs: int = field(default=1, metadata={"help": "Local epochs per round."})
    batch_size: int = field(default=144, metadata={"help": "Expected local batch size (Poisson: rate = batch/n)."})
    learning_rate: float = field(default=0.5, metadata={"help": "Client SGD learning rate."})
    momentum: float = field(default=0.9, metadata={"help": "Client SGD momentum."})
    dp: bool = field(default=True, metadata={"help": "Local DP-SGD with Opacus on every client."})
    noise_multiplier: float = field(default=5.2, metadata={"help": "DP-SGD noise multiplier (sigma)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "DP-SGD per-sample clipping bound."})
    delta: float = field(default=1e-5, metadata={"help": "Target delta of (epsilon, delta)-DP."})
    accountant: str = field(default="rdp", metadata={"help": "Privacy accountant: rdp (upper bound), prv (tight numerical estimate) or gdp (CLT approximation: can underestimate epsilon, badly for few steps or little noise)."})
    poisson_sampling: bool = field(default=True, metadata={"help": "Poisson batch sampling (needed for the amplification the accountant assumes)."})
    grad_sample_mode: str = field(default="auto", metadata={"help": "Per-sample gradient mode: auto (fastest exact one for the model), hooks, functorch, ew, ghost (Opacus; without DP only: its two backward passes let a server's weights lift a record above the clipping norm) or bookkeeping (single-pass exact clipping)."})
    secure_mode: bool = field(default=False, metadata={"help": "Noise from the OS CSPRNG (slower): local DP-SGD with Opacus' secure-mode recipe, and central DP."})
    secure_aggregation: bool = field(default=False, metadata={"help": "Flower SecAgg+: the server learns only the (weighted) sum of the sampled clients' updates."})
    secagg_shares: int = field(default=0, metadata={"help": "SecAgg+ shares per client key (0 = every client sampled in the round)."})
    secagg_threshold: int = field(default=0, metadata={"help": "SecAgg+ shares needed to unmask (0 = two thirds of the shares, at least 2; more than half of them); a round survives shares - threshold dropouts among a client's neighbours."})
    secagg_max_weight: float = field(default=10_000.0, metadata={"help": "SecAgg+ largest client weight (examples); larger weights overflow, much larger ones cost precision."})
    central_dp: str = field(default="off", metadata={"help": "User-level central DP with Flower's DP strategies: off, server-fixed, client-fixed, server-adaptive or client-adaptive (clipping side and kind)."})
    central_noise_multiplier: float = field(default=1.0, metadata={"help": "Central DP noise multiplier z: noise std z*C/m on the average of m clipped updates."})
    central_clipping_norm: float = field(default=1.0, metadata={"help": "Central DP clipping norm C of a client's model update (initial norm when adaptive)."})
    central_count_stddev: float = field(default=0.0, metadata={"help": "Adaptive clipping: noise std on the count of clipped updates (0 = max(m/20, z), m clients per round)."})
    central_target_quantile: float = field(default=0.5, metadata={"help": "Adaptive clipping: the fraction of updates left unclipped that the norm tracks."})
    budget_epsilon: float = field(default=0.0, metadata={"help": "Per-client epsilon budget; a client declines rounds that would exceed it (0 = no budget)."})
    target_epsilon: float = field(default=0.0, metadata={"help": "Derive --noise-multiplier (overriding it) so the smallest client, assumed to train in every round (worst case), ends at epsilon <= this (0 = off)."})
    rnn_hidden: int = field(default=64, metadata={"help": "RNN hidden size."})
    rnn_layers: int = field(default=1, metadata={"help": "RNN recurrent layers."})
    rnn_cell: str = field(default="gru", metadata={"help": "RNN cell: gru (Opacus DPGRU) or lstm (Opacus DPLSTM, the design card's)."})
    encoding_dim: int = field(default=32, metadata={"help": "Autoencoder bottleneck size."})
    cnn_arch: str = field(default="scatter", metadata={"help": "CNN: scatter (fixed wavelet features, normalised per record, feeding the class layer: the most accurate under DP on small data), scatter-conv (the same features through the card's two conv blocks: the most accurate under DP on MNIST-1D), compact (one conv block of 32 feeding the class layer), card (the design card's two conv blocks, 32 and 64, and FC 128), or card-conv (the card's two conv blocks feeding the class layer)."})
    cnn_norm: str = field(default="none", metadata={"help": "CNN: none (the design card's) or group (GroupNorm after each convolution)."})
    ae_layers: int = field(default=1, metadata={"help": "Autoencoder hidden layers of 400 on each side of the bottleneck (1 = input-400-encoding-400-input)."})
    augment_views: int = field(default=1, metadata={"help": "Augmentation multiplicity: random views of each sampled record whose gradients are averaged before clipping, so the record still counts once (1 = off; at most 16; sequences and images; bookkeeping mode)."})
    augment_shift: int = field(default=1, metadata={"help": "Augmented views: largest random shift along each spatial axis, in steps or pixels."})
    augment_flip: bool = field(default=False, metadata={"help": "Augmented views of images: random horizontal flips (not for digits or text-like images)."})
    round_timeout: float = field(default=600.0, metadata={"help": "Seconds the server waits for replies in a round before going on without the missing clients."})
    client_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per simulated client (controls parallelism)."})
    simulation_backend: str = field(default="in-process", metadata={"help": "fedpriv simulate's executor: in-process (ClientApps in threads, no start-up cost) or ray (process isolation, GPU scheduling)."})
    run_dir: str = field(default="", metadata={"help": "Run folder (default: runs/<time>-<model>-<dataset>)."})

    # ------------------------------------------------------------------ mapping
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, ignore_unknown: bool = False) -> "RunConfig":
        """Build from kebab- or snake-case keys (Flower run config, JSON), coercing types."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                if ignore_unknown:
                    continue
                raise ConfigError(f"unknown config key '{key}'; valid keys: {', '.join(k.replace('_', '-') for k in known)}")
            kwargs[name] = _coerce(name, known[name].type, value)
        return cls(**kwargs)

    def to_dict(self, kebab: bool = False) -> dict[str, Any]:
        """Plain dict, snake_case by default or kebab-case for Flower records."""
        data = dataclasses.asdict(self)
        return {k.replace("_", "-"): v for k, v in data.items()} if kebab else data

    def to_flags(self, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[str]:
        """The command-line flags that reproduce this config (the inverse of the CLI's option parsing).

        ``--kebab-key value`` per field, booleans as ``--flag`` / ``--no-flag`` (the CLI's
        ``--dp/--no-dp``). ``only``: just these fields, ``skip``: not these (snake- or kebab-case).
        The one serializer every launcher and benchmark uses.
        """
        names = [f.name for f in fields(self)]
        wanted = set(names) if only is None else {k.replace("-", "_") for k in only}
        unknown = (wanted | {k.replace("-", "_") for k in skip}) - set(names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(sorted(unknown))}")
        wanted -= {k.replace("-", "_") for k in skip}
        return to_flags({name: getattr(self, name) for name in names if name in wanted})

    # --------------------------------------------------------------- validation
    def validate(self) -> "RunConfig":
        """Check every option alone; data-dependent checks live with the data. Returns self."""
        check_choice("model", self.model, MODELS)
        fmt, sep, path = self.dataset.partition(":")
        if not (self.dataset in BUILTIN_DATASETS or (sep and fmt in DATA_FORMATS and path)):
            raise ConfigError(
                f"--dataset '{self.dataset}' is unknown; use digits, mnist1d, npz:FILE.npz, csv:FILE.csv, "
                "parquet:FILE.parquet or images:DIR"
            )
        if not 4 <= self.image_size <= 1024:
            raise ConfigError(f"--image-size must be in 4..1024 pixels (got {self.image_size})")
        check_choice("partitioning", self.partitioning, PARTITIONINGS)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        check_choice("grad-sample-mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        if self.dp and self.grad_sample_mode == "ghost":
            raise ConfigError(
                "--grad-sample-mode ghost is not offered for DP training: Opacus' ghost clipping takes the per-sample "
                "norms from one backward pass and the clipped sum from a second, and weights a server chooses can make "
                "them disagree so that a record escapes clipping; use auto (book-keeping: one pass) or hooks")
        _positive_int("num-clients", self.num_clients)
        _positive_int("num-rounds", self.num_rounds)
        _positive_int("local-epochs", self.local_epochs)
        _positive_int("batch-size", self.batch_size)
        _positive_int("min-clients", self.min_clients)
        _positive_int("classes-per-client", self.classes_per_client)
        _positive_int("rnn-hidden", self.rnn_hidden)
        _positive_int("rnn-layers", self.rnn_layers)
        _positive_int("encoding-dim", self.encoding_dim)
        check_choice("rnn-cell", self.rnn_cell, RNN_CELLS)
        check_choice("cnn-norm", self.cnn_norm, CNN_NORMS)
        check_choice("cnn-arch", self.cnn_arch, CNN_ARCHS)
        _positive_int("ae-layers", self.ae_layers)
        self._check_augmentation()
        if self.mnist1d_samples < 100:
            raise ConfigError(f"--mnist1d-samples must be >= 100 (got {self.mnist1d_samples})")
        if self.min_clients > self.num_clients:
            raise ConfigError(
                f"--min-clients ({self.min_clients}) exceeds --num-clients ({self.num_clients}); lower it or add clients"
            )
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"--fraction-train must be in (0, 1] (got {self.fraction_train})")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in (0, 1) (got {self.test_fraction})")
        _positive_float("dirichlet-alpha", self.dirichlet_alpha)
        _positive_float("learning-rate", self.learning_rate)
        _positive_float("client-cpus", self.client_cpus)
        check_choice("simulation-backend", self.simulation_backend, SIMULATION_BACKENDS)
        _positive_float("round-timeout", self.round_timeout)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1) (got {self.momentum})")
        if not (self.proximal_mu >= 0 and math.isfinite(self.proximal_mu)):
            raise ConfigError(f"--proximal-mu must be >= 0 (got {self.proximal_mu})")
        if not (self.server_learning_rate >= 0 and math.isfinite(self.server_learning_rate)):
            raise ConfigError(f"--server-learning-rate must be >= 0, 0 meaning the strategy's default (got {self.server_learning_rate})")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"--server-momentum must be in [0, 1) (got {self.server_momentum})")
        if not 0.0 <= self.server_ema < 1.0:
            raise ConfigError(f"--server-ema must be in [0, 1), 0 meaning off (got {self.server_ema})")
        check_choice("central-dp", self.central_dp, CENTRAL_DP_MODES)
        if self.central_dp != "off":
            _positive_float("central-noise-multiplier", self.central_noise_multiplier)
            _positive_float("central-clipping-norm", self.central_clipping_norm)
            if self.central_count_stddev and not self.central_count_stddev > self.central_noise_multiplier / 2:
                raise ConfigError(
                    f"--central-count-stddev must exceed half the noise multiplier ({self.central_noise_multiplier / 2:g}); "
                    f"got {self.central_count_stddev} (0 picks one)"
                )
            if not 0.0 < self.central_target_quantile < 1.0:
                raise ConfigError(f"--central-target-quantile must be in (0, 1) (got {self.central_target_quantile})")
            if not 0.0 < self.delta < 1.0:
                raise ConfigError(f"--delta must be in (0, 1) (got {self.delta}); a usual choice is 1e-5")
        if self.secure_aggregation:
            self._check_secure_aggregation()
        if self.budget_epsilon < 0 or math.isnan(self.budget_epsilon):
            raise ConfigError(f"--budget-epsilon must be >= 0, 0 meaning no budget (got {self.budget_epsilon})")
        if not (self.target_epsilon >= 0 and math.isfinite(self.target_epsilon)):
            raise ConfigError(f"--target-epsilon must be >= 0, 0 meaning off (got {self.target_epsilon})")
        if self.target_epsilon > 0 and not self.dp:
            raise ConfigError("--target-epsilon needs DP on: drop --no-dp, or drop --target-epsilon")
        if self.dp:
            if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
                raise ConfigError(
                    f"--noise-multiplier must be > 0 with DP on (got {self.noise_multiplier}); "
                    "pass a positive value, or --no-dp for a non-private run"
                )
            _positive_float("max-grad-norm", self.max_grad_norm)
            if not 0.0 < self.delta < 1.0:
                raise ConfigError(f"--delta must be in (0, 1) (got {self.delta}); a usual choice is 1e-5")
        self._check_aggregation()
        return self


    def _check_augmentation(self) -> None:
        """Augmented views: a bounded count, a sane shift, and a mode that clips a record's views as one."""
        if not 1 <= self.augment_views <= MAX_AUGMENT_VIEWS:
            raise ConfigError(f"--augment-views must be in 1..{MAX_AUGMENT_VIEWS}, 1 meaning off (got {self.augment_views})")
        if not 0 <= self.augment_shift <= 8:
            raise ConfigError(f"--augment-shift must be in 0..8 steps or pixels (got {self.augment_shift})")
        if self.augment_views == 1:
            return
        if self.model == "mlp":
            raise ConfigError("--augment-views shifts sequences and images; --model mlp trains on tables: use --augment-views 1")
        if self.grad_sample_mode not in ("auto", "bookkeeping") or self.cnn_norm != "none":
            raise ConfigError(
                "--augment-views needs the bookkeeping grad-sample mode (auto picks it unless --cnn-norm group), which "
                "clips a record's views as one; Opacus' modes would clip every view alone: drop the view count or the option")

    def server_lr(self) -> float:
        """The server optimiser's step size: ``--server-learning-rate``, or the strategy's default for 0."""
        return self.server_learning_rate or SERVER_LR_DEFAULTS.get(self.strategy, 1.0)

    def malicious_clients(self, sampled: int | None = None) -> int:
        """f of Krum, MultiKrum and Bulyan: ``--num-malicious``, or the most the rule withstands with
        ``sampled`` clients per round (Krum needs m > 2f+2, Bulyan m >= 4f+3)."""
        if self.num_malicious:
            return self.num_malicious
        m = self.clients_per_round() if sampled is None else sampled
        return max(0, (m - 3) // 4 if self.strategy == "bulyan" else (m - 3) // 2)

    def _check_aggregation(self) -> None:
        """The server's update limits, and robust rules that cannot work with this run's privacy mode or cohort size."""
        if not (self.num_malicious >= 0):
            raise ConfigError(f"--num-malicious must be >= 0, 0 meaning the most the rule withstands (got {self.num_malicious})")
        if not 0.0 <= self.trimmed_beta < 0.5:
            raise ConfigError(f"--trimmed-beta must be in [0, 0.5) (got {self.trimmed_beta})")
        if not (self.max_update_norm >= 0 and math.isfinite(self.max_update_norm)):
            raise ConfigError(f"--max-update-norm must be >= 0, 0 meaning derived from the config (got {self.max_update_norm})")
        if self.max_client_records < 0:
            raise ConfigError(f"--max-client-records must be >= 0, 0 meaning derived from the data (got {self.max_client_records})")
        if self.strategy not in ROBUST_STRATEGIES:
            return
        if self.secure_aggregation:
            raise ConfigError(
                f"--strategy {self.strategy} needs every client's own update, which --secure-aggregation hides from "
                "the server (it learns only the sum); use fedavg, fedprox, fedadam or fedavgm with secure aggregation"
            )
        if self.central_dp != "off":
            raise ConfigError(
                f"--strategy {self.strategy} with --central-dp {self.central_dp} is not supported: the central noise "
                "z*C/m is calibrated to a mean's sensitivity C/m, and one client can move a median, a trimmed mean or "
                "Krum's pick further; use fedavg or fedprox with central DP, or the robust rule with local DP (--dp)"
            )
        m = self.clients_per_round()
        f = self.malicious_clients(m)
        if self.strategy == "fedtrimmedavg" and int(self.trimmed_beta * m) < 1:
            raise ConfigError(
                f"--trimmed-beta {self.trimmed_beta:g} trims nothing with {m} clients per round (int(beta*m) = 0); "
                f"raise it to at least {1 / m:.3g} or sample more clients"
            )
        if self.strategy in ("krum", "multikrum") and not m > 2 * f + 2:
            raise ConfigError(
                f"--strategy {self.strategy} withstands f Byzantine clients only with m > 2f+2 clients per round; "
                f"got m={m}, f={f}: lower --num-malicious or sample more clients"
            )
        if self.strategy == "bulyan" and not (f >= 1 and m >= 4 * f + 3):
            raise ConfigError(
                f"--strategy bulyan needs m >= 4f+3 clients per round for f >= 1 Byzantine clients; got m={m}, "
                f"f={f}: lower --num-malicious or sample at least {4 * max(f, 1) + 3} clients per round"
            )

    def clients_per_round(self, available: int | None = None) -> int:
        """How many clients Flower's strategies sample per round (FedAvg.configure_train's rule)."""
        available = self.num_clients if available is None else available
        return max(int(available * self.fraction_train), self.min_clients)

    def secagg_parameters(self, sampled: int) -> tuple[int, int]:
        """(shares, threshold) of SecAgg+ for ``sampled`` clients, defaults resolved."""
        shares = self.secagg_shares or sampled
        threshold = self.secagg_threshold or max(2, math.ceil(2 * shares / 3))
        return shares, threshold

    def _check_secure_aggregation(self) -> None:
        """SecAgg+ settings that cannot work with this many clients are refused before any training."""
        sampled = self.clients_per_round()
        if sampled < 3:
            raise ConfigError(
                f"--secure-aggregation needs at least 3 clients per round (got {sampled}); with 2 each learns "
                "the other's update from the sum: raise --min-clients or --fraction-train"
            )
        if self.central_dp != "off":
            raise ConfigError(
                "--secure-aggregation with --central-dp is not supported: Flower's central DP strategies clip or "
                "inspect individual updates, which secure aggregation hides; combine it with local DP (--dp) instead"
            )
        shares, threshold = self.secagg_parameters(sampled)
        if self.secagg_shares and not 3 <= self.secagg_shares <= sampled:
            raise ConfigError(
                f"--secagg-shares must be between 3 and the clients per round ({sampled}); got {self.secagg_shares}"
            )
        if not 2 <= threshold < shares:
            raise ConfigError(
                f"--secagg-threshold must be at least 2 and below the number of shares ({shares}); got {threshold}"
            )
        if not 2 * threshold > shares:
            # client/secagg_guard.py refuses such a round: a server could tell some neighbours a client
            # is active and the others that it dropped, and collect both of its unmasking secrets.
            raise ConfigError(
                f"--secagg-threshold must be more than half the shares ({shares}), or a server lying about "
                f"dropouts could unmask a client; got {threshold}"
            )
        if not self.secagg_max_weight >= 1:
            raise ConfigError(f"--secagg-max-weight must be >= 1 (got {self.secagg_max_weight})")


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    """Turn a run-config value (possibly a string from the command line) into the field's type."""
    type_name = getattr(type_name, "__name__", type_name)
    try:
        if type_name == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{name.replace('_', '-')}' expects a {type_name}, got {value!r}"
        ) from None


def flag_name(name: str) -> str:
    """The command-line flag of a snake_case option: ``noise_multiplier`` -> ``--noise-multiplier``."""
    return "--" + name.replace("_", "-")


def to_flags(values: Mapping[str, Any], switches: Iterable[str] = ()) -> list[str]:
    """``--kebab-key value`` for each item; a boolean as ``--key`` / ``--no-key``, or, for the
    ``switches`` (on-only flags such as ``--allow-no-dp``), ``--key`` when true and nothing when false.
    Floats are written with ``repr`` (exact round trip, ``inf`` included)."""
    switches = {k.replace("-", "_") for k in switches}
    out: list[str] = []
    for key, value in values.items():
        flag = flag_name(key)
        if isinstance(value, bool):
            if value or key.replace("-", "_") not in switches:
                out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, repr(value) if isinstance(value, float) else str(value)]
    return out


def check_choice(option: str, value: str, allowed) -> None:  # noqa: ANN001 - any sequence of names
    """The one-line error for an unknown choice, shared by every option with a fixed set of values."""
    if value not in allowed:
        raise ConfigError(f"--{option} '{value}' is unknown; choose one of: {', '.join(allowed)}")


def check_port(option: str, port: int, zero_means: str = "") -> None:
    """Refuse a TCP port outside 1..65535 with a one-line :class:`ConfigError` naming ``--option``.

    ``zero_means`` (e.g. ``"any free port"``) also admits 0 and says what it does. Called before
    anything binds or starts: out of range, ``bind()`` raises OverflowError and Flower's own
    argparse buries the option in its usage text.
    """
    low = 0 if zero_means else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        zero = f", or 0 for {zero_means}" if zero_means else ""
        raise ConfigError(f"--{option} must be a port number in 1..65535{zero} (got {port})")


def _positive_int(option: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"--{option} must be a positive integer (got {value})")


def _positive_float(option: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--{option} must be a positive number (got {value})")
