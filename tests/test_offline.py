"""No network at run time but loopback: Flower's telemetry is off whenever fedpriv's code is imported first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("entry", ["fedpriv.simulations.cli", "fedpriv.client.app", "fedpriv.server.app"])
def test_flower_telemetry_is_off(entry):
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")}
    code = (f"import {entry}, flwr.supercore.telemetry as t, os; "
            "print(t.FLWR_TELEMETRY_ENABLED, os.environ['FLWR_DISABLE_UPDATE_CHECK'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "1"]
