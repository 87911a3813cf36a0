"""The Flower App project that ``flwr run`` submits, written from the installed package.

``flwr run DIR`` packs ``DIR/pyproject.toml`` (and any source there) into a FAB that the SuperLink
runs. In a source checkout the repository root is such a project; an installed ``fedpriv`` (a
plain ``pip install``) has no source tree. So ``fedpriv server`` writes a small project into its run
folder: a ``pyproject.toml`` whose components name the installed modules
(``fedpriv.server.app:app``, ``fedpriv.client.app:app``) and whose ``[tool.flwr.app.config]`` is
:class:`~fedpriv.common.config.RunConfig`'s defaults, the one definition of every key. The FAB then
carries no code: the SuperLink's ServerApp and each owner's ClientApp import the ``fedpriv`` they
have installed, which is what an owner audited and trusts (never code the server ships).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from fedpriv.common.atomic_io import write_text
from fedpriv.common.config import RunConfig

PUBLISHER = "fedpriv"
SERVER_APP = "fedpriv.server.app:app"
CLIENT_APP = "fedpriv.client.app:app"


def toml_value(value: object) -> str:
    """``value`` as a TOML literal (bool, int, float or string): the form ``--run-config`` takes too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def app_pyproject(defaults: RunConfig | None = None) -> str:
    """The text of the App's ``pyproject.toml``: components and run config from ``defaults``."""
    try:
        version = metadata.version("fedpriv")
    except metadata.PackageNotFoundError:  # imported from a bare checkout, not installed
        version = "0.0.0"
    config = (defaults or RunConfig()).to_dict(kebab=True)
    lines = ["[build-system]", 'requires = ["setuptools>=68"]', 'build-backend = "setuptools.build_meta"', "",
             "[project]", 'name = "fedpriv"', f'version = "{version}"',
             "# No dependencies: the app runs the fedpriv that is installed where it runs.",
             "dependencies = []", "",
             "[tool.flwr.app]", f'publisher = "{PUBLISHER}"', "",
             "[tool.flwr.app.components]", f'serverapp = "{SERVER_APP}"', f'clientapp = "{CLIENT_APP}"', "",
             "[tool.flwr.app.config]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in config.items()]
    return "\n".join(lines) + "\n"


def write_app_project(dest: Path, defaults: RunConfig | None = None) -> Path:
    """Write the App project into ``dest`` (created; ``pyproject.toml`` replaced atomically); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "pyproject.toml", app_pyproject(defaults))
    return dest
