"""``fedpriv bench``: measurements that back design choices, apart from the product's code paths.

One module per benchmark, each with its command, its configuration and its tables:

- :mod:`~simulations.bench.dp_overhead`: the cost of DP-SGD per training step, per model and mode;
- :mod:`~simulations.bench.framework`: simulation wall time vs the same training in a plain loop;
- :mod:`~simulations.bench.scale`: many virtual clients, few per round: memory and per-round time;
- :mod:`~simulations.bench.deployment`: SuperLink + SuperNodes over TLS, plain vs SecAgg+;
- :mod:`~simulations.bench.peer`: Flower's published Opacus example workflow vs this project
  (the example itself: :mod:`~simulations.bench.peer_example`);
- :mod:`~simulations.bench.quality`: accuracy under DP, per model family.

Shared by them: :mod:`~simulations.bench.runner` (every measured child process: launch, log, time
limit, process-tree memory, clean kill; and the child's entry point ``python -m
simulations.bench.runner KIND SPEC OUT``), :mod:`~simulations.bench.children` (what such a child
runs), :mod:`~simulations.bench.shared` (configs, option checks, formatting) and
:mod:`~simulations.bench.app` (the ``bench`` command group, which registers every benchmark's
command). This package imports nothing itself, so a measured child loads only what it runs.
"""
