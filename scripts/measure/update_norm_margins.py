"""Honest update norms vs the server's derived bound, over model families, partitionings and options.

Run: .venv/bin/python scripts/measure/update_norm_margins.py (README: how large an honest update can be).
"""
import sys, math, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import load_dataset
from fedpriv.common.partitioning import partition
from fedpriv.common.models import model_from_config
from fedpriv.client.dp_training import train_round
from fedpriv.server.update_validation import client_records, update_norm_bound
torch.set_num_threads(1)
def run(rounds=4, clients=4, **kw):
    cfg = RunConfig(**kw).validate()
    data = load_dataset(cfg.dataset, seed=0, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples)
    parts = partition(data.y_train, len(data.x_train), cfg.num_clients, cfg.partitioning, seed=0, alpha=cfg.dirichlet_alpha, classes_per_client=cfg.classes_per_client)
    order = sorted(range(len(parts)), key=lambda i: len(parts[i]))
    pick = order[:clients // 2] + order[-(clients - clients // 2):]  # smallest and largest clients
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=0)
    d = sum(p.numel() for p in model.parameters())
    bound = update_norm_bound(cfg, d, client_records(cfg, data))
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    worst = 0.0; gw = 0
    for rnd in range(rounds):
        news = []
        gnorm = math.sqrt(sum(float((v.double()**2).sum()) for v in glob.values()))
        for i in pick:
            m = model_from_config(cfg, data.input_shape, data.num_classes, seed=0); m.load_state_dict(glob)
            idx = parts[i]
            y = None if data.y_train is None else data.y_train[idx]
            r = train_round(m, data.x_train[idx], y, cfg, [])
            delta = math.sqrt(sum(float(((r.state_dict[k].double()-glob[k].double())**2).sum()) for k in glob))
            worst = max(worst, delta); news.append(r.state_dict)
        gw = max(gw, gnorm)
        glob = {k: sum(s[k].double() for s in news).div(len(news)).to(glob[k].dtype) for k in glob}
    print(f"{kw}: bound {bound:.2f}, largest honest update {worst:.2f} ({worst / bound:.2f} of it), 6 x model norm {6 * gw:.1f}", flush=True)
t = time.time()
configs = [dict(), dict(dp=False), dict(partitioning="dirichlet"), dict(partitioning="dirichlet", dp=False),
    dict(num_clients=50), dict(num_clients=50, partitioning="dirichlet"), dict(num_clients=50, dp=False),
    dict(poisson_sampling=False), dict(grad_sample_mode="bookkeeping"), dict(grad_sample_mode="hooks"),  # ghost: refused with DP
    dict(dataset="mnist1d"), dict(dataset="mnist1d", dp=False), dict(dataset="mnist1d", partitioning="dirichlet"),
    dict(model="rnn", dataset="mnist1d"), dict(model="rnn", dataset="mnist1d", dp=False),
    dict(model="autoencoder"), dict(model="autoencoder", dp=False),
    dict(noise_multiplier=0.5), dict(noise_multiplier=4.0), dict(max_grad_norm=5.0), dict(batch_size=16), dict(batch_size=256),
    dict(local_epochs=5), dict(momentum=0.0, learning_rate=0.5), dict(learning_rate=0.5, dp=False), dict(strategy="fedprox"),
    dict(dp=False, local_epochs=10), dict(dp=False, momentum=0.0, learning_rate=1.0)]
for kw in configs:
    run(**kw)
print("seconds", round(time.time() - t))
