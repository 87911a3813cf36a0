"""User-level central DP: Flower's DP strategies, the noise they add, and user-level accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from client.privacy_mods import privacy_mods
from common import records
from common.config import RunConfig
from common.errors import UserInputError
from common.privacy import epsilon_for
from server.central_dp import (
    ServerSideAdaptiveClipping,
    release_noise_multiplier,
    user_level_epsilon,
    wrap_central_dp,
)
from server.strategy_factory import build_strategy

DELTA = 1e-5


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are built inside a Flower app process, which knows its run and node; stand in for it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _releases(noise: float, sampled: int, population: int, rounds: int) -> list[dict]:
    return [{"noise_multiplier": noise, "sampled": sampled, "population": population}] * rounds


def test_without_sampling_user_epsilon_is_the_gaussian_composition_of_an_independent_accountant():
    # All clients every round: no amplification, so the RDP of `rounds` Gaussian releases, which
    # Opacus' analysis (a different implementation from dp-accounting's) computes as rate-1 steps.
    for noise, rounds in [(0.6, 5), (1.0, 20), (2.5, 100)]:
        ours = user_level_epsilon(_releases(noise, 10, 10, rounds), DELTA)
        assert ours == pytest.approx(epsilon_for([(noise, 1.0, rounds)], DELTA, "rdp"), rel=1e-3)


def test_sampling_fewer_clients_from_more_amplifies_privacy():
    eps = [user_level_epsilon(_releases(1.0, 10, n, 50), DELTA) for n in (10, 50, 200, 1000)]
    assert eps == sorted(eps, reverse=True)
    assert eps[-1] < eps[0] / 5


def test_release_noise_is_relative_to_the_replace_one_sensitivity():
    cfg = RunConfig(num_clients=10, central_dp="server-fixed", central_noise_multiplier=1.2).validate()
    fixed = wrap_central_dp(build_strategy(cfg).strategy, cfg)
    assert release_noise_multiplier(fixed, 10) == pytest.approx(0.6)
    assert release_noise_multiplier(fixed, 5) == pytest.approx(0.3)  # dropouts: fewer updates, same noise
    cfg.central_dp = "client-adaptive"
    adaptive = wrap_central_dp(build_strategy(cfg).strategy, cfg)
    # Flower splits z between the update and the clipped-count releases; together they give z/2 back.
    assert adaptive.noise_multiplier > 1.2
    assert release_noise_multiplier(adaptive, 10) == pytest.approx(0.6)


def _update_reply(arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({records.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          records.METRICS: MetricRecord({records.UNIT_WEIGHT: 1, records.NUM_EXAMPLES: 7})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_adaptive_noise_is_scaled_to_the_norm_that_clipped_the_updates():
    np.random.seed(0)  # Flower draws the noisy clipped count from NumPy's global generator
    cfg = RunConfig(num_clients=5, central_dp="server-adaptive", central_noise_multiplier=1.0,
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
    msg = Message(RecordDict({records.ARRAYS: ArrayRecord({k: Array(v) for k, v in sent.items()}),
                              records.CONFIG: config}), dst_node_id=1, message_type=MessageType.TRAIN)

    def train(m: Message, _ctx: Context) -> Message:
        return Message(RecordDict({records.ARRAYS: ArrayRecord({"w": Array(np.full(100, 3.0, dtype=np.float32))}),
                                   records.METRICS: MetricRecord({records.UNIT_WEIGHT: 1})}), reply_to=m)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = privacy_mods(msg, ctx, train)
    assert np.linalg.norm(reply.content[records.ARRAYS]["w"].numpy()) == pytest.approx(0.25, rel=1e-5)
    # Without the server's clipping key the mod leaves the update alone.
    plain = Message(RecordDict({records.ARRAYS: ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                records.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)
    assert np.linalg.norm(privacy_mods(plain, ctx, train).content[records.ARRAYS]["w"].numpy()) > 29


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
