"""The wire protocol (common/wire.py): one place for every key, one encoder and decoder of the privacy
record, and one config-to-flags serializer whose output the CLI parses back to the same config."""

from __future__ import annotations

import ast
import math
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedpriv.common import wire
from fedpriv.common.config import RunConfig, to_flags

ROOT = Path(__file__).resolve().parents[1]
RECORD_TYPES = {"MetricRecord", "ConfigRecord", "RecordDict"}


def _called(node: ast.Call) -> str:
    return node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")


def _wire_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, key) of every string literal in ``tree`` that spells a key wire.py defines, where it is used as
    a message key: a key of a record built in place, a subscript, ``.get`` or ``in`` test of a message's
    records, or (for the kebab-case keys, which nothing but the wire uses) any subscript, ``.get``, ``in``
    test or dict key."""
    found: list[tuple[int, str]] = []

    def check(key: ast.AST, holder: ast.AST | None, anywhere: bool = False) -> None:
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value in wire.ALL_KEYS):
            return
        text = ast.unparse(holder) if holder is not None else ""
        if anywhere or "-" in key.value or "content" in text or "_records" in text:
            found.append((key.lineno, key.value))

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            check(node.slice, node.value)
        elif isinstance(node, ast.Call):
            if _called(node) in RECORD_TYPES and node.args and isinstance(node.args[0], ast.Dict):
                for key in node.args[0].keys:
                    if key is not None:
                        check(key, None, anywhere=True)
            elif _called(node) in ("get", "pop") and node.args and isinstance(node.func, ast.Attribute):
                check(node.args[0], node.func.value)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            for holder in node.comparators:
                check(node.left, holder)
        elif isinstance(node, ast.Dict):
            for key in node.keys:
                if key is not None and isinstance(key, ast.Constant) and "-" in str(key.value):
                    check(key, None)
    return found


def test_client_and_server_spell_no_wire_key_themselves():
    """Every record name and key both sides exchange comes from common/wire.py, never a literal."""
    offenders = []
    for package in ("client", "server"):
        for path in sorted((ROOT / package).glob("*.py")):
            for line, key in _wire_literals(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{package}/{path.name}:{line}: {key!r} (use fedpriv.common.wire)")
    assert not offenders, "\n".join(offenders)


def test_the_scan_catches_literals():
    source = ('m = MetricRecord({"epsilon": 1.0})\nx = msg.content["privacy"]["client-id"]\n'
              'y = content.metric_records.get("metrics")\nz = "ledger-steps" in p\nq = report["epsilon"]\n')
    assert sorted(k for _, k in _wire_literals(ast.parse(source))) == ["client-id", "epsilon", "ledger-steps",
                                                                      "metrics", "privacy"]


def test_no_two_wire_names_share_a_string():
    names = [v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str)]
    assert len(names) == len(set(names))
    kebab = {f.name.replace("_", "-") for f in fields(RunConfig)}
    # The extras never collide with the run's own keys, but for the two that are RunConfig's own
    # (the server sends run-dir resolved, over the config's).
    assert set(wire.CONFIG_KEYS) & kebab == {wire.CENTRAL_DP, wire.RUN_DIR}


def test_the_wire_spells_the_keys_it_always_did():
    """Moving the names changed none of them: servers and clients of before still understand each other."""
    assert (wire.ARRAYS, wire.CONFIG, wire.METRICS, wire.PRIVACY) == ("arrays", "config", "metrics", "privacy")
    assert (wire.NUM_EXAMPLES, wire.DECLINED, wire.EPSILON, wire.TRAIN_LOSS, wire.STEPS, wire.SAMPLE_RATE,
            wire.NOISE_MULTIPLIER, wire.OPTIMIZER_STEPS, wire.UNIT_WEIGHT, wire.SECAGG_CLIPPED) == (
        "num-examples", "declined", "epsilon", "train-loss", "steps", "sample-rate", "noise-multiplier",
        "optimizer-steps", "unit-weight", "secagg-clipped")
    assert (wire.CLIENT_ID, wire.DECLINE_REASON, wire.SERVER_ROUND, wire.RUN_UID, wire.RUN_DIR) == (
        "client-id", "decline-reason", "server-round", "run-uid", "run-dir")
    assert wire.LEDGER_COLUMNS == ("ledger-run", "ledger-round", "ledger-noise", "ledger-rate", "ledger-steps")


LEDGER = [("run-a", 1, 1.5, 0.1, 20), ("run-b", 3, 2.0, 0.05, 40)]


def test_privacy_record_round_trips_through_a_config_record():
    from flwr.app import ConfigRecord

    record = ConfigRecord(wire.encode_privacy(client_id="owner-1", accountant="rdp", delta=1e-5, fingerprint="ab12",
                                              sampling="poisson", ledger=LEDGER))
    decoded = wire.decode_privacy(record)
    assert (decoded.client_id, decoded.accountant, decoded.delta, decoded.fingerprint, decoded.sampling,
            decoded.decline_reason) == ("owner-1", "rdp", 1e-5, "ab12", "poisson", None)
    assert decoded.ledger == [{"run": r, "round": n, "noise_multiplier": z, "sample_rate": q, "steps": t}
                              for r, n, z, q, t in LEDGER]

    declined = wire.decode_privacy(ConfigRecord(wire.encode_privacy(client_id="owner-2", accountant="prv", delta=1e-6,
                                                                    decline_reason="over budget")))
    assert (declined.client_id, declined.decline_reason, declined.ledger, declined.fingerprint) == (
        "owner-2", "over budget", None, None)
    assert wire.LEDGER_STEPS not in wire.encode_privacy(client_id="c", accountant="rdp", delta=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ({wire.CLIENT_ID: None}, "lacks 'client-id'"),
    ({wire.LEDGER_RATE: None}, "ledger lacks 'ledger-rate'"),
    ({wire.LEDGER_NOISE: "1.5"}, "'ledger-noise' is str, not a list"),
    ({wire.LEDGER_ROUND: [1]}, "ledger columns differ in length"),
    ({wire.LEDGER_STEPS: [20, math.nan]}, "not finite"),
    ({wire.LEDGER_RATE: [0.1, True]}, "'ledger-rate' holds True, not a number"),
    ({wire.DELTA: "tiny"}, "'delta' is 'tiny', not a number"),
])
def test_a_malformed_privacy_record_is_rejected_with_the_key(change, message):
    items = wire.encode_privacy(client_id="owner", accountant="rdp", delta=1e-5, ledger=LEDGER)
    for key, value in change.items():
        if value is None:
            del items[key]
        else:
            items[key] = value
    with pytest.raises(wire.WireError, match=message.replace("(", r"\(")) as raised:
        wire.decode_privacy(items)
    assert isinstance(raised.value, ValueError)  # the server's reply check catches ValueError


# ----------------------------------------------------------------- the one config-to-flags serializer
def _parse_simulate_flags(flags: list[str]) -> RunConfig:
    """``flags`` through the very option parsing ``fedpriv simulate`` uses (simulations/cli.py)."""
    from fedpriv.simulations.cli import config_options

    parsed: list[RunConfig] = []
    app = typer.Typer()

    @app.command()
    @config_options
    def capture(cfg: RunConfig) -> None:
        parsed.append(cfg)

    result = CliRunner().invoke(app, flags)
    assert result.exit_code == 0, result.output
    return parsed[0]


@pytest.mark.parametrize("cfg", [
    RunConfig(),
    RunConfig(model="rnn", dataset="mnist1d", dp=False, poisson_sampling=False, secure_mode=True, delta=1e-7,
              noise_multiplier=0.123456789, budget_epsilon=math.inf, central_dp="server-fixed",
              run_dir="runs/x y", secure_aggregation=True, client_cpus=0.5),
])
def test_to_flags_parses_back_through_the_cli_to_the_same_config(cfg):
    assert _parse_simulate_flags(cfg.to_flags()) == cfg


def test_to_flags_only_and_skip():
    cfg = RunConfig(dp=False, delta=1e-6, num_rounds=3)
    assert cfg.to_flags(only=["dp", "delta"]) == ["--no-dp", "--delta", "1e-06"]
    assert cfg.to_flags(only=["num-rounds", "dp"]) == ["--num-rounds", "3", "--no-dp"]  # in field order
    assert "--run-dir" not in cfg.to_flags(skip=["run_dir"]) and "--dp" not in cfg.to_flags()
    assert _parse_simulate_flags(cfg.to_flags(only=["dp", "delta", "num_rounds"])) == cfg
    with pytest.raises(Exception, match="unknown config key"):
        cfg.to_flags(only=["no-such-option"])


def test_switches_are_written_only_when_on():
    assert to_flags({"allow_no_dp": False, "poisson_sampling": False}, switches=["allow_no_dp"]) == [
        "--no-poisson-sampling"]
    assert to_flags({"allow_no_dp": True, "budget_epsilon": math.inf}, switches=["allow-no-dp"]) == [
        "--allow-no-dp", "--budget-epsilon", "inf"]


@pytest.mark.parametrize("cfg", [RunConfig(), RunConfig(dp=False, poisson_sampling=False, secure_mode=True,
                                                        budget_epsilon=3.0, delta=1e-6, accountant="prv")])
def test_owner_policy_flags_parse_back_through_fedpriv_client(cfg):
    """A local federation's client flags reach ``fedpriv client`` as the run's own owner policy."""
    from fedpriv.client.owner_policy import OwnerPolicy
    from fedpriv.simulations.cli import app
    from fedpriv.simulations.federation import owner_policy_flags

    command = typer.main.get_command(app).commands["client"]
    ctx = command.make_context("client", ["--server", "127.0.0.1:1", "--data", "partition:0/2", "--state-dir", "s",
                                          *owner_policy_flags(cfg)])
    policy = OwnerPolicy.of_simulation(cfg)
    assert (ctx.params["budget_epsilon"], ctx.params["min_noise_multiplier"], ctx.params["delta"],
            ctx.params["accountant"], ctx.params["poisson_sampling"], ctx.params["allow_no_dp"],
            ctx.params["secure_mode"]) == (policy.budget_epsilon, policy.min_noise_multiplier, policy.delta,
                                           policy.accountant, policy.poisson_sampling, not policy.require_dp,
                                           policy.secure_mode)
