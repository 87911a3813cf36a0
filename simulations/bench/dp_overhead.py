"""``fedpriv bench dp-overhead``: the cost of DP-SGD per training step.

It times one training step of each model with and without DP, for every
per-sample-gradient mode, interleaved step by step in one process (median per mode), so that a
machine busy with other work slows every mode alike and the ratios stay meaningful. The step is
``client.dp_training.train_step``, the one local training runs; inputs are random tensors of each
dataset's shape (speed does not depend on the values), batches have a fixed size.

Interleaving cannot fix one thing: with several threads on cores that other work keeps busy,
OpenMP's spinning waits for descheduled sibling threads (seen here: a non-private RNN step at
378 ms instead of 8 ms with 2 threads on 2 busy cores). The table prints the load average and
OpenMP's wait policy; ``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE`` give steadier numbers there.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from fedpriv.simulations.command import guarded

if TYPE_CHECKING:
    from fedpriv.common.config import RunConfig

NO_DP = "no DP"


@dataclass(frozen=True)
class BenchCase:
    """A model family on inputs of one shape."""

    key: str
    model: str
    input_shape: tuple[int, ...]
    num_classes: int


CASES = (
    BenchCase("cnn-28x28", "cnn", (1, 28, 28), 10),  # the reference: MNIST-sized images
    BenchCase("cnn-digits", "cnn", (1, 8, 8), 10),
    BenchCase("cnn-mnist1d", "cnn", (1, 40), 10),
    BenchCase("rnn-mnist1d", "rnn", (1, 40), 10),
    BenchCase("autoencoder-digits", "autoencoder", (1, 8, 8), 0),
)


@dataclass
class Row:
    """One (case, mode) measurement; ``error`` set when the mode cannot train this model."""

    case: BenchCase
    mode: str
    ms_per_step: float = math.nan
    samples_per_s: float = math.nan
    ratio: float = math.nan  # DP time per sample / non-private time per sample (wall clock)
    cpu_ratio: float = math.nan  # the same in CPU time of this process: less sensitive to other load
    auto: bool = False
    error: str = ""


def _bench_config(case: BenchCase) -> RunConfig:
    """Default model sizes, with the design card's CNN: the README's overhead figures and the issue's
    28x28 reference were measured on it, and its second conv block and FC 128 are the heavier case
    for per-sample clipping (the default compact CNN is its first block alone)."""
    from fedpriv.common.config import RunConfig

    return RunConfig(model=case.model, cnn_arch="card")


def _stepper(case: BenchCase, mode: str, batch: int) -> Callable[[], None]:
    """A closure running one training step of ``case`` in ``mode`` (``NO_DP`` = plain SGD)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedpriv.client.dp_training import train_step
    from fedpriv.client.grad_sample_modes import make_private
    from fedpriv.common.evaluation import task_loss
    from fedpriv.common.models import model_from_config

    cfg = _bench_config(case)
    model = model_from_config(cfg, case.input_shape, case.num_classes, seed=0)
    model.train()
    pool = torch.randn(10 * batch, *case.input_shape)
    targets = pool if case.model == "autoencoder" else torch.randint(0, case.num_classes, (len(pool),))
    xb, yb = pool[:batch], targets[:batch]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = task_loss(case.model)
    if mode == NO_DP:
        return lambda: train_step(model, optimizer, criterion, xb, yb)
    private = make_private(
        PrivacyEngine(accountant="rdp"), model=model, optimizer=optimizer, criterion=criterion,
        loader=DataLoader(TensorDataset(pool, targets), batch_size=batch), mode=mode,
        noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm, poisson_sampling=True,
    )
    return lambda: train_step(private.model, private.optimizer, private.criterion, xb, yb)


def measure_case(case: BenchCase, modes: list[str], *, batch: int, steps: int, warmup: int,
                 min_seconds: float = 0.0) -> list[Row]:
    """Rows for ``NO_DP`` and each mode, timed round-robin; ratios against ``NO_DP``.

    At least ``steps`` rounds, and more until ``min_seconds`` have passed.
    """
    from fedpriv.client.grad_sample_modes import resolve
    from fedpriv.common.models import model_from_config

    auto = resolve("auto", case.model, model_from_config(_bench_config(case), case.input_shape, case.num_classes))
    rows = {mode: Row(case, mode, auto=mode == auto) for mode in [NO_DP, *modes]}
    steppers: dict[str, Callable[[], None]] = {}
    for mode, row in rows.items():
        try:
            step = _stepper(case, mode, batch)
            for _ in range(max(1, warmup)):  # the first step also shows whether the mode can train it
                step()
            steppers[mode] = step
        except Exception as exc:  # noqa: BLE001 - a mode that cannot train this model is a result
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:70] if str(exc) else ''}"
    wall: dict[str, list[float]] = {mode: [] for mode in steppers}
    cpu: dict[str, list[float]] = {mode: [] for mode in steppers}
    order = list(steppers)
    began, step = time.perf_counter(), 0
    # one step of each in turn, so a burst of load hits all alike; small models get more rounds
    while order and (step < steps or time.perf_counter() - began < min_seconds):
        shift = step % len(order)
        step += 1
        for mode in order[shift:] + order[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            steppers[mode]()
            cpu[mode].append(time.process_time() - start_cpu)
            wall[mode].append(time.perf_counter() - start)
    if NO_DP in wall:
        base, base_cpu = statistics.median(wall[NO_DP]), statistics.median(cpu[NO_DP])
        for mode in wall:
            seconds, row = statistics.median(wall[mode]), rows[mode]
            row.ms_per_step, row.samples_per_s, row.ratio = 1000 * seconds, batch / seconds, seconds / base
            row.cpu_ratio = statistics.median(cpu[mode]) / base_cpu
    return list(rows.values())


def overhead_table(rows: list[Row], *, batch: int, threads: int, load: str = ""):
    """The rich table of ``dp-overhead``; the mode ``auto`` picks is bold and marked."""
    from rich.table import Table

    table = Table(title=f"DP-SGD cost per step: batch {batch}, {threads} thread(s)",
                  caption="ratio = DP time per sample / non-private time per sample of the same model "
                          "(medians of interleaved steps); CPU = the same in this process' CPU time"
                          + (f"; load average {load}" if load else ""))
    for column, justify in (("model", "left"), ("input", "left"), ("mode", "left"), ("ms/step", "right"),
                            ("samples/s", "right"), ("ratio", "right"), ("ratio CPU", "right")):
        table.add_column(column, justify=justify)
    previous = None
    for row in rows:
        first = row.case is not previous
        if first and previous is not None:
            table.add_section()
        previous = row.case
        name = row.case.key if first else ""
        shape = "x".join(map(str, row.case.input_shape)) if first else ""
        label = f"{row.mode} ← auto" if row.auto else row.mode
        if row.error:
            table.add_row(name, shape, label, "[dim]n/a[/]", "[dim]n/a[/]", f"[dim]{row.error}[/]", "")
            continue
        cells = [f"{row.ms_per_step:.1f}", f"{row.samples_per_s:,.0f}", f"{row.ratio:.2f}", f"{row.cpu_ratio:.2f}"]
        table.add_row(name, shape, label, *cells, style="bold green" if row.auto else None)
    return table


def dp_overhead(
    threads: Annotated[int, typer.Option("--threads", help="PyTorch intra-op threads (the reference: 2 cores). On a machine busy with other work, multi-threaded timings swing wildly: use 1, or OMP_WAIT_POLICY=PASSIVE.")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per step, the same for every row.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Least timed steps per model and mode, interleaved step by step.")] = 12,
    seconds: Annotated[float, typer.Option("--seconds", help="Least timing per model: small models run more steps until then.")] = 4.0,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps per model and mode first (at least one is always run).")] = 2,
    models: Annotated[Optional[list[str]], typer.Option("--model", help="Only this case (repeat for several): " + ", ".join(c.key for c in CASES) + ".")] = None,
    modes: Annotated[Optional[list[str]], typer.Option("--mode", help="Only this per-sample-gradient mode (repeat for several); default all.")] = None,
) -> None:
    """Time DP-SGD against non-private training per model and mode; mark the mode 'auto' picks.

    Example: fedpriv bench dp-overhead --threads 1 --batch-size 64
    """
    guarded(_dp_overhead)(threads, batch_size, steps, seconds, warmup, models, modes)


def _dp_overhead(threads: int, batch_size: int, steps: int, seconds: float, warmup: int,
                 models: Optional[list[str]], modes: Optional[list[str]]) -> None:
    from fedpriv.common.errors import UserInputError

    from fedpriv.client.grad_sample_modes import MODES
    from fedpriv.common.config import check_choice

    for key in models or []:
        check_choice("model", key, [c.key for c in CASES])
    for mode in modes or []:
        check_choice("mode", mode, MODES)
    for option, value, least in (("threads", threads, 1), ("batch-size", batch_size, 1), ("steps", steps, 1),
                                 ("seconds", seconds, 0), ("warmup", warmup, 0)):
        if not value >= least:  # also NaN
            raise UserInputError(f"--{option} must be >= {least} (got {value})")

    import torch

    from fedpriv.client import dp_training  # noqa: F401 - quiets Opacus' warnings and loggers
    from fedpriv.simulations.console import console

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_before = _load_average()
    try:
        rows: list[Row] = []
        cases = [c for c in CASES if not models or c.key in models]
        with console.status("timing...") as status:
            for case in cases:
                status.update(f"timing {case.key} ({len(modes or MODES) + 1} variants)")
                rows += measure_case(case, list(modes or MODES), batch=batch_size, steps=steps, warmup=warmup,
                                     min_seconds=seconds)
    finally:
        torch.set_num_threads(previous_threads)
    load = (f"{load_before} before, {_load_average()} after ({os.cpu_count()} CPUs); "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    console.print(overhead_table(rows, batch=batch_size, threads=threads, load=load))


def _load_average() -> str:
    """The 1-minute load average: how busy the machine was while timing."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"
