"""The wheel, installed the ordinary way (not editable), works from outside the checkout (issue 13).

Builds the wheel from a copy of the working tree, installs it with pip into a fresh virtual
environment, and runs a 1-round ``fedpriv simulate`` and a 1-round ``fedpriv federation`` (real
SuperLink, SuperNodes and ``flwr run`` of the app project written from the installed package)
from a folder that is not the checkout. The new environment gets the *dependencies* (torch, Flower,
Opacus, ...) through a ``.pth`` line naming this environment's site-packages, and copies of their
console scripts, so the test needs no network and no second multi-GB install; ``fedpriv`` itself
comes only from the wheel (the test checks where it is imported from, and that the editable
install's finder is not active there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWER_SCRIPTS = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
                  "flwr-clientapp", "flwr-simulation")
pytestmark = pytest.mark.e2e


def _build_wheel(dist: Path, work: Path) -> Path:
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", "bench-results"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                          "--quiet", "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = dist.glob("fedpriv-*.whl")
    return wheel


def _fresh_venv(venv: Path, wheel: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "fedpriv_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name in FLOWER_SCRIPTS:  # Flower's launchers, bound to the new interpreter
        text = (Path(sys.executable).parent / name).read_text().splitlines(keepends=True)
        target = venv / "bin" / name
        target.write_text(f"#!{python}\n" + "".join(text[1:]))
        target.chmod(0o755)
    out = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                          "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(work / "dist", work)
    python = _fresh_venv(work / "venv", wheel)
    outside = work / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FEDPRIV_STATE_HOME=str(work / "state"), FEDPRIV_CACHE=str(work / "cache"), COLUMNS="120",
               PATH=str(python.parent) + os.pathsep + env.get("PATH", ""))
    return wheel, python, outside, env


def test_the_wheel_has_one_top_level_package(installed):
    wheel = installed[0]
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith(
        (".dist-info", ".data"))}
    assert tops == {"fedpriv"}
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("fedpriv/__init__.py", "fedpriv/server/app.py", "fedpriv/client/app.py",
                   "fedpriv/common/config.py", "fedpriv/simulations/cli.py", "fedpriv/simulations/bench/runner.py"):
        assert module in names


def test_fedpriv_comes_from_the_wheel_not_the_checkout(installed):
    _, python, outside, env = installed
    code = ("import fedpriv, fedpriv.server.app as s, fedpriv.client.app as c, sys; "
            "print(s.__file__); print(c.__file__); print(any('__editable__' in str(type(f)) for f in sys.meta_path))")
    out = subprocess.run([str(python), "-c", code], cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    server_file, client_file, editable = out.stdout.split()
    venv = str(python.parent.parent)
    assert server_file.startswith(venv) and client_file.startswith(venv)
    assert editable == "False"


def _one_round_from_outside(installed, command: str, run: str, timeout: float) -> Path:
    """``fedpriv COMMAND`` (2 clients, 1 round) from the folder outside the checkout; its run folder."""
    _, python, outside, env = installed
    out = subprocess.run([str(python.parent / "fedpriv"), command, "--num-clients", "2", "--num-rounds", "1",
                          "--run-dir", f"runs/{run}"], cwd=outside, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (outside / "runs" / run / "report.json").is_file()
    return outside / "runs" / run


def test_simulate_from_outside_the_checkout(installed):
    _one_round_from_outside(installed, "simulate", "sim", timeout=300)


def test_federation_from_outside_the_checkout(installed):
    run_dir = _one_round_from_outside(installed, "federation", "fed", timeout=600)
    app = (run_dir / "flower-app" / "pyproject.toml").read_text()
    assert 'serverapp = "fedpriv.server.app:app"' in app
