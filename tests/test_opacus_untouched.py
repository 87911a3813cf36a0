"""Importing and running fedpriv leaves Opacus exactly as it was for other code in the same process.

The contract (issue 13): the project changes Opacus' behaviour only by subclassing and by objects it
passes in (its own optimizer classes, Poisson loader and accountants), never by replacing attributes
of Opacus' modules or classes. A replaced module function, a registry entry or a swapped
``__class__`` changes Opacus for every library and test in the process, silently: another user of
``PrivacyEngine(accountant="gdp")`` or of ``secure_mode`` would get the project's code instead of
Opacus' own.

The probe runs in a fresh interpreter (this file, run as a script): it imports every Opacus module
it can, snapshots what other code can observe of them (module globals, the own attributes of
every class they define, and the contents of module- and class-level containers such as the
accountant registry), imports every fedpriv module, runs real DP rounds (secure mode through
each optimizer family, and a plain book-keeping round), and compares by identity.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDPRIV_PACKAGES = ("client", "common", "server", "simulations")
# The modules the issue names; the probe snapshots every importable opacus module, these included.
NAMED = ("opacus.optimizers.optimizer", "opacus.optimizers.optimizer_fast_gradient_clipping",
         "opacus.accountants.registry", "opacus.utils.uniform_sampler", "opacus.data_loader",
         "opacus.privacy_engine")
# Python itself writes here when a module issues a warning (Opacus warns on every PrivacyEngine
# without secure mode): bookkeeping of the warnings machinery, not a change to Opacus.
IGNORED = {"__warningregistry__"}


class _Contents:
    """A shallow copy of a container: keys compared by equality, values by identity."""

    def __init__(self, value: dict | list | set | tuple) -> None:
        self.items = list(value.items()) if isinstance(value, dict) else list(value)

    def same_as(self, other: "_Contents") -> bool:
        if len(self.items) != len(other.items):
            return False
        for a, b in zip(self.items, other.items):
            if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 2:
                if not (a[0] == b[0] and a[1] is b[1]):
                    return False
            elif a is not b:
                return False
        return True


def _record(snap: dict, key: tuple, value: object) -> None:
    snap[key] = value
    if isinstance(value, (dict, list, set)):
        snap[key + ("<contents>",)] = _Contents(value)


def snapshot() -> dict[tuple, object]:
    """What other code can observe of every loaded opacus module, by identity."""
    snap: dict[tuple, object] = {}
    for name, module in sorted(sys.modules.items()):
        if module is None or not (name == "opacus" or name.startswith("opacus.")):
            continue
        for attr, value in list(vars(module).items()):
            if attr in IGNORED:
                continue
            _record(snap, (name, attr), value)
            if isinstance(value, type) and value.__module__ == name:  # a class Opacus defines here
                for cattr, cvalue in list(vars(value).items()):
                    _record(snap, (name, attr, cattr), cvalue)
    return snap


def differences(before: dict, after: dict) -> list[str]:
    out = []
    for key in sorted(set(before) | set(after), key=str):
        if key not in after:
            out.append(f"removed: {'.'.join(map(str, key))}")
        elif key not in before:
            if key[0] in {k[0] for k in before}:  # a new attribute on a module that was loaded before
                out.append(f"added: {'.'.join(map(str, key))}")
        elif isinstance(before[key], _Contents):
            if not before[key].same_as(after[key]):
                out.append(f"contents changed: {'.'.join(map(str, key))}")
        elif before[key] is not after[key]:
            out.append(f"replaced: {'.'.join(map(str, key))}")
    return out


def _import_all(package: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Import ``package`` and every submodule; return the ones that could not be imported, and why."""
    failed = []
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + ".", onerror=failed.append):
        if info.name.startswith(skip):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:  # opacus: optional extras (pytorch_lightning, ...), nothing there to touch
            failed.append(f"{info.name}: {exc}")
    return failed


def _rounds() -> list[str]:
    """Real DP rounds through ``train_round``: secure mode through each optimizer family, plain book-keeping."""
    import numpy as np
    import torch

    from fedpriv.client.dp_training import RoundRandomness, train_round
    from fedpriv.common.config import RunConfig
    from fedpriv.common.models import build_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=24)
    ran = []
    # (ghost is refused for DP training, common/config.py; book-keeping's optimizer is its secure family)
    for mode, secure, poisson in (("hooks", True, True), ("bookkeeping", True, True),
                                  ("bookkeeping", False, True), ("bookkeeping", True, False)):
        cfg = RunConfig(model="cnn", batch_size=8, local_epochs=1, grad_sample_mode=mode, secure_mode=secure,
                        poisson_sampling=poisson).validate()
        result = train_round(build_model("cnn", (1, 8, 8), 10, seed=0), x, y, cfg, [], rng=RoundRandomness.seeded(1))
        assert result.steps > 0 and np.isfinite(result.epsilon)
        ran.append(f"{mode}{' secure' if secure else ''}{'' if poisson else ' fixed'}")
    return ran


def probe() -> dict:
    """Snapshot opacus, import all of fedpriv and run rounds, snapshot again: the differences."""
    import opacus  # noqa: F401

    skipped = _import_all("opacus", skip=("opacus.tests",))
    before = snapshot()
    assert all(name in sys.modules for name in NAMED), [n for n in NAMED if n not in sys.modules]
    sys.path.insert(0, str(ROOT))
    for package in FEDPRIV_PACKAGES:
        failed = _import_all(package)
        assert not failed, f"fedpriv modules failed to import: {failed}"
    after_import = snapshot()
    rounds = _rounds()
    after_rounds = snapshot()
    return {"skipped": skipped, "snapshotted": len(before), "rounds": rounds,
            "import": differences(before, after_import), "rounds_diff": differences(after_import, after_rounds)}


def test_importing_and_running_fedpriv_leaves_opacus_as_it_was():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["snapshotted"] > 1000, report  # the snapshot really saw Opacus' modules and classes
    assert len(report["rounds"]) == 4, report
    assert report["import"] == [], f"importing fedpriv changed opacus: {report['import']}"
    assert report["rounds_diff"] == [], f"running fedpriv rounds changed opacus: {report['rounds_diff']}"
    assert time.perf_counter() - start < 300


def test_snapshot_sees_a_replaced_function_a_registry_entry_and_a_class_attribute():
    """The probe's own check: each kind of change the contract forbids shows up as a difference."""
    from opacus.accountants import registry
    from opacus.optimizers import optimizer as opacus_optimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    before = snapshot()
    saved_noise, saved_registry, saved_iter = (opacus_optimizer._generate_noise, dict(registry._ACCOUNTANTS),
                                               UniformWithReplacementSampler.__iter__)
    try:
        opacus_optimizer._generate_noise = lambda *a, **k: None
        registry._ACCOUNTANTS["gdp"] = object
        UniformWithReplacementSampler.__iter__ = lambda self: iter(())
        found = differences(before, snapshot())
    finally:
        opacus_optimizer._generate_noise = saved_noise
        registry._ACCOUNTANTS.clear()
        registry._ACCOUNTANTS.update(saved_registry)
        UniformWithReplacementSampler.__iter__ = saved_iter
    assert "replaced: opacus.optimizers.optimizer._generate_noise" in found, found
    assert "contents changed: opacus.accountants.registry._ACCOUNTANTS.<contents>" in found, found
    assert "replaced: opacus.utils.uniform_sampler.UniformWithReplacementSampler.__iter__" in found, found
    assert differences(before, snapshot()) == []


def test_no_fedpriv_source_swaps_a_class_or_registers_with_opacus():
    """What a module snapshot cannot see: an Opacus-built object given another ``__class__``.

    Swapping the class of an object Opacus built (its optimizer, its sampler) leaves Opacus'
    modules alone but hands other code an Opacus object that no longer behaves as Opacus'; the
    project builds its own objects instead. Nor does it register anything with Opacus.
    """
    import ast

    found = []
    for package in FEDPRIV_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
                found += [f"{path.relative_to(ROOT)}:{node.lineno} assigns __class__" for t in targets
                          if isinstance(t, ast.Attribute) and t.attr == "__class__"]
                if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                        "register_accountant", "register_grad_sampler", "register_norm_sampler"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} registers with Opacus")
    assert found == []


def test_secure_mode_builds_the_projects_objects_and_plain_mode_draws_like_opacus():
    """Secure mode: the project's optimizer and Poisson loader, noise not reproducible from torch's
    seed; plain mode: the same objects draw exactly what Opacus' own optimizer and loader draw."""
    import torch
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedpriv.client.grad_sample_modes import make_private
    from fedpriv.client.secure_noise import CsprngDPOptimizer, CsprngPoissonSampler

    def noise_step(secure: bool, engine_cls=None) -> tuple[torch.Tensor, object]:
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        loader = DataLoader(TensorDataset(torch.zeros(16, 5), torch.zeros(16, 3)), batch_size=4,
                            generator=torch.Generator().manual_seed(1))
        args = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True,
                    noise_generator=torch.Generator().manual_seed(2))
        if engine_cls is not None:  # Opacus' own make_private, for reference
            module, optimizer, dp_loader = engine_cls(accountant="rdp").make_private(**args)
        else:
            private = make_private(PrivacyEngine(accountant="rdp"), model=model, optimizer=args["optimizer"],
                                   criterion=nn.MSELoss(), loader=loader, mode="hooks", noise_multiplier=1.0,
                                   max_grad_norm=1.0, poisson_sampling=True, noise_generator=args["noise_generator"],
                                   secure_mode=secure)
            module, optimizer, dp_loader = private.model, private.optimizer, private.loader
        batches = [len(xb) for xb, _ in dp_loader]
        optimizer.zero_grad()
        nn.MSELoss()(module(torch.zeros(0, 5)), torch.zeros(0, 3)).backward()
        optimizer.pre_step()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        module._close()
        return grad, (type(optimizer), type(dp_loader), type(dp_loader.batch_sampler), batches)

    opacus_grad, (_, opacus_loader, _, opacus_batches) = noise_step(False, engine_cls=PrivacyEngine)
    plain_grad, (plain_opt, plain_loader, _, plain_batches) = noise_step(False)
    assert plain_opt is CsprngDPOptimizer and plain_loader is opacus_loader is DPDataLoader
    assert torch.equal(plain_grad, opacus_grad) and plain_batches == opacus_batches  # draw for draw
    secure_a, (secure_opt, _, secure_sampler, _) = noise_step(True)
    secure_b, _ = noise_step(True)
    assert secure_opt is CsprngDPOptimizer and secure_sampler is CsprngPoissonSampler
    assert not torch.equal(secure_a, secure_b) and not torch.equal(secure_a, opacus_grad)


if __name__ == "__main__":
    print(json.dumps(probe()))
