"""Final accuracy of FedAvg and each robust rule with 3 of 15 clients poisoning (README: robust aggregation).

Run: .venv/bin/python scripts/measure/robust_under_poisoning.py ROUNDS EPOCHS [--no-dp]
"""
import sys, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import logging; logging.disable(logging.WARNING)
import tests.test_robust_aggregation as t
from fedpriv.common.config import RunConfig, ROBUST_STRATEGIES
rounds = int(sys.argv[1]); epochs = int(sys.argv[2])
d = tempfile.mkdtemp()
def cfg(name, tag):
    return RunConfig(num_clients=15, num_rounds=rounds, local_epochs=epochs, "--no-dp" not in sys.argv[3:], strategy=name,
                     num_malicious=3 if name in ROBUST_STRATEGIES else 0, run_dir=f"{d}/{tag}").validate()
t0 = time.time()
out = {"clean": t._final_accuracy(cfg("fedavg", "clean"), poisoners=())}
for name in ("fedavg", *ROBUST_STRATEGIES):
    out[name] = t._final_accuracy(cfg(name, name))
print(rounds, epochs, {k: round(v, 3) for k, v in out.items()}, round(time.time() - t0, 1), "s", flush=True)
