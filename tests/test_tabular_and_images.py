"""Data owners' tables (csv:PATH) and image folders (images:DIR): loading, standardisation, models, errors.

Every test builds its own files in ``tmp_path``: CSV with the stdlib csv module, images with Pillow.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.validators import ModuleValidator
from PIL import Image

from fedpriv.client.dp_training import RoundRandomness, train_round
from fedpriv.client.local_data import local_data
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import load_dataset, owner_records
from fedpriv.common.errors import DataError, UserInputError
from fedpriv.common.evaluation import evaluate
from fedpriv.common.models import build_model, check_fit, model_from_config
from fedpriv.common.tabular import check_owner_file, column_stats


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_csv(path: Path, n: int = 240, *, label: bool = True, seed: int = 0, shift: float = 0.0) -> Path:
    """Two numeric columns that predict a yes/no label, and a categorical colour."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["age", "income", "color", *(["label"] if label else [])])
        for i in range(n):
            lab = i % 2
            w.writerow([f"{40 + shift + 8 * (2 * lab - 1) + rng.normal() * 3:.3f}",
                        f"{2000 + shift * 100 + 900 * (2 * lab - 1) + rng.normal() * 300:.1f}",
                        ["red", "blue", "green"][i % 3], *([["no", "yes"][lab]] if label else [])])
    return path


def write_images(root: Path, per_class: int = 40, classes=("cat", "dog")) -> Path:
    """Class 0 reddish, class 1 bluish; mixed sizes and modes (RGB, L, RGBA), PNG and JPEG."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (20, 24) if i % 2 else (16, 16)
            base = np.zeros((h, w, 3))
            base[..., 0 if c == 0 else 2] = 180
            pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            if i % 7 == 6:
                img.save(root / name / f"{i}.jpg")
            else:
                img.convert("RGBA" if i % 5 == 3 else "L" if i % 5 == 4 else "RGB").save(root / name / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------- loading
def test_csv_loads_with_one_hot_categories_and_string_labels(tmp_path):
    data = load_dataset(f"csv:{write_csv(tmp_path / 'd.csv')}", label_column="label")
    assert data.input_shape == (5,)  # age, income, then one-hot blue, green, red (sorted)
    assert data.num_classes == 2 and set(np.unique(data.y_train)) == {0, 1}  # "no" -> 0, "yes" -> 1
    assert data.standardise_columns == (0, 1)
    assert set(np.unique(data.x_train[:, 2:])) == {0.0, 1.0}
    assert np.allclose(data.x_train[:, 2:].sum(axis=1), 1)
    for x in (data.x_train, data.x_test):  # each set standardised with its own statistics
        assert np.allclose(x[:, :2].mean(axis=0), 0, atol=1e-5) and np.allclose(x[:, :2].std(axis=0), 1, atol=1e-4)


def test_images_load_resized_to_rgb(tmp_path):
    data = load_dataset(f"images:{write_images(tmp_path / 'imgs')}", image_size=12)
    assert data.input_shape == (3, 12, 12) and data.num_classes == 2
    assert len(data.x_train) + len(data.x_test) == 80
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_each_simulated_client_standardises_with_its_own_statistics(tmp_path):
    path = tmp_path / "d.csv"
    write_csv(path)
    cfg = RunConfig(model="mlp", dataset=f"csv:{path}", label_column="label", num_clients=2,
                    partitioning="shards", classes_per_client=1).validate()
    full = load_dataset(cfg.dataset, label_column="label")
    raw_parts = []
    for pid in (0, 1):
        mine = local_data(cfg, {wire.NODE_PARTITION_ID: pid, wire.NODE_NUM_PARTITIONS: 2})
        assert np.allclose(mine.x[:, :2].mean(axis=0), 0, atol=1e-5)
        assert np.allclose(mine.x[:, :2].std(axis=0), 1, atol=1e-4)
        raw_parts.append(mine)
    # The two partitions (one class each) have clearly different raw statistics: un-standardising
    # with the whole set's would not give mean 0 for both, so each used its own.
    whole = full.x_train[:, :2]
    labels = [np.unique(p.y) for p in raw_parts]
    assert [len(l) for l in labels] == [1, 1] and labels[0] != labels[1]
    means = [column_stats(whole[full.y_train == l[0]], (0, 1))[0] for l in labels]
    assert np.all(np.abs(means[0] - means[1]) > 0.5)


def test_owner_csv_statistics_never_leave_the_owner(tmp_path, task_identity):
    path = write_csv(tmp_path / "mine.csv", n=120, shift=7.0)
    raw = np.array([[float(r["age"]), float(r["income"])] for r in csv.DictReader(open(path))])
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    schema = json.dumps({"color": ["blue", "green", "red"], "label": ["no", "yes"]})
    asked = RunConfig(model="mlp", dataset="digits", label_column="label", categories=schema, local_epochs=1,
                      batch_size=30, noise_multiplier=1.0)
    x, _, classes = owner_records(f"csv:{path}", label_column="label", categories=schema)
    assert np.allclose(x[:, :2].mean(axis=0), 0, atol=1e-5) and classes == 2
    model = model_from_config(asked, (5,), 2, seed=0)
    config = ConfigRecord({**asked.to_dict(kebab=True), "server-round": 1, "run-uid": "run-t",
                           wire.RUN_CLASSES: 2, wire.RUN_INPUT_SHAPE: [5]})
    msg = Message(RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: config}),
                  dst_node_id=1, message_type="train")
    from fedpriv.client.app import train_for_owner

    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={wire.NODE_DATA_PATH: f"csv:{path}", wire.NODE_STATE_DIR: str(tmp_path / "state"),
                                   wire.NODE_CLIENT_NAME: "owner"})
    reply = train_for_owner(msg, context, __import__("fedpriv.client.owner_policy", fromlist=["OwnerPolicy"]).OwnerPolicy())
    assert wire.ARRAYS in reply.content.array_records, "the owner's round should have trained"
    sent = []
    for record in [*reply.content.config_records.values(), *reply.content.metric_records.values()]:
        for value in record.values():
            sent += [float(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, (int, float))]
    for stat in (*mean, *std):
        assert not any(np.isclose(v, stat, rtol=1e-4) for v in sent), stat


# ------------------------------------------------------------------------ models learn under DP
def _learns(family, data, *, epochs, lr, batch, drop, **extra):
    torch.manual_seed(0)
    x = np.ascontiguousarray(data.x_train)
    y = np.ascontiguousarray(data.y_train)
    labels = None if family == "autoencoder" else y
    cfg = RunConfig(model=family, local_epochs=epochs, batch_size=batch, learning_rate=lr, noise_multiplier=0.5,
                    max_grad_norm=1.0, **extra).validate()
    check_fit(family, data.input_shape, data.labelled, data.name)
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=0)
    assert ModuleValidator.validate(model, strict=True) == []
    before = evaluate(model, family, x, labels)["loss"]
    model.train()
    result = train_round(model, x, y, cfg, prior_history=[], rng=RoundRandomness.seeded(0))
    after = evaluate(model, family, x, labels)["loss"]
    assert np.isfinite(after) and after < before - drop, (before, after)
    assert result.noise_multiplier == 0.5 and 0 < result.epsilon < np.inf


@pytest.mark.parametrize("family, drop", [("mlp", 0.2), ("autoencoder", 0.05)])
def test_family_learns_on_csv(tmp_path, family, drop):
    path = write_csv(tmp_path / "d.csv", label=family == "mlp")
    data = load_dataset(f"csv:{path}", label_column="label" if family == "mlp" else "")
    assert data.labelled == (family == "mlp")
    _learns(family, data, epochs=5, lr=0.1, batch=32, drop=drop)


@pytest.mark.parametrize("family, drop", [("cnn", 0.1), ("autoencoder", 0.005)])
def test_family_learns_on_images(tmp_path, family, drop):
    data = load_dataset(f"images:{write_images(tmp_path / 'imgs')}", image_size=8)
    _learns(family, data, epochs=5, lr=0.1, batch=16, drop=drop)


def test_cnn_and_rnn_refuse_a_table_with_a_hint_to_use_mlp():
    with pytest.raises(UserInputError, match="use --model mlp"):
        check_fit("cnn", (5,), True, "csv:d.csv")
    with pytest.raises(UserInputError, match="set --label-column"):
        check_fit("mlp", (5,), False, "csv:d.csv")
    assert tuple(build_model("mlp", (5,), 3)(torch.randn(4, 5)).shape) == (4, 3)


# ----------------------------------------------------------------------------- the real CLI
def test_simulate_csv_mlp_through_the_cli(tmp_path, fedpriv):
    path = write_csv(tmp_path / "d.csv", n=120)
    result = fedpriv("simulate", "--dataset", f"csv:{path}", "--label-column", "label", "--model", "mlp",
                     "--num-clients", "2", "--num-rounds", "1", "--local-epochs", "1", "--batch-size", "16",
                     "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "run").is_dir()


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = write_csv(tmp_path / "good.csv", n=60)
    missing = tmp_path / "missing.csv"
    missing.write_text("age,label\n3,0\n,1\n4,\n,0\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    labels = tmp_path / "labels.csv"
    labels.write_text("age,label\n1,0\n2,1.5\n3,0\n")
    typo = tmp_path / "typo.csv"
    typo.write_text("age,label\n1,0\n2O,1\n3,0\n4,1\n")
    imgs = tmp_path / "imgs"
    (imgs / "cat").mkdir(parents=True)
    (imgs / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(imgs / "cat" / "a.png")
    noclasses = tmp_path / "flat"
    noclasses.mkdir()
    Image.new("RGB", (8, 8)).save(noclasses / "a.png")
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "b").mkdir()
    Image.new("RGB", (8, 8)).save(broken / "a" / "x.png")
    (broken / "b" / "y.png").write_bytes(b"not a png")
    base = ["--num-clients", "2", "--num-rounds", "1"]
    return [
        (["--dataset", f"csv:{good}", "--label-column", "nope", "--model", "mlp"], "no column 'nope'"),
        (["--dataset", f"csv:{missing}", "--label-column", "label", "--model", "mlp"], "column 'age' has 2 missing values"),
        (["--dataset", f"csv:{empty}", "--model", "autoencoder"], "file is empty"),
        (["--dataset", f"csv:{labels}", "--label-column", "label", "--model", "mlp"], "non-integer labels"),
        (["--dataset", f"csv:{typo}", "--label-column", "label", "--model", "mlp"], "'2O' (record 2) is not a number"),
        (["--dataset", f"csv:{good}", "--model", "cnn", "--label-column", "label"], "use --model mlp"),
        (["--dataset", f"images:{imgs}", "--model", "cnn"], "class folder with no images"),
        (["--dataset", f"images:{noclasses}", "--model", "cnn"], "no class folders"),
        (["--dataset", f"images:{broken}", "--model", "cnn", "--image-size", "8"], "not a readable image"),
        (["--dataset", f"parquet:{tmp_path / 'x.parquet'}", "--model", "mlp"], "parquet"),
    ], base


def _assert_one_line_exit_2(args, expected, returncode, stdout, stderr):
    err = stderr.strip()
    assert returncode == 2, (args, stdout[-1000:], err[-1000:])
    assert len(err.splitlines()) == 1 and expected in err, (args, err)


def test_each_bad_input_is_one_line_and_exit_2(tmp_path, fedpriv_in_process):
    """Every case through the real ``fedpriv simulate`` command, in this process (a child per case cost
    ~7 s of start-up each); the next test runs a table and an image folder case as real child processes."""
    cases, base = _bad_inputs(tmp_path)
    for args, expected in cases:
        result = fedpriv_in_process("simulate", *args, *base, "--run-dir", str(tmp_path / "run"))
        _assert_one_line_exit_2(args, expected, result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("which", ["csv", "images"])
def test_a_bad_table_and_a_bad_image_folder_fail_as_one_line_and_exit_2_in_a_real_process(tmp_path, fedpriv, which):
    """Process level: the real ``fedpriv`` child exits 2 with exactly one line on stderr (no warning,
    no traceback from an import), for a table (csv loader) and an image folder (Pillow loader)."""
    cases, base = _bad_inputs(tmp_path)
    args, expected = next((a, e) for a, e in cases if a[1].startswith(f"{which}:") and "good" not in a[1])
    result = fedpriv("simulate", *args, *base, "--run-dir", str(tmp_path / "run"), timeout=120)
    _assert_one_line_exit_2(args, expected, result.returncode, result.stdout, result.stderr)


def test_owner_preflight_and_records_give_one_line_errors(tmp_path):
    cases, _ = _bad_inputs(tmp_path)
    for args, expected in cases:
        spec = args[1]
        if spec.startswith("csv:") and "good" in spec:
            continue  # a run-level mistake (label column, model), not a file-level one
        with pytest.raises(DataError) as err:
            owner_records(spec, label_column="label", image_size=8)
        assert "\n" not in str(err.value) and expected in str(err.value), (spec, err.value)
        if spec.startswith("images:") or "missing" in spec or "empty" in spec:  # file-level: caught before connecting
            with pytest.raises(DataError, match=expected):
                check_owner_file(spec)


def test_an_owner_never_reads_a_categories_file_the_server_names(tmp_path, monkeypatch):
    """The schema arrives in the server's run config: a path there must not make the owner open a file."""
    data = write_csv(tmp_path / "owner.csv")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"color": ["red", "blue", "green"], "label": ["no", "yes"]}))
    opened = []
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: opened.append(self) or real_read_text(self, *a, **k))
    with pytest.raises(DataError, match="inline JSON object"):
        owner_records(f"csv:{data}", label_column="label", categories=str(secret))
    assert secret not in opened
    inline = secret.read_text()
    x, y, classes = owner_records(f"csv:{data}", label_column="label", categories=inline)
    assert classes == 2 and len(x) == 240
