"""Local simulation, the ``fedpriv`` command line and (later) launchers and benchmarks."""
