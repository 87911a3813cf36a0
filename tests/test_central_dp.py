"""User-level central DP: Flower's DP strategies, the noise they add, and user-level accounting."""

from __future__ import annotations

import dataclasses

import json
import math
from collections import Counter

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp as dp_rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedpriv.client.privacy_mods import privacy_mods
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import UserInputError
from fedpriv.common.accounting import epsilon_for, user_level_epsilon
from fedpriv.server.central_dp import (
    ServerSideAdaptiveClipping,
    release_noise_multiplier,
    amplification_holds,
    wrap_central_dp,
)
from fedpriv.server.report import RunReport
from fedpriv.server.strategy_factory import build_strategy

DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def _releases(noise: float, sampled: int, population: int, rounds: int) -> list[dict]:
    return [{"noise_multiplier": noise, "sampled": sampled, "population": population, "secret_cohort": True}] * rounds


def test_without_sampling_user_epsilon_is_the_gaussian_composition_of_an_independent_accountant():
    # All clients every round: no amplification, so the RDP of `rounds` Gaussian releases, which
    # Opacus' analysis (a different implementation from dp-accounting's) computes as rate-1 steps.
    for noise, rounds in [(0.6, 5), (1.0, 20), (2.5, 100)]:
        ours = user_level_epsilon(_releases(noise, 10, 10, rounds), DELTA, amplification=True)
        assert ours == pytest.approx(epsilon_for([(noise, 1.0, rounds)], DELTA, "rdp"), rel=1e-3)


def test_sampling_fewer_clients_from_more_amplifies_privacy():
    eps = [user_level_epsilon(_releases(1.0, 10, n, 50), DELTA, amplification=True) for n in (10, 50, 200, 1000)]
    assert eps == sorted(eps, reverse=True)
    assert eps[-1] < eps[0] / 5
    # Without amplification (the cohort known) the population does not matter.
    plain = {user_level_epsilon(_releases(1.0, 10, n, 50), DELTA, amplification=False) for n in (10, 50, 200, 1000)}
    assert plain == {eps[0]}


def test_release_noise_is_relative_to_the_replace_one_sensitivity():
    cfg = RunConfig(num_clients=10, central_dp="server-fixed", central_noise_multiplier=1.2).validate()
    fixed = wrap_central_dp(build_strategy(cfg).strategy, cfg)
    assert release_noise_multiplier(fixed, 10) == pytest.approx(0.6)
    assert release_noise_multiplier(fixed, 5) == pytest.approx(0.3)  # dropouts: fewer updates, same noise
    cfg = dataclasses.replace(cfg, central_dp="client-adaptive")
    adaptive = wrap_central_dp(build_strategy(cfg).strategy, cfg)
    # Flower splits z between the update and the clipped-count releases; together they give z/2 back.
    assert adaptive.noise_multiplier > 1.2
    assert release_noise_multiplier(adaptive, 10) == pytest.approx(0.6)


def _update_reply(arrays: dict[str, np.ndarray], **metrics) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          wire.METRICS: MetricRecord({wire.UNIT_WEIGHT: 1, wire.NUM_EXAMPLES: 7, **metrics})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_adaptive_noise_is_scaled_to_the_norm_that_clipped_the_updates():
    np.random.seed(0)  # Flower draws the noisy clipped count from NumPy's global generator
    cfg = RunConfig(num_clients=5, central_dp="server-adaptive", central_noise_multiplier=1.0, strategy="fedavg",
                    central_clipping_norm=0.5, central_count_stddev=0.6).validate()
    wrapper = build_strategy(cfg)
    assert isinstance(wrapper, ServerSideAdaptiveClipping)
    size = 400_000
    wrapper.current_arrays = ArrayRecord({"w": Array(np.zeros(size, dtype=np.float64))})
    direction = np.ones(size) / np.sqrt(size)
    replies = [_update_reply({"w": 100.0 * direction}) for _ in range(5)]  # every update far above the norm
    clipped_with = wrapper.clipping_norm
    arrays, _ = wrapper.aggregate_train(1, replies)
    assert wrapper.clipping_norm < 0.97 * clipped_with  # all clipped: the norm shrank for the next round
    noise = arrays["w"].numpy() - clipped_with * direction
    expected = wrapper.noise_multiplier * clipped_with / 5
    assert np.std(noise) == pytest.approx(expected, rel=0.01)


def test_client_side_clipping_mod_clips_the_reply_to_the_norm_the_server_sent():
    sent = {"w": np.zeros(100, dtype=np.float32)}
    config = ConfigRecord({KEY_CLIPPING_NORM: 0.25, "central-dp": "client-fixed"})
    msg = Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in sent.items()}),
                              wire.CONFIG: config}), dst_node_id=1, message_type=MessageType.TRAIN)

    def train(m: Message, _ctx: Context) -> Message:
        return Message(RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(np.full(100, 3.0, dtype=np.float32))}),
                                   wire.METRICS: MetricRecord({wire.UNIT_WEIGHT: 1})}), reply_to=m)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = privacy_mods(msg, ctx, train)
    assert np.linalg.norm(reply.content[wire.ARRAYS]["w"].numpy()) == pytest.approx(0.25, rel=1e-5)
    # Without the server's clipping key the mod leaves the update alone.
    plain = Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                wire.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)
    assert np.linalg.norm(privacy_mods(plain, ctx, train).content[wire.ARRAYS]["w"].numpy()) > 29


@pytest.mark.parametrize("overrides, needle", [
    (dict(central_dp="sometimes"), "--central-dp"),
    (dict(central_dp="server-fixed", central_noise_multiplier=0.0), "--central-noise-multiplier"),
    (dict(central_dp="server-fixed", central_clipping_norm=-1.0), "--central-clipping-norm"),
    (dict(central_dp="client-adaptive", central_count_stddev=0.2), "--central-count-stddev"),
])
def test_bad_central_dp_settings_are_refused(overrides, needle):
    with pytest.raises(UserInputError, match=needle):
        RunConfig(**overrides).validate()


@pytest.mark.e2e
def test_central_dp_run_reports_user_level_epsilon_per_round(fedpriv, tmp_path):
    run_dir = tmp_path / "run"
    result = fedpriv("simulate", "--no-dp", "--central-dp", "client-fixed", "--central-noise-multiplier", "0.8",
                     "--central-clipping-norm", "0.5", "--num-clients", "4", "--num-rounds", "2",
                     "--local-epochs", "1", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    central = report["privacy"]["central"]
    assert [r["sampled"] for r in central["releases"]] == [4, 4]
    per_round = [r["user_epsilon"] for r in report["rounds"]]
    # Every client in every round: two Gaussian releases of multiplier z/2 under replace-one adjacency.
    assert per_round[0] == pytest.approx(epsilon_for([(0.4, 1.0, 1)], DELTA, "rdp"), rel=1e-3)
    assert per_round[1] == pytest.approx(epsilon_for([(0.4, 1.0, 2)], DELTA, "rdp"), rel=1e-3)
    assert "user_level_dp" in report["privacy"]["guarantees"]
    assert "user-level" in (run_dir / "report.md").read_text()
    assert "epsilon_amplified" not in central  # every client in every cohort: nothing to amplify


@pytest.mark.e2e
def test_central_dp_around_fedadam_reports_epsilon_with_and_without_amplification(fedpriv, tmp_path):
    # A real run: FedAdam stepping on the noisy mean, 3 of 6 clients per round from the CSPRNG, secure-mode noise.
    run_dir = tmp_path / "run"
    result = fedpriv("simulate", "--no-dp", "--strategy", "fedadam", "--secure-mode", "--central-dp", "server-fixed",
                     "--central-noise-multiplier", "1.0", "--central-clipping-norm", "0.5", "--num-clients", "6",
                     "--fraction-train", "0.5", "--num-rounds", "2", "--local-epochs", "1", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    central = report["privacy"]["central"]
    assert [(r["sampled"], r["population"], r["secret_cohort"]) for r in central["releases"]] == [(3, 6, True)] * 2
    gaussian = dp_accounting.GaussianDpEvent(0.5)  # z/2: replace-one sensitivity 2C, all 3 updates aggregated
    assert central["epsilon"] == pytest.approx(_independent_epsilon(gaussian, 2, DELTA), rel=1e-9)
    amplified = dp_accounting.SampledWithoutReplacementDpEvent(6, 3, gaussian)
    assert central["epsilon_amplified"] == pytest.approx(_independent_epsilon(amplified, 2, DELTA), rel=1e-9)
    assert central["epsilon_amplified"] < central["epsilon"]
    sentence = report["privacy"]["guarantees"]["user_level_dp"]
    assert "without amplification" in sentence and "operating system's CSPRNG (--secure-mode)" in sentence


# ----------------------------------------------------------------- attacks on the post-processing
class _Grid:
    """The part of Flower's Grid a strategy samples from: the ids of the connected nodes."""

    def __init__(self, nodes: range) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _model(x: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(x, dtype=np.float64))})


def _round(strategy, server_round: int, current: np.ndarray, new_models: list[np.ndarray], grid: _Grid,
           metrics: dict | None = None) -> np.ndarray:
    """One round as the server runs it: sample from ``grid``, then aggregate one reply per sampled client."""
    messages = list(strategy.configure_train(server_round, _model(current), ConfigRecord({}), grid))
    assert len(messages) == len(new_models)
    replies = [_update_reply({"w": m}, **(metrics or {})) for m in new_models]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays["w"].numpy()


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _advantage_allowed(mu: float, trials: int) -> float:
    """The most a test can tell apart two mu-GDP neighbours (total variation 2*Phi(mu/2) - 1), plus 5
    standard errors of the difference of two frequencies estimated from ``trials`` runs each."""
    return 2 * _phi(mu / 2) - 1 + 5 * math.sqrt(0.5 / trials)


def _neighbour_run(strategy, sign: int, rounds: int, clip: float, d: int) -> list[np.ndarray]:
    """The released models x_0..x_T of one run. Neighbouring datasets: the target client sends +C*u
    (dataset A, ``sign`` +1) or -C*u (dataset B, its data replaced) in round 1 only, next to three clients
    sending (next to) no change; in every later round the target is absent and all four send the model
    back (next to) unchanged. "Next to": Flower's server-side clipping divides by the norm of each update,
    so an update of exactly zero crashes it; 1e-9 is nothing against the noise."""
    u = np.ones(d) / np.sqrt(d)
    grid = _Grid(range(1, 5))
    models = [np.zeros(d)]
    others = [models[0] + 1e-9 * (i + 1) for i in range(3)]
    models.append(_round(strategy, 1, models[0], [models[0] + sign * clip * u] + others, grid))
    for server_round in range(2, rounds + 1):
        models.append(_round(strategy, server_round, models[-1], [models[-1] + 1e-9 * (i + 1) for i in range(4)],
                             grid))
    return models


def _attacker_advantage(make_strategy, statistic, rounds: int, clip: float, d: int, trials: int) -> float:
    """P_A(statistic > 0) - P_B(statistic > 0) over ``trials`` runs on each neighbour (``_neighbour_run``)."""
    u = np.ones(d) / np.sqrt(d)
    above = {sign: sum(statistic(_neighbour_run(make_strategy(), sign, rounds, clip, d), u) > 0
                       for _ in range(trials)) / trials for sign in (+1, -1)}
    return above[+1] - above[-1]


@pytest.fixture
def quiet_flower():
    """Flower logs every sampling and aggregation at INFO; thousands of rounds drown in it."""
    import logging

    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def test_fedadam_moments_leak_nothing_the_central_noise_does_not_cover(quiet_flower):
    # The leak this guards against: Flower's DP wrapper around FedAdam noises FedAdam's *output*, so
    # FedAdam's moments hold the noiseless round-1 average (advantage 1.00 against 0.55 allowed). In round 2 the target is absent, yet the model still steps along the
    # target's update (Adam's m/sqrt(v) ~ its sign), far beyond what round 1's noise (z*C/m) covers.
    # Done right, round 2 is post-processing of round 1's noisy average: no test beats the release's GDP.
    np.random.seed(0)
    z, clip, trials = 4.0, 0.1, 100
    cfg = RunConfig(num_clients=4, strategy="fedadam", server_learning_rate=1.0, central_dp="server-fixed",
                    central_noise_multiplier=z, central_clipping_norm=clip).validate()

    def round_two_step(models: list[np.ndarray], u: np.ndarray) -> float:  # the target is absent in round 2
        return float(np.dot(models[2] - models[1], u))

    advantage = _attacker_advantage(lambda: build_strategy(cfg), round_two_step, 2, clip, 1000, trials)
    # Round 1's release: sensitivity 2C of the sum of m updates, noise z*C on it: mu = 2/z.
    assert advantage <= _advantage_allowed(2 / z, trials), f"the attacker tells the neighbours apart: {advantage:.2f}"


def _momentum_noised_after_the_step(rounds: int, beta: float) -> np.ndarray:
    """The attacker's model of a server that noises FedAvgM's output (Flower's wrapper around FedAvgM):
    FedAvgM keeps its own noiseless model y, steps with momentum on y - mean, and the release is y + N.
    Returns the matrix taking (the target's round-1 update, the noises N_1..N_T) to the releases x_1..x_T."""
    unit = np.eye(rounds + 1)
    y, momentum, released, rows = np.zeros(rounds + 1), np.zeros(rounds + 1), np.zeros(rounds + 1), []
    for t in range(1, rounds + 1):
        pseudo_gradient = -unit[0] if t == 1 else y - released  # everyone else sends the release back
        momentum = beta * momentum + pseudo_gradient
        y = y - momentum
        released = y + unit[t]
        rows.append(released)
    return np.array(rows)


def test_server_momentum_leaks_nothing_the_central_noise_does_not_cover(quiet_flower):
    # The leak this guards against: Flower's DP wrapper around FedAvgM noises FedAvgM's output (this attacker
    # measured mu = 2.65 there, against 1.33 accounted), so FedAvgM's momentum and its own model are noiseless and keep re-applying the target's round-1 update in later rounds, each time
    # with fresh noise. The attacker whitens the releases with that model (its likelihood-ratio test).
    # Both servers are linear in the noise, so the attacker's statistic is Gaussian: the neighbours are
    # told apart like mu-GDP with mu = (mean shift) / std. The shift is measured exactly by running both
    # neighbours on the same noise draws (same seed: the noise cancels), the std over 100 seeds.
    from flwr.serverapp.strategy import FedAvgM

    z, clip, beta, rounds = 1.5, 1.0, 0.9, 8
    cfg = RunConfig(num_clients=4, central_dp="server-fixed", central_noise_multiplier=z,
                    central_clipping_norm=clip).validate()
    design = _momentum_noised_after_the_step(rounds, beta)
    signal, noise = design[:, 0], design[:, 1:]
    weights = np.linalg.solve(noise @ noise.T, signal)

    def statistic(sign: int, seed: int) -> float:
        np.random.seed(seed)
        strategy = wrap_central_dp(FedAvgM(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4,
                                           weighted_by_key=wire.UNIT_WEIGHT, arrayrecord_key=wire.ARRAYS,
                                           configrecord_key=wire.CONFIG, server_momentum=beta), cfg)
        return float(weights @ np.array([x[0] for x in _neighbour_run(strategy, sign, rounds, clip, 1)[1:]]))

    shift = statistic(+1, 0) - statistic(-1, 0)
    spread = float(np.std([statistic(+1, seed) for seed in range(1, 101)], ddof=1))
    allowed = 2 / z  # round 1's release: sensitivity 2C of the sum, noise z*C on it
    assert shift / spread <= 1.3 * allowed, f"the attacker's test is {shift / spread:.2f}-GDP, not {allowed:.2f}"


@pytest.mark.parametrize("robust", ["FedMedian", "FedTrimmedAvg", "Krum", "QFedAvg"])
def test_central_dp_refuses_aggregators_whose_sensitivity_is_not_that_of_the_mean(robust):
    # The noise z*C/m is calibrated to the mean of m clipped updates; a median, a trimmed mean or Krum's
    # pick moves by up to C (not C/m) when one client is replaced, so the noise would cover nothing.
    import flwr.serverapp.strategy as flower_strategies

    cfg = RunConfig(num_clients=10, central_dp="server-fixed").validate()
    extra = {"client_learning_rate": 0.1} if robust == "QFedAvg" else {}
    with pytest.raises(UserInputError, match="--central-dp"):
        wrap_central_dp(getattr(flower_strategies, robust)(weighted_by_key=wire.UNIT_WEIGHT, **extra), cfg)


# ------------------------------------------------------------------------------ noise and cohorts
def _seeded_round(cfg: RunConfig, d: int = 20_000) -> tuple[np.ndarray, float]:
    """Every pseudo-random generator seeded alike, one round of 4 clients; the model and the next norm."""
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    strategy = build_strategy(cfg)
    current = np.zeros(d)
    new = [current + 0.01 * (i + 1) for i in range(4)]
    metrics = {KEY_NORM_BIT: 1} if cfg.central_dp == "client-adaptive" else None  # every update was clipped
    return _round(strategy, 1, current, new, _Grid(range(1, 5)), metrics), float(strategy.clipping_norm)


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"])
def test_secure_mode_draws_central_noise_from_the_os_csprng(mode, monkeypatch):
    import os

    cfg = RunConfig(num_clients=4, central_dp=mode, central_noise_multiplier=1.0, central_clipping_norm=0.5,
                    secure_mode=False).validate()
    plain = [_seeded_round(cfg) for _ in range(2)]
    assert np.array_equal(plain[0][0], plain[1][0])  # NumPy's generator: reproducible, hence predictable
    cfg = dataclasses.replace(cfg, secure_mode=True)
    secure = [_seeded_round(cfg) for _ in range(2)]
    assert not np.array_equal(secure[0][0], secure[1][0]), "seeding NumPy/random/torch fixed the central noise"
    if mode.endswith("adaptive"):
        assert secure[0][1] != secure[1][1], "seeding fixed the noisy clipped count"
    # The noise still has the std the accounting assumes, z*C/m (the clipped mean is the same in every
    # coordinate, so the spread across coordinates is the noise's) ...
    if mode.endswith("fixed"):
        assert np.std(secure[0][0]) == pytest.approx(1.0 * 0.5 / 4, rel=0.02)
    # ... and it is the OS' CSPRNG: make os.urandom deterministic and the release becomes reproducible.
    counter = iter(range(10**9))
    monkeypatch.setattr(os, "urandom", lambda n: np.random.default_rng(next(counter)).bytes(n))
    first = _seeded_round(cfg)
    counter = iter(range(10**9))
    assert np.array_equal(first[0], _seeded_round(cfg)[0])


@pytest.mark.parametrize("strategy, central", [("fedavg", "off"), ("fedprox", "off"), ("fedadam", "off"),
                                               ("fedavg", "server-fixed"), ("fedadam", "client-adaptive")])
def test_cohorts_are_sampled_with_a_csprng(strategy, central):
    # Amplification by sampling needs a cohort nobody can predict; Flower samples with Python's `random`
    # (a Mersenne Twister: seeded, or recovered from 624 outputs, it repeats the cohort).
    import random

    cfg = RunConfig(num_clients=50, fraction_train=0.4, strategy=strategy, central_dp=central).validate()
    grid = _Grid(range(1, 51))
    cohorts = []
    for _ in range(3):
        random.seed(0)
        np.random.seed(0)
        messages = build_strategy(cfg).configure_train(1, _model(np.zeros(3)), ConfigRecord({}), grid)
        cohorts.append(frozenset(m.metadata.dst_node_id for m in messages))
    assert [len(c) for c in cohorts] == [20, 20, 20]
    assert len(set(cohorts)) == 3, "a seeded Python `random` chose the cohort"


def test_csprng_cohorts_are_uniform():
    cfg = RunConfig(num_clients=50, fraction_train=0.4, central_dp="server-fixed").validate()
    strategy, grid, counts = build_strategy(cfg), _Grid(range(1, 51)), Counter()
    for server_round in range(1, 501):
        counts.update(m.metadata.dst_node_id for m in
                      strategy.configure_train(server_round, _model(np.zeros(3)), ConfigRecord({}), grid))
    # Each node is in a cohort with probability 20/50: 200 of 500 rounds, binomial std ~11.
    assert set(counts) == set(range(1, 51))
    assert all(150 <= c <= 250 for c in counts.values()), counts


def test_amplification_is_claimed_only_where_the_cohort_is_secret():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    cfg = RunConfig(num_clients=50, fraction_train=0.4, central_dp="server-fixed").validate()
    assert amplification_holds(build_strategy(cfg), cfg)
    cfg = dataclasses.replace(cfg, strategy="fedadam")
    assert amplification_holds(build_strategy(cfg), cfg)
    # Flower's own sampling (Python's `random`) is predictable: no amplification.
    assert not amplification_holds(DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 20), cfg)
    # Under secure aggregation the server, the party the guarantee is against, picks the cohort itself.
    cfg = dataclasses.replace(cfg, secure_aggregation=True)
    assert not amplification_holds(build_strategy(cfg), cfg)


# ------------------------------------------------------------------------------------ the report
def _independent_epsilon(event: dp_accounting.DpEvent, rounds: int, delta: float) -> float:
    accountant = dp_rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def _readme_example(secret: bool) -> RunReport:
    """The README's run: 10 rounds, z = 1 (release multiplier z/2 = 0.5), 20 of 50 clients per round.
    Rounds 1-9 are as report.json holds them (each amplified recomputation takes dp-accounting ~1 s)."""
    report = RunReport(run={"central_dp": "server-fixed"}, delta=DELTA, accountant="rdp", dp=False)
    report.central["releases"] = [{"round": r, "noise_multiplier": 0.5, "sampled": 20, "population": 50,
                                   "secret_cohort": secret} for r in range(1, 10)]
    report.record_central_release(10, 0.5, sampled=20, population=50, secret_cohort=secret)
    report.add_round(10, {}, {"trained": []})
    return report


def test_report_states_user_epsilon_without_amplification_and_amplified_only_for_a_secret_cohort():
    gaussian = dp_accounting.GaussianDpEvent(0.5)
    plain = _independent_epsilon(gaussian, 10, DELTA)
    amplified = _independent_epsilon(dp_accounting.SampledWithoutReplacementDpEvent(50, 20, gaussian), 10, DELTA)
    assert (round(plain, 1), round(amplified, 1)) == (48.8, 39.3)  # the README's example

    secret = _readme_example(secret=True)
    assert secret.central["epsilon"] == pytest.approx(plain, rel=1e-9)  # report.json lists the cohorts
    assert secret.central["epsilon_amplified"] == pytest.approx(amplified, rel=1e-9)
    assert secret.rounds[-1]["user_epsilon"] == pytest.approx(plain, rel=1e-9)
    sentence = secret.guarantees()["user_level_dp"]
    assert f"{plain:.3f}" in sentence and f"{amplified:.3f}" in sentence
    assert "without amplification" in sentence and "only the global models" in sentence

    visible = _readme_example(secret=False)
    assert visible.central["epsilon"] == pytest.approx(plain, rel=1e-9)
    assert "epsilon_amplified" not in visible.central
    sentence = visible.guarantees()["user_level_dp"]
    assert f"{plain:.3f}" in sentence and f"{amplified:.3f}" not in sentence
    # Resuming from report.json keeps both numbers.
    again = RunReport.from_dict(json.loads(json.dumps(secret.to_dict())))
    again.record_central_release(11, 0.5, sampled=20, population=50, secret_cohort=True)
    assert again.central["epsilon"] == pytest.approx(_independent_epsilon(gaussian, 11, DELTA), rel=1e-9)
