"""common.config.RunConfig: mapping from run-config keys, coercion, and one clear error per bad option."""

from __future__ import annotations

import dataclasses

import pytest

from fedpriv.common.config import RunConfig
from fedpriv.common.errors import UserInputError


def test_defaults_validate():
    cfg = RunConfig()
    assert cfg.validate() is cfg
    assert cfg.dp and cfg.noise_multiplier > 0 and 0 < cfg.delta < 1


def test_from_mapping_accepts_kebab_and_snake_case_and_coerces_strings():
    cfg = RunConfig.from_mapping({
        "num-clients": "3", "min_clients": "2", "dp": "true", "secure-mode": "false",
        "delta": "1e-5", "noise-multiplier": "0.75", "model": "rnn", "local-epochs": 4.0,
    }).validate()
    assert cfg.num_clients == 3 and isinstance(cfg.num_clients, int)
    assert cfg.min_clients == 2 and isinstance(cfg.min_clients, int)
    assert cfg.dp is True and cfg.secure_mode is False
    assert cfg.delta == pytest.approx(1e-5) and isinstance(cfg.delta, float)
    assert cfg.noise_multiplier == pytest.approx(0.75)
    assert cfg.model == "rnn"
    assert cfg.local_epochs == 4 and isinstance(cfg.local_epochs, int)


@pytest.mark.parametrize("text, expected", [("true", True), ("False", False), ("1", True), ("0", False),
                                            ("yes", True), ("off", False)])
def test_bool_strings(text, expected):
    assert RunConfig.from_mapping({"dp": text}).dp is expected


def test_round_trip_through_kebab_dict():
    cfg = RunConfig(model="autoencoder", num_clients=4, min_clients=3, delta=1e-6, dp=False)
    again = RunConfig.from_mapping(cfg.to_dict(kebab=True))
    assert again == cfg
    assert "noise-multiplier" in cfg.to_dict(kebab=True)


def test_unknown_key_is_a_user_error():
    with pytest.raises(UserInputError, match="noise-multiplyer"):
        RunConfig.from_mapping({"noise-multiplyer": 1.0})
    # The ClientApp reads the server's message with ignore_unknown (it carries server-round etc.).
    assert RunConfig.from_mapping({"server-round": 3, "num-rounds": 5}, ignore_unknown=True).num_rounds == 5


@pytest.mark.parametrize("key, value", [("num-clients", "three"), ("dp", "maybe"), ("delta", "tiny"),
                                        ("local-epochs", 2.5)])
def test_uncoercible_value_is_a_user_error(key, value):
    with pytest.raises(UserInputError, match=key):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize("changes, option", [
    ({"noise_multiplier": 0.0}, "--noise-multiplier"),
    ({"noise_multiplier": -1.0}, "--noise-multiplier"),
    ({"noise_multiplier": float("nan")}, "--noise-multiplier"),
    ({"noise_multiplier": float("inf")}, "--noise-multiplier"),
    ({"delta": 0.0}, "--delta"),
    ({"delta": 1.0}, "--delta"),
    ({"delta": 1.5}, "--delta"),
    ({"delta": -1e-5}, "--delta"),
    ({"model": "transformer"}, "--model"),
    ({"dataset": "cifar"}, "--dataset"),
    ({"partitioning": "random"}, "--partitioning"),
    ({"strategy": "fedsgd"}, "--strategy"),
    ({"accountant": "moments"}, "--accountant"),
    ({"grad_sample_mode": "magic"}, "--grad-sample-mode"),
    ({"min_clients": 11, "num_clients": 10}, "--min-clients"),
    ({"num_clients": 0}, "--num-clients"),
    ({"batch_size": 0}, "--batch-size"),
    ({"max_grad_norm": 0.0}, "--max-grad-norm"),
    ({"fraction_train": 0.0}, "--fraction-train"),
    ({"test_fraction": 1.0}, "--test-fraction"),
    ({"momentum": 1.0}, "--momentum"),
    ({"learning_rate": -0.1}, "--learning-rate"),
    ({"dirichlet_alpha": 0.0}, "--dirichlet-alpha"),
    ({"budget_epsilon": -1.0}, "--budget-epsilon"),
    ({"mnist1d_samples": 10}, "--mnist1d-samples"),
    ({"server_momentum": 1.0, "strategy": "fedavgm"}, "--server-momentum"),
    ({"server_ema": 1.0}, "--server-ema"),
    ({"server_ema": -0.1}, "--server-ema"),
    ({"server_learning_rate": -1.0}, "--server-learning-rate"),
    ({"cnn_norm": "batch"}, "--cnn-norm"),
    ({"cnn_arch": "resnet"}, "--cnn-arch"),
])
def test_each_bad_value_names_its_option(changes, option):
    cfg = dataclasses.replace(RunConfig(), **changes)
    with pytest.raises(UserInputError) as info:
        cfg.validate()
    assert option in str(info.value)


def test_bad_value_via_mapping_names_the_kebab_option():
    with pytest.raises(UserInputError, match="--noise-multiplier"):
        RunConfig.from_mapping({"noise-multiplier": "-1"}).validate()


def test_noise_zero_is_fine_without_dp_and_an_error_with_it():
    RunConfig(dp=False, noise_multiplier=0.0).validate()
    RunConfig(dp=False, noise_multiplier=0.0, delta=0.0, max_grad_norm=0.0).validate()  # unused without DP
    with pytest.raises(UserInputError, match="--noise-multiplier"):
        RunConfig(dp=True, noise_multiplier=0.0).validate()


def test_min_clients_equal_to_num_clients_is_fine():
    RunConfig(num_clients=4, min_clients=4).validate()
    RunConfig(dataset="npz:/some/file.npz").validate()  # existence is checked with the data, not here


def test_flower_app_config_in_pyproject_lists_every_option_with_its_default():
    """``flwr run .`` refuses run-config keys the app's pyproject does not declare, so they must stay in step."""
    import tomllib

    from tests.conftest import ROOT

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig().to_dict(kebab=True)
