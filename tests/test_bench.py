"""``fedpriv bench dp-overhead`` smoke tests: tiny sizes, the table is produced; no timing asserts."""

from __future__ import annotations

import math

from typer.testing import CliRunner

from fedpriv.simulations.bench.dp_overhead import CASES, NO_DP, measure_case, overhead_table
from fedpriv.simulations.cli import app


def test_dp_overhead_prints_the_table_with_auto_marked():
    result = CliRunner().invoke(app, ["bench", "dp-overhead", "--threads", "1", "--batch-size", "4", "--steps", "1",
                                      "--warmup", "0", "--seconds", "0", "--model", "cnn-digits", "--model", "autoencoder-digits",
                                      "--mode", "bookkeeping", "--mode", "hooks"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    for needle in ("ms/step", "samples/s", "ratio", "cnn-digits", "autoencoder-digits", NO_DP, "hooks",
                   "bookkeeping ← auto"):
        assert needle in out, (needle, out)


def test_measure_case_rows_ratios_and_failing_modes(monkeypatch):
    import fedpriv.simulations.bench.dp_overhead as bench

    real = bench._stepper

    def stepper(case, mode, batch):
        if mode == "functorch":  # stands in for a mode that cannot train a model
            raise NotImplementedError("no per-sample gradients for this layer")
        return real(case, mode, batch)

    monkeypatch.setattr(bench, "_stepper", stepper)
    case = next(c for c in CASES if c.key == "autoencoder-digits")
    rows = measure_case(case, ["bookkeeping", "ghost", "functorch"], batch=3, steps=2, warmup=0)
    by_mode = {row.mode: row for row in rows}
    assert list(by_mode) == [NO_DP, "bookkeeping", "ghost", "functorch"]
    assert by_mode[NO_DP].ratio == 1.0
    for mode in ("bookkeeping", "ghost"):  # ghost works on the per-element MSE through PerSampleCriterion
        assert math.isfinite(by_mode[mode].ratio) and by_mode[mode].ms_per_step > 0, by_mode[mode]
    assert [row.mode for row in rows if row.auto] == ["bookkeeping"]
    assert "NotImplementedError" in by_mode["functorch"].error and math.isnan(by_mode["functorch"].ratio)
    assert overhead_table(rows, batch=3, threads=1).row_count == 4


def test_dp_overhead_rejects_unknown_names_in_one_line():
    result = CliRunner().invoke(app, ["bench", "dp-overhead", "--model", "vgg"])
    assert result.exit_code == 2
    assert "--model 'vgg' is unknown" in result.output
    assert "Traceback" not in result.output
