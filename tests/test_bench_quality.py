"""``fedpriv bench quality``: recipe command lines, the target verdicts, and a --quick end-to-end run."""

from __future__ import annotations

import json
import math

import pytest

from fedpriv.common.config import RunConfig
from fedpriv.simulations.bench.quality import (RECIPES, Ablation, Recipe, Run, command_line, markdown_table, planned,
                                               run_options, verdict, write_results)


def _run(recipe: str, epsilon: float, value: float, max_epsilon: float, metric: str = "accuracy") -> Run:
    return Run(recipe, epsilon, "fedpriv simulate", "runs/x", 1.0, metric, value, max_epsilon, 1.0)


def test_every_recipe_is_a_valid_simulate_command_line():
    """Each run's options parse with the same RunConfig that `fedpriv simulate` builds, DP or not."""
    for recipe in RECIPES:
        if recipe.sweep:  # three epsilons or more for the plot (the others draw their per-round curve)
            assert len({recipe.epsilon, *recipe.sweep}) >= 3, recipe.key
        runs = [(e, None) for e in (recipe.epsilon, *recipe.sweep, math.inf)] + [(a.at(recipe), a) for a in recipe.ablations]
        for epsilon, ablation in runs:
            options = run_options(recipe, epsilon, quick=False, ablation=ablation)
            args = command_line(options)
            assert args[0] == "simulate"
            cfg = RunConfig.from_mapping(options).validate()
            assert cfg.dp == math.isfinite(epsilon)
            if recipe.derive_noise or ablation is not None and "target-epsilon" in ablation.options:
                assert cfg.target_epsilon == (epsilon if math.isfinite(epsilon) else 0.0)
            else:  # the main job: its defaults, as a newcomer runs them
                assert cfg.target_epsilon == 0.0 and (not cfg.dp or options == {})
            assert ("--no-dp" in args) == (not cfg.dp)


def test_the_main_job_recipe_is_simulate_with_no_options_and_its_defaults_spend_at_most_its_epsilon():
    """The table's first row must be what `fedpriv simulate` does; its defaults must keep the smallest
    digits client (143 records) within the row's epsilon (the accountant, not a hope)."""
    from fedpriv.common.accounting import plan_budget

    main = RECIPES[0]
    assert main.key == "main-job" and command_line(run_options(main, main.epsilon, quick=False)) == ["simulate"]
    assert plan_budget(dataset_size=143, noise_multiplier=RunConfig().noise_multiplier).epsilon <= main.epsilon


def test_quick_options_shrink_the_run_but_keep_the_recipe():
    recipe = next(r for r in RECIPES if r.options.get("dataset") == "mnist1d")
    quick = RunConfig.from_mapping(run_options(recipe, recipe.epsilon, quick=True))
    full = RunConfig.from_mapping(run_options(recipe, recipe.epsilon, quick=False))
    assert quick.num_rounds < full.num_rounds and quick.mnist1d_samples < full.mnist1d_samples
    assert (quick.model, quick.learning_rate, quick.batch_size) == (full.model, full.learning_rate, full.batch_size)


def test_epsilon_options_override_the_sweep_at_their_epsilon_only():
    recipe = Recipe("c", "C", {"learning-rate": 3.0}, "accuracy", 8.0, sweep=(2.0, 4.0),
                    sweep_options={"learning-rate": 2.0}, epsilon_options={2.0: {"learning-rate": 1.0}})
    lrs = {e: run_options(recipe, e, quick=False).get("learning-rate") for e in (8.0, 4.0, 2.0)}
    assert lrs == {8.0: 3.0, 4.0: 2.0, 2.0: 1.0}


def test_plan_runs_main_and_non_private_first_then_the_sweep():
    recipe = RECIPES[0]
    recipe = Recipe("c", "C", {}, "accuracy", 8.0, sweep=(2.0, 4.0),
                    ablations=(Ablation("x", {"momentum": 0.0}), Ablation("y", {"momentum": 0.5})))
    plan = [(e, a) for _, e, a in planned([recipe], sweep=True, quick=False)]
    assert plan[:2] == [(recipe.epsilon, None), (math.inf, None)]
    assert sorted(e for e, _ in plan[2:4]) == sorted(recipe.sweep)
    assert plan[4:] == [(8.0, recipe.ablations[0]), (8.0, recipe.ablations[1])]  # ablations at the recipe's epsilon
    assert [e for _, e, _ in planned([recipe], sweep=False, quick=False)] == [recipe.epsilon, math.inf]
    assert [(e, a) for _, e, a in planned([recipe], sweep=True, quick=True)] == [
        (recipe.epsilon, None), (math.inf, None), (min(recipe.sweep), None), (8.0, recipe.ablations[0])]
    assert [e for _, e, _ in planned([recipe], sweep=True, quick=False, parts=("no-dp",))] == [math.inf]


def test_an_ablation_at_a_sweep_epsilon_runs_with_that_epsilons_options():
    recipe = Recipe("c", "C", {"learning-rate": 3.0, "num-rounds": 16}, "accuracy", 8.0, sweep=(2.0, 4.0),
                    sweep_options={"num-rounds": 12}, epsilon_options={2.0: {"learning-rate": 1.5}},
                    ablations=(Ablation("x", {"momentum": 0.0}, epsilon=2.0), Ablation("y", {"momentum": 0.5})))
    plan = [(e, a.without) for _, e, a in planned([recipe], sweep=True, quick=False) if a is not None]
    assert plan == [(2.0, "x"), (8.0, "y")]
    options = run_options(recipe, 2.0, quick=False, ablation=recipe.ablations[0])
    assert (options["learning-rate"], options["num-rounds"], options["momentum"], options["target-epsilon"]) == (1.5, 12, 0.0, 2.0)


def test_an_ablation_at_an_epsilon_the_recipe_does_not_run_is_refused():
    with pytest.raises(ValueError, match="ablation 'x' at epsilon 3"):
        Recipe("c", "C", {}, "accuracy", 8.0, sweep=(2.0,), ablations=(Ablation("x", {}, epsilon=3.0),))


def test_the_main_recipe_and_the_autoencoder_have_separate_runs_at_three_epsilons():
    swept = {r.key for r in RECIPES if len({r.epsilon, *r.sweep}) >= 3}
    assert {"cnn-iid", "autoencoder-digits"} <= swept


def test_verdicts_say_by_how_much_a_target_is_missed():
    classifier = Recipe("c", "C", {}, "accuracy", 8.0, min_accuracy=0.90)
    assert verdict(classifier, _run("c", 8.0, 0.912, 7.99), None) == "yes"
    assert verdict(classifier, _run("c", 8.0, 0.874, 7.99), None) == "no: 2.6 points short"
    # 323 of 359 right prints as 0.900: the verdict must not read "0.0 points short"
    assert verdict(classifier, _run("c", 8.0, 323 / 359, 7.99), None) == "no: 0.03 points short"
    assert verdict(classifier, _run("c", 8.0, 0.95, 8.5), None).startswith("no: ε 8.50")  # over budget never passes
    swept = Recipe("c", "C", {}, "accuracy", 8.0, sweep=(2.0, 4.0), min_accuracy=0.94, sweep_targets={2.0: 0.88})
    assert verdict(swept, _run("c", 2.0, 0.85, 1.99), None) == "no: 3.0 points short"  # each epsilon its own target
    assert verdict(swept, _run("c", 4.0, 0.10, 3.99), None) == ""  # no target at 4
    autoencoder = Recipe("a", "A", {}, "mse", 8.0, max_mse_ratio=1.5)
    baseline = _run("a", math.inf, 0.20, math.inf, "mse")
    assert verdict(autoencoder, _run("a", 8.0, 0.28, 7.9, "mse"), baseline) == "yes (1.40×)"
    assert verdict(autoencoder, _run("a", 8.0, 0.32, 7.9, "mse"), baseline) == "no (1.60× > 1.5×)"


def test_table_has_one_row_per_run_and_the_verdict_on_the_main_run():
    recipe = Recipe("c", "CNN", {}, "accuracy", 8.0, sweep=(2.0,), min_accuracy=0.5)
    runs = [_run("c", 2.0, 0.4, 1.98), _run("c", 8.0, 0.6, 7.9), _run("c", math.inf, 0.7, math.inf)]
    rows = markdown_table([recipe], runs).splitlines()[2:]
    assert len(rows) == 3
    assert "target ε 8" in rows[0] and rows[0].rstrip().endswith("| yes |")
    assert "no DP" in rows[1] and "∞" in rows[1]
    assert "target ε 2" in rows[2]
    ablated = _run("c", 8.0, 0.55, 7.9)
    ablated.without = "server momentum"
    rows = markdown_table([recipe], [*runs, ablated]).splitlines()[2:]
    assert "without server momentum" in rows[1] and rows[1].rstrip().endswith("|  |")  # no verdict on an ablation


def test_repeated_runs_get_a_mean_row_judged_on_the_mean():
    recipe = Recipe("c", "CNN", {}, "accuracy", 4.0, min_accuracy=0.8, repeats=3,
                    ablations=(Ablation("momentum", {"momentum": 0.0}),))
    plan = planned([recipe], sweep=True, quick=False)
    assert [(e, a is None) for _, e, a in plan].count((4.0, True)) == 3 and len(plan) == 3 + 1 + 3
    once = Recipe("c", "CNN", {}, "accuracy", 4.0, repeats=3,
                  ablations=(Ablation("a", {"momentum": 0.0}), Ablation("b", {"momentum": 0.5}, repeats=1)))
    counts = [a.without for _, _, a in planned([once], sweep=True, quick=False) if a is not None]
    assert counts == ["a", "a", "a", "b"]  # an ablation's own repeats win over the recipe's
    runs = [_run("c", 4.0, v, 3.9) for v in (0.75, 0.85, 0.86)]
    for i, run in enumerate(runs, 1):
        run.repeat = i
    rows = markdown_table([recipe], runs).splitlines()[2:]
    assert len(rows) == 4 and "(run 1)" in rows[0] and rows[0].rstrip().endswith("| no: 5.0 points short |")
    assert "mean of 3 runs" in rows[3] and "0.820" in rows[3] and rows[3].rstrip().endswith("| yes |")
    assert "min 0.750, max 0.860" in rows[3]


def test_results_are_strict_json_with_a_plot(tmp_path):
    recipes = [Recipe("c", "CNN", {}, "accuracy", 8.0, sweep=(2.0, 4.0), min_accuracy=0.5),
               Recipe("a", "AE", {}, "mse", 8.0, sweep=(2.0,), max_mse_ratio=1.5)]
    runs = [_run("c", 8.0, 0.8, 7.9), _run("c", 2.0, 0.6, 1.9), _run("c", 4.0, 0.7, 3.9),
            _run("c", math.inf, 0.9, math.inf), _run("a", 8.0, 0.3, 7.9, "mse"), _run("a", math.inf, 0.25, math.inf, "mse")]
    runs[0].curve = [(3.0, 0.5), (6.0, 0.7), (7.9, 0.8)]
    header = write_results(tmp_path, recipes, runs, 61.0, quick=False, pending=2)
    assert "6 runs (2 still to run), 1.0 min" in header
    data = json.loads((tmp_path / "quality.json").read_text(), parse_constant=pytest.fail)  # no bare Infinity
    assert data["runs"][3]["max_epsilon"] == "inf" and data["runs"][0]["curve"][-1] == [7.9, 0.8]
    assert (tmp_path / "quality.png").stat().st_size > 1000
    assert (tmp_path / "quality.md").read_text().count("`fedpriv simulate`") == len(runs)


@pytest.mark.e2e
def test_quick_bench_writes_table_json_and_plot(fedpriv, tmp_path):
    out = tmp_path / "quality"
    # Two simulations (DP at the target, and no DP); the sweep's extra runs are covered by the plan and
    # results tests above. Mostly start-up; the limit allows a machine busy with other work.
    result = fedpriv("bench", "quality", "--quick", "--no-sweep", "--recipe", "autoencoder-digits", "--out", str(out),
                     timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    recipe = next(r for r in RECIPES if r.key == "autoencoder-digits")
    data = json.loads((out / "quality.json").read_text())
    assert data["quick"] is True
    epsilons = sorted(r["target_epsilon"] for r in data["runs"] if r["target_epsilon"] != "inf")
    assert epsilons == [recipe.epsilon]
    for run in data["runs"]:
        assert run["metric"] == "mse" and math.isfinite(run["value"]) and run["value"] > 0
        if run["target_epsilon"] == "inf":
            assert run["max_epsilon"] == "inf" and "--no-dp" in run["command"]
        else:  # the report's epsilon honours the target the noise was derived for
            assert 0 < run["max_epsilon"] <= run["target_epsilon"] * (1 + 1e-9)
    table = (out / "quality.md").read_text()
    assert table.count("`fedpriv simulate") == len(data["runs"]) == len(epsilons) + 1
    assert (out / "quality.png").stat().st_size > 1000
    assert "MSE" in result.stdout


def test_unknown_recipe_is_one_line(fedpriv, tmp_path):
    result = fedpriv("bench", "quality", "--recipe", "nope", "--out", str(tmp_path), timeout=60)
    assert result.returncode != 0
    assert "--recipe 'nope' is unknown" in result.stderr and "Traceback" not in result.stderr
