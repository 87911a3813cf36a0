"""What every ``fedpriv`` command shares: user errors as one line and a non-zero exit, the fast exit.

The main command line (``simulations/cli.py``) and the benchmarks (``simulations/bench/``) both use
these, so they live below both and neither imports the other for them.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import typer

from fedpriv.common.errors import UserInputError

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
            from fedpriv.simulations.simulate import FederationFailed

            if isinstance(exc, FederationFailed):
                fail(str(exc))
            typer.echo(f"error: unexpected {exc.__class__.__name__}: {exc} (set FEDPRIV_DEBUG=1 for details)", err=True)
            if os.environ.get("FEDPRIV_DEBUG"):
                raise
            raise typer.Exit(1)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    return wrapper


def fast_exit() -> None:
    """Skip the interpreter's final garbage collection over PyTorch's, Opacus' and Flower's objects.

    Measured on 2 cores: 1.4 s of the 1.7 s that exiting costs after a simulation. ``gc.freeze``
    moves every live object to a generation the collector ignores; files, logs and atexit handlers
    are still closed and run as usual.
    """
    import gc

    gc.freeze()
