"""The ``fedpriv`` command line (typer + rich). Every user error is one line and a non-zero exit."""


import dataclasses
import inspect
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from fedpriv.common.config import RunConfig, check_port, flag_name
from fedpriv.common.errors import UserInputError
from fedpriv.client.owner_policy import DEFAULT_BUDGET, DEFAULT_DELTA, DEFAULT_MIN_NOISE
from fedpriv.simulations.bench.app import bench_app
from fedpriv.simulations.command import EXIT_USER_ERROR, fail, fast_exit, guarded  # noqa: F401 - EXIT_USER_ERROR re-exported

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated learning with differential privacy: Flower + Opacus.")
app.add_typer(bench_app, name="bench")

def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Expose every ``RunConfig`` field as a ``--kebab-case`` option and pass a ``RunConfig`` on.

    One source of truth: ``fedpriv simulate --help``, ``pyproject.toml``'s run config and the
    messages to clients all use the same names.
    """
    params = []
    for f in fields(RunConfig):
        py_type = {"int": int, "float": float, "bool": bool, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        flag = flag_name(f.name)  # the spelling RunConfig.to_flags writes
        decls = [f"{flag}/--no-{flag[2:]}"] if py_type is bool else [flag]
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
    from fedpriv.simulations.console import RoundProgress, console, privacy_setup, results_table
    from fedpriv.simulations.simulate import simulate as run_simulation

    if cfg.dp and cfg.target_epsilon > 0:  # derive the noise now, to show it; simulate's own preflight reuses it
        from fedpriv.server.preflight import preflight

        cfg = preflight(cfg)
        console.print(f"noise multiplier {cfg.noise_multiplier:.4g} derived for target epsilon {cfg.target_epsilon:g}")
    console.print(f"[bold]fedpriv[/] {cfg.model} on {cfg.dataset}: {cfg.num_clients} clients, {cfg.num_rounds} rounds, "
                  + privacy_setup(cfg))
    with RoundProgress() as progress:
        report, run_dir = run_simulation(cfg, progress)
    console.print(results_table(report))
    console.print(f"run folder: {run_dir}  (report.md, report.json, metrics.png, epsilon.png)")


@app.command()
@guarded
def report(run_dir: Annotated[Path, typer.Argument(help="Folder of a finished run.")]) -> None:
    """Re-render the report (report.md and plots) of a finished run and print its table."""
    from fedpriv.server.report import RunReport
    from fedpriv.simulations.console import console, results_table

    rep = RunReport.load(run_dir)
    rep.write(run_dir)
    console.print(results_table(rep))
    console.print(rep.markdown().split("## Privacy guarantee", 1)[1].split("##", 1)[0].strip())
    console.print(f"written: {run_dir / 'report.md'}, {run_dir / 'metrics.png'}, {run_dir / 'epsilon.png'}")


@app.command()
@guarded
def score(
    run_dir: Annotated[Path, typer.Argument(help="Folder of a finished autoencoder run.")],
    data: Annotated[str, typer.Option("--data", help="Records to score: npz:PATH (every record, file order) or digits/mnist1d (train then test, as the run split it).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV of per-record scores (default RUN_DIR/scores.csv).")] = None,
) -> None:
    """Anomaly scores: each record's mean squared reconstruction error under the run's final autoencoder.

    Local only: reads the run folder and the data, writes the CSV, sends nothing anywhere.
    Example: fedpriv score runs/my-ae-run --data npz:my_records.npz --out scores.csv
    """
    from fedpriv.simulations.score import score_run

    result = score_run(run_dir, data, out)
    s = result.summary()
    typer.echo(f"scored {s['count']} records: mean {s['mean']:.6g}, std {s['std']:.6g}, min {s['min']:.6g}, "
               + ", ".join(f"{k} {v:.6g}" for k, v in s.items() if k.startswith("p")) + f", max {s['max']:.6g}")
    typer.echo(f"written: {result.out}")


@app.command()
@guarded
def audit(
    run_dir: Annotated[Optional[Path], typer.Argument(help="Folder of a finished run (fedpriv simulate); not with --mechanism.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for subsampling and the selection/evaluation split (with --mechanism: also data and noise).")] = 0,
    mechanism: Annotated[bool, typer.Option("--mechanism", help="Audit the local DP-SGD step itself (white-box, Dirac canary) instead of a run.")] = False,
    noise_multiplier: Annotated[Optional[float], typer.Option("--noise-multiplier", help=f"--mechanism: claimed sigma (default {RunConfig.noise_multiplier}).")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option("--max-grad-norm", help=f"--mechanism: clipping bound C (default {RunConfig.max_grad_norm}).")] = None,
    trials: Annotated[Optional[int], typer.Option("--trials", help="--mechanism: private steps per world, with and without the canary (default 10000).")] = None,
    grad_sample_mode: Annotated[Optional[list[str]], typer.Option("--grad-sample-mode", help="--mechanism: mode to audit (repeat for several; 'all' = every one) (default bookkeeping, hooks).")] = None,
    sample_rate: Annotated[Optional[float], typer.Option("--sample-rate", help="--mechanism: Poisson sample rate 1/k (default 1, the sharpest audit).")] = None,
    delta: Annotated[Optional[float], typer.Option("--delta", help=f"--mechanism: delta of the bounds (default {RunConfig.delta:g}).")] = None,
    accountant: Annotated[Optional[str], typer.Option("--accountant", help="--mechanism: accountant whose per-step epsilon is shown too (default rdp).")] = None,
    noise_scale: Annotated[Optional[float], typer.Option("--noise-scale", help="--mechanism self-test: scale the noise actually added (e.g. 0.25 must FAIL) (default 1).")] = None,
    secure_mode: Annotated[bool, typer.Option("--secure-mode", help="--mechanism: CSPRNG noise (client/secure_noise.py), as --secure-mode runs.")] = False,
) -> None:
    """Membership-inference attack on a run's final model: AUC, TPR at low FPR, empirical epsilon lower bound.

    Writes RUN_DIR/audit.json. A sanity check with a weak attack: a lower bound only.

    With --mechanism (no RUN_DIR): a white-box audit of one local DP-SGD step as training runs it,
    bound beside the theoretical per-step epsilon; exits 1 if a mode leaks more than claimed.

    Example: fedpriv audit --mechanism --grad-sample-mode bookkeeping --trials 20000
    """
    mechanism_only = {"--noise-multiplier": noise_multiplier, "--max-grad-norm": max_grad_norm, "--trials": trials,
                      "--grad-sample-mode": grad_sample_mode, "--sample-rate": sample_rate, "--delta": delta,
                      "--accountant": accountant, "--noise-scale": noise_scale, "--secure-mode": secure_mode or None}
    if mechanism:
        if run_dir is not None:
            raise UserInputError(f"--mechanism audits the DP-SGD step itself and takes no RUN_DIR (got {run_dir}); "
                                 "drop one of the two")
        from fedpriv.client.mechanism_audit import DEFAULT_MODES, DEFAULT_TRIALS, audit_mechanism, check_options

        options = dict(noise_multiplier=RunConfig.noise_multiplier if noise_multiplier is None else noise_multiplier,
                       max_grad_norm=RunConfig.max_grad_norm if max_grad_norm is None else max_grad_norm,
                       trials=DEFAULT_TRIALS if trials is None else trials, noise_scale=1.0 if noise_scale is None else noise_scale,
                       sample_rate=1.0 if sample_rate is None else sample_rate,
                       delta=RunConfig.delta if delta is None else delta, accountant=accountant or "rdp")
        modes = check_options(list(grad_sample_mode or DEFAULT_MODES), **options)  # before the heavy imports
        from fedpriv.simulations.audit import mechanism_notes, mechanism_table
        from fedpriv.simulations.console import console

        audits = [audit_mechanism(mode, **options, secure_mode=secure_mode, seed=seed) for mode in modes]
        console.print(mechanism_table(audits))
        for line in mechanism_notes(audits):
            console.print(line)
        console.print(f"time: {sum(a.seconds for a in audits):.1f} s")
        failed = [a.mode for a in audits if not a.passed]
        if failed:
            typer.echo(f"audit failed for {', '.join(failed)}: the step releases more than "
                       f"σ={options['noise_multiplier']:g} allows (see above)", err=True)
            raise typer.Exit(1)
        return
    given = [name for name, value in mechanism_only.items() if value is not None]
    if given:
        raise UserInputError(f"{', '.join(given)} only apply with --mechanism; a run audit takes RUN_DIR and --seed")
    if run_dir is None:
        raise UserInputError("give RUN_DIR (a finished run's folder) or --mechanism (audit the DP-SGD step itself)")
    from fedpriv.simulations.audit import AUDIT_FILE, audit_run, audit_table, notes
    from fedpriv.simulations.console import console

    result = audit_run(run_dir, seed=seed)
    console.print(audit_table(result))
    for line in notes(result):
        console.print(line)
    console.print(f"written: {run_dir / AUDIT_FILE}")


_PLAN = RunConfig()  # plan-budget's defaults are simulate's


@app.command("plan-budget")
@guarded
def plan_budget(
    dataset_size: Annotated[int, typer.Option("--dataset-size", help="Records of the client to plan for: the smallest one, which spends the most.")],
    target_epsilon: Annotated[Optional[float], typer.Option("--target-epsilon", help="Find the smallest noise multiplier that keeps epsilon <= this.")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option("--noise-multiplier", help="Compute the epsilon this noise multiplier gives.")] = None,
    delta: Annotated[float, typer.Option("--delta", help="Target delta; must be below 1/dataset-size.")] = _PLAN.delta,
    rounds: Annotated[int, typer.Option("--rounds", help="Federated rounds.")] = _PLAN.num_rounds,
    local_epochs: Annotated[int, typer.Option("--local-epochs", help="Local epochs per round.")] = _PLAN.local_epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Expected local batch size (Poisson: rate = batch/n).")] = _PLAN.batch_size,
    accountant: Annotated[str, typer.Option("--accountant", help="rdp, prv or gdp (gdp: CLT approximation, can underestimate epsilon).")] = _PLAN.accountant,
) -> None:
    """Plan a privacy budget: the noise a target epsilon needs, or the epsilon a noise multiplier gives.

    Give exactly one of --target-epsilon and --noise-multiplier. Assumes the client trains in every round (the worst case), with the accounting code training uses.

    Example: fedpriv plan-budget --target-epsilon 3 --dataset-size 1000 --rounds 20
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise UserInputError("give exactly one of --target-epsilon (to derive the noise) or --noise-multiplier "
                             "(to compute epsilon)")
    from rich.table import Table

    from fedpriv.common.accounting import plan_budget as make_plan
    from fedpriv.simulations.console import console

    plan = make_plan(dataset_size, target_epsilon=target_epsilon, noise_multiplier=noise_multiplier, rounds=rounds,
                     local_epochs=local_epochs, batch_size=batch_size, delta=delta, accountant=accountant)
    table = Table(title=f"{dataset_size} records, {rounds} rounds x {local_epochs} epochs, batch {batch_size}, "
                        f"delta={delta:g}, {accountant.upper()}")
    for column in ("noise multiplier", "sample rate", "steps/round", "total steps", "epsilon"):
        table.add_column(column, justify="right")
    table.add_row(f"{plan.noise_multiplier:.4g}", f"{plan.sample_rate:.4g}", str(plan.steps_per_round),
                  str(plan.total_steps), f"{plan.epsilon:.4g}")
    console.print(table)


@app.command()
@guarded
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, server.pem/.key and clients/client-<i>[.pub].")],
    host: Annotated[list[str], typer.Option("--host", help="Name or IP clients use to reach the server (repeat for several).")] = ["localhost", "127.0.0.1"],
    clients: Annotated[int, typer.Option("--clients", help="Number of client key pairs for SuperNode authentication.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Make a CA, a server certificate for the given hosts and one key pair per client."""
    from fedpriv.common.certificates import make_certificates

    # The operator's own processes (Control API, SuperExec) reach the SuperLink on loopback: always name it.
    host = list(dict.fromkeys([*host, "localhost", "127.0.0.1"]))
    paths = make_certificates(out, hosts=host, num_clients=clients, force=force)
    typer.echo(f"CA: {paths.ca_cert}\nserver: {paths.server_cert} (+ key, mode 0600) for {', '.join(host)}")
    typer.echo(f"clients: {len(paths.client_private_keys)} key pairs in {paths.client_private_keys[0].parent} "
               "(give client-<i> to data owner i; the server registers the .pub files)")


@app.command()
@guarded
@config_options
def server(
    cfg: RunConfig,
    certs: Annotated[Optional[Path], typer.Option("--certs", help="Folder made by 'fedpriv certs' (TLS + client keys).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address clients connect to (Fleet API only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port clients connect to.")] = 9092,
    control_port: Annotated[int, typer.Option("--control-port", help="Port of the Control API, on 127.0.0.1 only (operator; SSH-tunnel it from elsewhere).")] = 9093,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no client authentication (loopback only).")] = False,
) -> None:
    """Start the SuperLink (TLS + client authentication) and run the federated job on it.

    Clients join with 'fedpriv client'. Restarted with the same --run-dir, it resumes after the
    last complete round. Only the client keys in --certs are registered (by this command, at
    start); the Control API that registers keys and starts/stops runs answers on 127.0.0.1 only.
    """
    cfg.validate()
    from fedpriv.server.superlink import OPERATOR_HOST, ServerTLS, SuperLink, check_bind
    from fedpriv.server.run_dir import resolve_run_dir
    from fedpriv.simulations.console import ReportWatcher, console, results_table
    from fedpriv.server.preflight import preflight
    from fedpriv.common.processes import install_signal_handlers

    if certs is None and not insecure:
        fail("--certs is required (make them with 'fedpriv certs'); --insecure is for loopback tests only")
    tls = None
    if certs is not None and not insecure:
        from fedpriv.common.certificates import verify_server_certificate

        tls = ServerTLS(certs / "ca.crt", certs / "server.pem", certs / "server.key",
                        tuple(sorted((certs / "clients").glob("*.pub"))))
        verify_server_certificate(tls.ca_cert, tls.server_cert, tls.server_key)
        if not tls.client_public_keys:
            fail(f"--certs {certs} has no clients/*.pub keys to admit; run 'fedpriv certs --clients N'")
    check_bind(host, port, insecure, control_port, tls)
    cfg = preflight(cfg)
    if cfg.dp and cfg.target_epsilon > 0:
        console.print(f"noise multiplier {cfg.noise_multiplier:.4g} planned for target epsilon {cfg.target_epsilon:g} on "
                      "partitions of this server's own dataset. The server cannot know the owners' record counts or "
                      "past spending: each owner's own policy and ledger decide, and an owner that would exceed its "
                      "budget declines the round.")
    run_dir = resolve_run_dir(cfg)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    from fedpriv.server.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir)
    done = ckpt.server_round if ckpt else 0
    install_signal_handlers()
    link = SuperLink(run_dir, host, port, tls, control_port)
    try:
        link.start()
        link.register_keys()
        link.stop_unfinished_runs()  # a crashed server's run must not go on beside the resumed one
        console.print(f"server listening on {host}:{port} ({'TLS + client keys' if tls else 'INSECURE'}; "
                      f"Control API on {OPERATOR_HOST}:{control_port} only); "
                      + (f"resuming after round {done}; " if done else "")
                      + f"run folder {run_dir}")
        run_id = link.submit(cfg)
        with ReportWatcher(run_dir, cfg.num_rounds, done) as watcher:
            status = link.wait(run_id, poll=watcher.tick)
    finally:
        link.stop()
    if status != "finished:completed":
        fail(f"the run ended as '{status}'; see {run_dir / 'logs'} and 'flwr log' in {run_dir / 'flwr-home'}")
    from fedpriv.server.report import RunReport

    console.print(results_table(RunReport.load(run_dir)))
    console.print(f"run folder: {run_dir}")


@app.command()
@guarded
def client(
    server: Annotated[str, typer.Option("--server", help="HOST:PORT of 'fedpriv server'.")],
    data: Annotated[str, typer.Option("--data", help="Your records: npz:PATH, csv:PATH, parquet:PATH or images:DIR (the run sets --label-column, --categories, --image-size); or partition:I/N of the run's dataset.")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where this data owner's privacy ledger lives (one ledger per folder).")],
    budget_epsilon: Annotated[float, typer.Option("--budget-epsilon", help="Total epsilon this owner allows over every round it ever trains; rounds that would exceed it are declined ('inf' = no budget).")] = DEFAULT_BUDGET,
    min_noise_multiplier: Annotated[float, typer.Option("--min-noise-multiplier", help="Decline rounds whose DP-SGD noise multiplier is below this.")] = DEFAULT_MIN_NOISE,
    delta: Annotated[float, typer.Option("--delta", help="This owner's delta; the server's is ignored. Must be below 1/(records).")] = DEFAULT_DELTA,
    accountant: Annotated[str, typer.Option("--accountant", help="Accountant that decides the budget: rdp or prv (upper bounds).")] = "rdp",
    poisson_sampling: Annotated[bool, typer.Option("--poisson-sampling/--no-poisson-sampling", help="Poisson batch sampling (amplified accounting), or a fixed partition per epoch (accounted without amplification).")] = True,
    allow_no_dp: Annotated[bool, typer.Option("--allow-no-dp", help="Let the server switch DP off for this owner (its updates then carry no privacy guarantee).")] = False,
    secure_mode: Annotated[bool, typer.Option("--secure-mode", help="Always draw DP noise and batches from the OS' CSPRNG, whatever the server asks.")] = False,
    name: Annotated[str, typer.Option("--name", help="Name shown in the server's report.")] = "",
    ca: Annotated[Optional[Path], typer.Option("--ca", help="CA certificate (ca.crt from 'fedpriv certs').")] = None,
    key: Annotated[Optional[Path], typer.Option("--key", help="This client's private key (clients/client-<i>).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (loopback tests only).")] = False,
    local_port: Annotated[int, typer.Option("--local-port", help="Port of the SuperNode's local API (0 = any free one).")] = 0,
    max_wait: Annotated[float, typer.Option("--max-wait", help="Longest wait in seconds between reconnection attempts.")] = 60.0,
    max_retries: Annotated[int, typer.Option("--max-retries", help="Give up after this many failed connection attempts (0 = never).")] = 0,
) -> None:
    """Join a federation as one data owner: a Flower SuperNode with this owner's data, ledger and privacy policy.

    The policy is enforced here, on the owner's machine: a round the server asks for that the policy
    does not allow (no DP, too little noise, over the budget) is declined, and the server's report says why.
    """
    from fedpriv.client.ledger import client_lock
    from fedpriv.client.owner_policy import OwnerPolicy
    from fedpriv.client.supernode import ClientSpec, parse_server, preflight, run_supernode, supernode_argv
    from fedpriv.common.processes import free_port

    if not insecure and (ca is None or key is None):
        fail("--ca and --key are required (from 'fedpriv certs'); --insecure is for loopback tests only")
    host, _ = parse_server(server)
    check_port("local-port", local_port, zero_means="any free one")
    if insecure:
        from fedpriv.server.superlink import is_loopback

        if not is_loopback(host):
            fail(f"--insecure is only allowed against a loopback server (got {host}); use --ca and --key")
    policy = OwnerPolicy(require_dp=not allow_no_dp, delta=delta, accountant=accountant,
                         poisson_sampling=poisson_sampling, min_noise_multiplier=min_noise_multiplier,
                         budget_epsilon=budget_epsilon, secure_mode=secure_mode).validate()
    spec = ClientSpec(server=server, data=data, state_dir=state_dir, policy=policy,
                      name=name or state_dir.resolve().name, ca_cert=None if insecure else ca,
                      private_key=None if insecure else key, local_port=local_port or free_port())
    preflight(spec)
    argv = supernode_argv(spec) + ["--max-wait-time", str(max_wait)]
    if max_retries > 0:
        argv += ["--max-retries", str(max_retries)]
    with client_lock(state_dir):  # one running client per state folder
        typer.echo(f"owner policy: {policy.describe()}")
        code, reason = run_supernode(argv, insecure=insecure)
    if code != 0:
        fail(reason)


@app.command()
@guarded
def budget(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The data owner's state folder (as given to 'fedpriv client').")],
    noise_multiplier: Annotated[Optional[float], typer.Option("--noise-multiplier", help="With --local-epochs and --batch-size: how many more rounds of this configuration fit.")] = None,
    local_epochs: Annotated[int, typer.Option("--local-epochs", help="Local epochs per round of the planned configuration.")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Expected batch size of the planned configuration.")] = 64,
    records: Annotated[Optional[int], typer.Option("--records", help="Records of the planned rounds (default: the last release's).")] = None,
    budget_epsilon: Annotated[Optional[float], typer.Option("--budget-epsilon", help="Budget to compare with (default: the ledger's policy).")] = None,
    delta: Annotated[Optional[float], typer.Option("--delta", help="Delta (default: the ledger's policy).")] = None,
    accountant: Annotated[Optional[str], typer.Option("--accountant", help="rdp or prv (default: the ledger's policy).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of cumulative epsilon per release.")] = None,
) -> None:
    """Show a data owner's privacy ledger: every release, cumulative epsilon, the budget left, declined rounds.

    Reads safely while 'fedpriv client' runs (the ledger is only ever replaced atomically).
    Example: fedpriv budget --state-dir ~/owner-state --noise-multiplier 1.5 --local-epochs 2 --batch-size 64
    """
    import json as json_module

    from fedpriv.simulations.budget_view import budget_summary, budget_table, plot_budget

    summary = budget_summary(state_dir, noise_multiplier=noise_multiplier, local_epochs=local_epochs,
                             batch_size=batch_size, records=records, budget_epsilon=budget_epsilon, delta=delta,
                             accountant=accountant)
    if plot is not None:
        plot_budget(summary, plot)
    if as_json:
        from fedpriv.common.atomic_io import _json_safe

        typer.echo(json_module.dumps(_json_safe(summary), indent=2))
        return
    from fedpriv.simulations.console import console

    for renderable in budget_table(summary):
        console.print(renderable)
    if plot is not None:
        console.print(f"written: {plot}")


@app.command()
@guarded
@config_options
def federation(cfg: RunConfig) -> None:
    """Launch the server and --num-clients clients as separate processes on 127.0.0.1 (TLS, fresh keys).

    Each process logs to <run-dir>/logs/; all of them are stopped at the end, on error and on Ctrl-C.
    """
    cfg.validate()
    from fedpriv.server.report import RunReport
    from fedpriv.server.run_dir import resolve_run_dir
    from fedpriv.simulations.console import ReportWatcher, console, results_table
    from fedpriv.simulations.federation import LocalFederation
    from fedpriv.server.preflight import preflight
    from fedpriv.common.processes import install_signal_handlers

    cfg = preflight(cfg)
    run_dir = resolve_run_dir(cfg)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    install_signal_handlers()
    console.print(f"[bold]fedpriv federation[/]: 1 server + {cfg.num_clients} client processes on 127.0.0.1, "
                  f"logs in {run_dir / 'logs'}")
    with LocalFederation(cfg, run_dir) as fed:
        fed.start()
        with ReportWatcher(run_dir, cfg.num_rounds) as watcher:
            code = fed.wait(on_tick=watcher.tick)
    if code != 0:
        fail(f"the server exited with code {code}; see {run_dir / 'logs' / 'server.log'}")
    console.print(results_table(RunReport.load(run_dir)))
    console.print(f"run folder: {run_dir}")


def main() -> None:
    try:
        app()
    finally:
        fast_exit()


if __name__ == "__main__":
    sys.exit(main())
