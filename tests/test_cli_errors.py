"""Bad input through the real command line: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import numpy as np
import pytest


def assert_clean_error(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def npz_files(tmp_path):
    rng = np.random.default_rng(0)
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=rng.normal(size=(50, 8, 8)).astype(np.float32))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    no_x = tmp_path / "no_x.npz"
    np.savez(no_x, features=np.zeros((10, 4)))
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, x=rng.normal(size=(12, 4, 4)).astype(np.float32), y=np.arange(12) % 2)
    huge_labels = tmp_path / "huge_labels.npz"  # a label of 1e9 once made the model ask for 512 GB
    np.savez(huge_labels, x=rng.normal(size=(40, 8)).astype(np.float32), y=np.array([0, 1, 2, 1_000_000_000] * 10))
    return {"unlabelled": unlabelled, "garbage": garbage, "no_x": no_x, "tiny": tiny, "huge_labels": huge_labels}


@pytest.mark.parametrize("args, needles", [
    (["--model", "transformer"], ["--model", "transformer"]),
    (["--dataset", "cifar"], ["--dataset", "cifar"]),
    (["--noise-multiplier", "-1"], ["--noise-multiplier", "--no-dp"]),
    (["--noise-multiplier", "0"], ["--noise-multiplier"]),
    (["--delta", "1.5"], ["--delta"]),
    (["--delta", "0"], ["--delta"]),
    (["--num-clients", "5000"], ["--num-clients"]),
    (["--accountant", "moments"], ["--accountant"]),
    (["--partitioning", "random"], ["--partitioning"]),
    (["--min-clients", "20", "--num-clients", "10"], ["--min-clients"]),
])
def test_bad_options(fedpriv, tmp_path, args, needles):
    result = fedpriv("simulate", "--run-dir", str(tmp_path / "run"), *args, timeout=120)
    assert_clean_error(result, *needles)
    assert not (tmp_path / "run" / "report.json").exists()


def _bad_dataset_cases(tmp_path, npz_files):
    return [
        (["--dataset", f"npz:{tmp_path / 'missing.npz'}"], ["not found"]),
        (["--dataset", f"npz:{npz_files['garbage']}"], ["not a readable .npz"]),
        (["--dataset", f"npz:{npz_files['no_x']}"], ["no array named 'x'"]),
        (["--dataset", f"npz:{npz_files['unlabelled']}", "--model", "cnn"], ["--model cnn", "labels"]),
        (["--dataset", f"npz:{npz_files['tiny']}", "--num-clients", "10"], ["--num-clients"]),
        (["--dataset", f"npz:{npz_files['huge_labels']}"],
         [str(npz_files["huge_labels"]), "up to 1000000000", "at most 1000 classes", "0..3"]),
    ]


def test_bad_datasets(fedpriv_in_process, tmp_path, npz_files):
    """Each case through the same ``fedpriv simulate`` command in this process (a child per case spent
    ~15 s loading torch); the test below runs the data case that once crashed as a real child process."""
    for args, needles in _bad_dataset_cases(tmp_path, npz_files):
        assert_clean_error(fedpriv_in_process("simulate", "--run-dir", str(tmp_path / "run"), *args), *needles)
        assert not (tmp_path / "run" / "report.json").exists()


def test_bad_dataset_in_a_real_process(fedpriv, tmp_path, npz_files):
    args, needles = _bad_dataset_cases(tmp_path, npz_files)[-1]  # huge labels: once asked for 512 GB
    assert_clean_error(fedpriv("simulate", "--run-dir", str(tmp_path / "run"), *args, timeout=120), *needles)


@pytest.mark.parametrize("args, needles", [
    (["--port", "99999"], ["--port must be a port number in 1..65535", "99999"]),  # was: unexpected OverflowError
    (["--port", "0"], ["--port must be a port number", "(got 0)"]),                # was: Flower's argparse text
    (["--port", "-1"], ["--port must be a port number"]),
    (["--control-port", "0"], ["--control-port must be a port number", "(got 0)"]),
    (["--control-port", "99999"], ["--control-port must be a port number", "99999"]),
])
def test_bad_server_ports(fedpriv_in_process, tmp_path, args, needles):
    """Checked before anything binds or starts: one line naming the option, exit 2, no run folder.
    In this process (the child spent ~8 s importing); ``test_bad_ports_in_real_processes`` runs children."""
    result = fedpriv_in_process("server", "--insecure", "--run-dir", str(tmp_path / "run"), *args)
    assert_clean_error(result, *needles)
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_bad_client_local_port(fedpriv_in_process, tmp_path, port):
    """Checked before the SuperNode starts (it once failed as a misleading 'TLS handshake' line)."""
    result = fedpriv_in_process("client", "--insecure", "--server", "127.0.0.1:9", "--data", "partition:0/2",
                                "--state-dir", str(tmp_path / "state"), "--local-port", port)
    assert_clean_error(result, "--local-port must be a port number in 1..65535, or 0 for any free one", port)


def test_bad_ports_in_real_processes(fedpriv, tmp_path):
    """One server and one client case as real ``fedpriv`` child processes: exit 2, one line, nothing started."""
    result = fedpriv("server", "--insecure", "--run-dir", str(tmp_path / "run"), "--port", "99999", timeout=120)
    assert_clean_error(result, "--port must be a port number in 1..65535", "99999")
    assert not (tmp_path / "run" / "report.json").exists()
    result = fedpriv("client", "--insecure", "--server", "127.0.0.1:9", "--data", "partition:0/2",
                     "--state-dir", str(tmp_path / "state"), "--local-port", "99999", timeout=120)
    assert_clean_error(result, "--local-port must be a port number in 1..65535, or 0 for any free one", "99999")


def test_unwritable_run_dir(fedpriv, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = fedpriv("simulate", "--run-dir", str(blocker / "run"), timeout=120)
    assert_clean_error(result, "--run-dir", "not writable")


def test_report_of_missing_run(fedpriv, tmp_path):
    assert_clean_error(fedpriv("report", str(tmp_path), timeout=60), "report.json")


def test_help_documents_every_option(fedpriv):
    from dataclasses import fields

    from fedpriv.common.config import RunConfig

    result = fedpriv("simulate", "--help", timeout=60)
    assert result.returncode == 0
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag[:18] in result.stdout, flag
