"""The errors a library user can catch (issue 13): one hierarchy under ``ValueError``, each kind
raised where it belongs, and every one of them one line and exit code 2 on the command line."""

from __future__ import annotations

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from fedpriv.client.ledger import LedgerError, StateDirBusy, client_lock, load_ledger
from fedpriv.client.owner_policy import OwnerPolicy
from fedpriv.common.config import RunConfig, check_port
from fedpriv.common.datasets import MAX_CLASSES, npz_records
from fedpriv.common.errors import ConfigError, DataError, FedprivError, PrivacyPolicyError, UserInputError
from fedpriv.common.partitioning import partition
from fedpriv.simulations.command import EXIT_USER_ERROR, guarded

KINDS = (ConfigError, DataError, PrivacyPolicyError, LedgerError, StateDirBusy)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_a_value_error_and_a_fedpriv_error(kind):
    assert issubclass(kind, FedprivError) and issubclass(kind, ValueError)
    with pytest.raises(ValueError):
        raise kind("x")
    with pytest.raises(UserInputError):  # the old name still catches every kind
        raise kind("x")


def test_user_input_error_is_the_base():
    assert UserInputError is FedprivError
    assert issubclass(FedprivError, ValueError)
    assert issubclass(LedgerError, PrivacyPolicyError) and issubclass(StateDirBusy, PrivacyPolicyError)


@pytest.mark.parametrize("values, needle", [
    ({"noise_multiplier": -1.0}, "--noise-multiplier"),
    ({"delta": 1.5}, "--delta"),
    ({"model": "transformer"}, "--model"),
])
def test_bad_config_is_a_config_error(values, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**values).validate()


def test_bad_config_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown config key 'no-such-key'"):
        RunConfig.from_mapping({"no-such-key": 1})
    with pytest.raises(ConfigError, match="num-rounds"):
        RunConfig.from_mapping({"num-rounds": "many"})


@pytest.mark.parametrize("port", [0, -1, 65536, 99999, True, 8080.0])
def test_bad_port_is_a_config_error(port):
    with pytest.raises(ConfigError, match=r"--port must be a port number in 1\.\.65535"):
        check_port("port", port)


def test_port_zero_where_it_means_something():
    check_port("local-port", 0, zero_means="any free one")
    check_port("port", 65535)
    with pytest.raises(ConfigError, match="or 0 for any free one"):
        check_port("local-port", 70000, zero_means="any free one")


def _npz(tmp_path, name, y, n=None):
    n = len(y) if n is None else n
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32), y=y)
    return path


def test_bad_data_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        npz_records(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="'y' labels must be >= 0"):
        npz_records(_npz(tmp_path, "negative", np.array([0, 1, -1, 2])))
    with pytest.raises(DataError, match="--num-clients 50"):
        partition(np.zeros(20, dtype=np.int64), 20, 50, "iid")


@pytest.mark.parametrize("y", [
    np.array([0, 1, 2, 1_000_000_000] * 5),                 # an id, not a class index
    np.array([0.0, 1.0, 1e30, 2.0] * 5),                    # float labels beyond int64
    np.array([0, 1, 2**64 - 1, 3] * 5, dtype=np.uint64),    # beyond int64: would wrap negative
    np.array([0, MAX_CLASSES] * 10),
])
def test_labels_beyond_max_classes_are_refused_before_any_allocation(tmp_path, y):
    path = _npz(tmp_path, "huge", y)
    with pytest.raises(DataError) as info:
        npz_records(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and f"at most {MAX_CLASSES} classes" in message
    assert "numpy.unique(y, return_inverse=True)" in message


def test_too_many_distinct_labels_says_so(tmp_path):
    with pytest.raises(DataError, match=f"{MAX_CLASSES + 5} distinct labels"):
        npz_records(_npz(tmp_path, "wide", np.arange(MAX_CLASSES + 5)))


def test_labels_up_to_max_classes_and_missing_classes_are_fine(tmp_path):
    # an owner's file may lack classes: labels {0, 3, 999} are a 1000-class model, not an error
    _, y, classes = npz_records(_npz(tmp_path, "sparse", np.array([0, 3, MAX_CLASSES - 1] * 4)))
    assert classes == MAX_CLASSES and y.dtype == np.int64


def test_non_finite_float_labels_are_one_clean_error(tmp_path, recwarn):
    with pytest.raises(DataError, match="integer class labels"):
        npz_records(_npz(tmp_path, "inf", np.array([0.0, 1.0, np.inf, np.nan])))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_bad_policy_is_a_privacy_policy_error(tmp_path):
    with pytest.raises(PrivacyPolicyError, match="--delta"):
        OwnerPolicy(delta=2.0).validate()
    with pytest.raises(PrivacyPolicyError, match="--accountant"):
        OwnerPolicy(accountant="gdp").validate()
    with pytest.raises(PrivacyPolicyError, match="policy-min-noise-multiplier"):
        OwnerPolicy.from_node_config({"policy-min-noise-multiplier": "lots"})


def test_bad_ledger_is_a_privacy_policy_error(tmp_path):
    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(PrivacyPolicyError, match="corrupted") as info:
        load_ledger(tmp_path)
    assert isinstance(info.value, LedgerError)
    with client_lock(tmp_path / "busy"):
        with pytest.raises(PrivacyPolicyError, match="another running 'fedpriv client'"):
            with client_lock(tmp_path / "busy"):
                pass


@pytest.mark.parametrize("kind", (FedprivError,) + KINDS)
def test_cli_maps_every_kind_to_one_line_and_exit_2(kind):
    app = typer.Typer()

    @app.command()
    @guarded
    def boom() -> None:
        raise kind(f"--some-option is wrong ({kind.__name__}); pass another value")

    result = CliRunner().invoke(app, [])
    assert result.exit_code == EXIT_USER_ERROR == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --some-option is wrong ({kind.__name__}); pass another value"]
    assert "Traceback" not in result.output


def test_audit_keeps_the_config_message_now_that_errors_are_value_errors(tmp_path):
    """``except ValueError`` would now catch a FedprivError too: the audit catches the specific one first."""
    import json

    from fedpriv.simulations.audit import load_run

    (tmp_path / "config.json").write_text(json.dumps({"delta": 1.5}))
    with pytest.raises(ConfigError) as info:
        load_run(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: --delta must be in (0, 1)")
