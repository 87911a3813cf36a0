"""The peer of ``fedpriv bench peer``: Flower's published Opacus example workflow (``examples/opacus``).

A legacy ``NumPyClient`` built by ``client_fn`` per message, a fresh ``PrivacyEngine`` per round, a
``DataLoader`` of dict batches and federated evaluation, against the legacy ``FedAvg`` server; the
same model, data, clients and rounds as this project's run (the ``peer`` child in
:mod:`simulations.bench.children` runs it on Flower's Simulation Engine).
"""

from __future__ import annotations

import json
import os
import time


class _DictDataset:
    """Records as dicts with a per-item transform, like the example's ``with_transform`` HF dataset."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        import torch

        return {"image": torch.tensor(self.x[i]), "label": int(self.y[i])}


def _peer_load_data(partition_id: int, num_partitions: int):
    """The example's ``load_data``: the partition, split 80/20 per call, dict-batch loaders.

    The example trains on 80% and evaluates on 20% of its partition; here the loader trains on the
    whole partition so both workflows train on exactly the same records (the same work per round).
    """
    import numpy as np
    from torch.utils.data import DataLoader

    from fedpriv.client.local_data import local_data
    from fedpriv.common.config import RunConfig

    cfg = RunConfig.from_mapping(json.loads(os.environ["FEDPRIV_PEER_CONFIG"]))
    data = local_data(cfg, {"partition-id": partition_id, "num-partitions": num_partitions})
    order = np.random.default_rng(42).permutation(len(data.x))
    test = order[: max(1, len(order) // 5)]
    train_loader = DataLoader(_DictDataset(data.x, data.y), batch_size=cfg.batch_size, shuffle=True)
    test_loader = DataLoader(_DictDataset(data.x[test], data.y[test]), batch_size=cfg.batch_size)
    return cfg, data, train_loader, test_loader


def _peer_client_fn(context):
    """The example's ``client_fn``: a new NumPyClient (fresh model, fresh loaders) for every message."""
    import torch
    from flwr.client import NumPyClient
    from opacus import PrivacyEngine

    from fedpriv.common.models import model_from_config

    cfg, data, train_loader, test_loader = _peer_load_data(int(context.node_config["partition-id"]),
                                                           int(context.node_config["num-partitions"]))

    def set_weights(net, parameters) -> None:
        net.load_state_dict({k: torch.tensor(v) for k, v in zip(net.state_dict().keys(), parameters)}, strict=True)

    class FlowerClient(NumPyClient):
        def __init__(self) -> None:
            self.model = model_from_config(cfg, data.input_shape, data.num_classes)

        def fit(self, parameters, config):
            model = self.model
            set_weights(model, parameters)
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
            privacy_engine = PrivacyEngine(secure_mode=False)
            model, optimizer, loader = privacy_engine.make_private(
                module=model, optimizer=optimizer, data_loader=train_loader,
                noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm)
            criterion = torch.nn.CrossEntropyLoss()
            model.train()
            for _ in range(cfg.local_epochs):
                for batch in loader:
                    optimizer.zero_grad()
                    criterion(model(batch["image"]), batch["label"]).backward()
                    optimizer.step()
            epsilon = privacy_engine.get_epsilon(delta=cfg.delta)  # this round only, as in the example
            return [v.cpu().numpy() for v in self.model.state_dict().values()], len(train_loader.dataset), {
                "epsilon": float(epsilon)}

        def evaluate(self, parameters, config):
            set_weights(self.model, parameters)
            criterion = torch.nn.CrossEntropyLoss()
            correct, loss = 0, 0.0
            with torch.no_grad():
                for batch in test_loader:
                    outputs = self.model(batch["image"])
                    loss += criterion(outputs, batch["label"]).item()
                    correct += (outputs.argmax(1) == batch["label"]).sum().item()
            return loss, len(test_loader.dataset), {"accuracy": correct / len(test_loader.dataset)}

    torch.set_num_threads(max(1, int(cfg.client_cpus)))  # as the project's ClientApp does in simulation
    return FlowerClient().to_client()


def peer_client_app():
    from flwr.client import ClientApp

    return ClientApp(client_fn=_peer_client_fn)


class PeerTimeline:
    """Round start/fit-end/end timestamps of the legacy server loop."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []


def peer_server_app(cfg, timeline: PeerTimeline):
    """The example's ``server_fn``: legacy FedAvg (fit and evaluate on every client), initial weights given."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    from fedpriv.common.datasets import load_dataset
    from fedpriv.common.models import model_from_config

    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples)
    initial = [v.numpy() for v in model_from_config(cfg, data.input_shape, data.num_classes,
                                                     seed=cfg.seed).state_dict().values()]

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            timeline.rounds.append({"round": server_round, "start": time.time()})
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            timeline.rounds[-1]["fit_end"] = time.time()
            return super().aggregate_fit(server_round, results, failures)

        def aggregate_evaluate(self, server_round, results, failures):
            timeline.rounds[-1]["end"] = time.time()
            return super().aggregate_evaluate(server_round, results, failures)

    def weighted_average(metrics):
        return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / sum(n for n, _ in metrics)}

    fraction = cfg.fraction_train

    def server_fn(context):
        strategy = TimedFedAvg(fraction_fit=fraction, fraction_evaluate=fraction, min_fit_clients=cfg.min_clients,
                               min_evaluate_clients=cfg.min_clients, min_available_clients=cfg.num_clients,
                               evaluate_metrics_aggregation_fn=weighted_average,
                               initial_parameters=ndarrays_to_parameters(initial))
        return ServerAppComponents(config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)

    return ServerApp(server_fn=server_fn)
