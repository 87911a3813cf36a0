"""The documented Python API (issue 13): the README's example runs as printed, and the API's contract holds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedpriv
from fedpriv.common.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("### Python API", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section should hold exactly one example"
    return blocks[0]


@pytest.mark.e2e
def test_the_readme_example_runs_as_printed(tmp_path):
    (tmp_path / "example.py").write_text(readme_example())
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy, epsilon, planned = map(float, re.search(
        r"accuracy ([\d.]+), epsilon ([\d.]+) \(planned ([\d.]+)\)", out.stdout).groups())
    assert 0.0 <= accuracy <= 1.0 and epsilon <= planned + 1e-9 and epsilon <= 4.0
    assert "refused: --num-clients must be a positive integer" in out.stdout
    assert (tmp_path / "runs" / "api-example" / "report.json").is_file()


def test_every_exported_name_is_documented():
    for name in fedpriv.__all__:
        value = getattr(fedpriv, name)
        assert value.__doc__ and value.__doc__.strip(), name
    for name in ("simulate", "plan_budget", "load_report"):
        doc = getattr(fedpriv, name).__doc__
        assert "Raises" in doc or "Raises:" in doc, name


def test_importing_the_config_does_not_load_the_heavy_layers():
    code = "import fedpriv.common.config, sys; print(sorted(m for m in ('torch', 'flwr', 'opacus') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_plan_budget_needs_exactly_one_target():
    with pytest.raises(fedpriv.ConfigError, match="exactly one of target_epsilon"):
        fedpriv.plan_budget(1000)
    with pytest.raises(fedpriv.ConfigError, match="exactly one of target_epsilon"):
        fedpriv.plan_budget(1000, target_epsilon=3.0, noise_multiplier=1.0)
    plan = fedpriv.plan_budget(1000, noise_multiplier=1.5, rounds=3)
    # the main job's 1 epoch of ceil(1000 / 144) = 7 Poisson batches (rate 1/7), three rounds
    assert (plan.rounds, plan.steps_per_round, plan.total_steps, plan.sample_rate) == (3, 7, 21, 1 / 7)
    assert 0 < plan.epsilon < fedpriv.plan_budget(1000, noise_multiplier=1.5, rounds=4).epsilon


def test_simulate_refuses_bad_config_without_touching_the_argument():
    cfg = RunConfig(num_clients=0)
    with pytest.raises(fedpriv.ConfigError, match="--num-clients"):
        fedpriv.simulate(cfg)
    assert cfg == RunConfig(num_clients=0)
    with pytest.raises(fedpriv.ConfigError, match="unknown config key"):
        fedpriv.simulate({"num-clientz": 3})
    with pytest.raises(TypeError):
        fedpriv.simulate("digits")


def test_load_report_of_a_folder_without_one(tmp_path):
    with pytest.raises(fedpriv.FedprivError, match="holds no report.json"):
        fedpriv.load_report(tmp_path)
