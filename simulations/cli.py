"""The ``fedpriv`` command line (typer + rich). Every user error is one line and a non-zero exit."""


import inspect
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from common.config import RunConfig
from common.errors import UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated learning with differential privacy: Flower + Opacus.")

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Print one clear line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one line; an unexpected crash into one line plus where to look."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserInputError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, never a traceback
            from simulations.simulate import FederationFailed

            if isinstance(exc, FederationFailed):
                fail(str(exc))
            typer.echo(f"error: unexpected {exc.__class__.__name__}: {exc} (set FEDPRIV_DEBUG=1 for details)", err=True)
            if __import__("os").environ.get("FEDPRIV_DEBUG"):
                raise
            raise typer.Exit(1)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    return wrapper


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Expose every ``RunConfig`` field as a ``--kebab-case`` option and pass a ``RunConfig`` on.

    One source of truth: ``fedpriv simulate --help``, ``pyproject.toml``'s run config and the
    messages to clients all use the same names.
    """
    params = []
    for f in fields(RunConfig):
        py_type = {"int": int, "float": float, "bool": bool, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if py_type is bool else [flag]
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
            annotation=Annotated[py_type, typer.Option(*decls, help=f.metadata.get("help", ""), show_default=True)],
        ))
    own = [p for p in inspect.signature(func).parameters.values() if p.name != "cfg"]

    def wrapper(**kwargs: Any) -> Any:
        values = {f.name: kwargs.pop(f.name) for f in fields(RunConfig)}
        return func(cfg=RunConfig(**values), **kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    wrapper.__signature__ = inspect.Signature(own + params)  # type: ignore[attr-defined]
    return wrapper


@app.command()
@guarded
@config_options
def simulate(cfg: RunConfig) -> None:
    """Run a local federated simulation with DP on every client and write its privacy report.

    Example: fedpriv simulate --model rnn --dataset mnist1d --num-clients 10 --num-rounds 5
    """
    cfg.validate()  # before the heavy imports: a wrong option fails in a fraction of a second
    from simulations.console import RoundProgress, console, results_table
    from simulations.simulate import simulate as run_simulation

    console.print(f"[bold]fedpriv[/] {cfg.model} on {cfg.dataset}: {cfg.num_clients} clients, {cfg.num_rounds} rounds, "
                  + (f"DP-SGD σ={cfg.noise_multiplier} C={cfg.max_grad_norm} δ={cfg.delta:g} ({cfg.accountant})"
                     if cfg.dp else "[red]no DP[/]"))
    with RoundProgress() as progress:
        report, run_dir = run_simulation(cfg, progress)
    console.print(results_table(report))
    console.print(f"run folder: {run_dir}  (report.md, report.json, metrics.png, epsilon.png)")


@app.command()
@guarded
def report(run_dir: Annotated[Path, typer.Argument(help="Folder of a finished run.")]) -> None:
    """Re-render the report (report.md and plots) of a finished run and print its table."""
    from server.report import RunReport
    from simulations.console import console, results_table

    rep = RunReport.load(run_dir)
    rep.write(run_dir)
    console.print(results_table(rep))
    console.print(rep.markdown().split("## Privacy guarantee", 1)[1].split("##", 1)[0].strip())
    console.print(f"written: {run_dir / 'report.md'}, {run_dir / 'metrics.png'}, {run_dir / 'epsilon.png'}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
