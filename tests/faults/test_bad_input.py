"""Bad input: each case gets a message naming the problem and the file or key.

One row per case. Config cases (unknown metric names, out-of-range values, contradicting
directions, ...) are the table in tests/search/test_config_checks.py; sweeper settings are
in tests/hydra_plugins; these rows are data, images, models and prediction.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.build import build_data
from data.loaders import find_undecodable, load_npz, scan_folder
from data.pipeline import preprocess_for_model
from search import predict as pr
from search.model_registry.model_store import load_exported

U8 = np.uint8


def images(n: int, size: int = 28) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, size, size), dtype=U8)


def labels(n: int) -> np.ndarray:
    return (np.arange(n) % 2).reshape(-1, 1)


# (case, npz arrays, error type, text the message must contain)
BAD_NPZ = [
    ("missing images key", {"train_labels": labels(4)}, ValueError,
     "has 'train_labels' but no 'train_images'"),
    ("mismatched lengths", {"train_images": images(5), "train_labels": labels(3),
                            "val_images": images(4), "val_labels": labels(4)},
     ValueError, "'train_labels' has 3 labels but 'train_images' has 5"),
    ("float pixels", {"train_images": images(4).astype("float32") / 255,
                      "train_labels": labels(4)}, ValueError, "uint8 0-255"),
    ("negative label", {"train_images": images(4), "train_labels": -labels(4)}, ValueError,
     "negative label"),
]


@pytest.mark.parametrize(("case", "arrays", "error", "message"), BAD_NPZ,
                         ids=[row[0] for row in BAD_NPZ])
def test_bad_npz_names_file_and_key(make_npz, case, arrays, error, message):
    path = make_npz(**arrays)
    with pytest.raises(error, match=message) as caught:
        load_npz(path)
    assert path.name in str(caught.value) or "'train" in str(caught.value)


def test_missing_and_non_npz_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz.*data.path"):
        load_npz(tmp_path / "nope.npz")
    fake = tmp_path / "fake.npz"
    fake.write_text("not numpy")
    with pytest.raises(ValueError, match="fake.npz is not a readable .npz") as caught:
        load_npz(fake)
    assert "allow_pickle" not in str(caught.value)  # never advise the unsafe option


def test_dataset_smaller_than_one_batch_still_trains_one_partial_batch(make_npz):
    path = make_npz(train_images=images(24), train_labels=labels(24),
                    val_images=images(8), val_labels=labels(8))
    bundle = build_data(path=path, batch_size=64, test_fraction=0.25, seed=0)
    assert bundle.steps_per_epoch == 1
    batch_x, _ = next(iter(bundle.train))[:2]
    assert 0 < batch_x.shape[0] <= 64


def write_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    gray = images(1, 64)[0]
    files = {
        "ok.jpeg": lambda p: Image.fromarray(gray).save(p),
        "rgba.png": lambda p: Image.fromarray(gray).convert("RGBA").save(p),
        "16bit.png": lambda p: Image.fromarray(gray.astype("uint16") * 257).save(p),
        "cmyk.jpeg": lambda p: Image.fromarray(gray).convert("CMYK").save(p),
        "zero.jpeg": lambda p: p.write_bytes(b""),
        "notes.jpeg": lambda p: p.write_text("not an image"),
    }
    paths = {}
    for name, write in files.items():
        write(folder / name)
        paths[name] = folder / name
    ok = paths["ok.jpeg"].read_bytes()
    paths["truncated.jpeg"] = folder / "truncated.jpeg"
    paths["truncated.jpeg"].write_bytes(ok[: len(ok) // 2])
    return paths


def test_odd_images_are_converted_or_skipped_by_name(tmp_path):
    paths = write_images(tmp_path / "imgs")
    bad = {p.name for p in find_undecodable(sorted(paths.values()))}
    assert bad == {"zero.jpeg", "notes.jpeg", "truncated.jpeg"}  # skipped, by name
    reference = preprocess_for_model(paths["ok.jpeg"].read_bytes(), 28, 1).numpy()
    for name in ("rgba.png", "16bit.png", "cmyk.jpeg"):  # converted, not rejected
        for channels in (1, 3):
            x = preprocess_for_model(paths[name].read_bytes(), 28, channels).numpy()
            assert x.shape == (28, 28, channels) and x.std() > 0
            # the same picture as the plain gray JPEG (JPEG loss aside)
            assert abs(x.mean(axis=-1) - reference[..., 0]).mean() < 0.02, name


def test_huge_images_are_shrunk_before_the_float_work():
    import tensorflow as tf

    from data.pipeline import HUGE_SIDE, shrink_huge

    big = tf.fill((HUGE_SIDE * 2 + 10, HUGE_SIDE // 2, 1), tf.constant(200, tf.uint8))
    small = shrink_huge(big, 28)
    assert small.shape[0] == HUGE_SIDE and small.dtype == tf.uint8
    assert int(tf.reduce_min(small)) == 200 == int(tf.reduce_max(small))
    usual = tf.zeros((3000, 2500, 1), tf.uint8)
    assert shrink_huge(usual, 224).shape == usual.shape  # usual X-rays: untouched


def test_folder_with_odd_files_warns_once_naming_them(tmp_path):
    root = tmp_path / "data"
    write_images(root / "NORMAL")
    write_images(root / "PNEUMONIA")
    (root / "PNEUMONIA" / "loop").symlink_to(root / "PNEUMONIA" / "loop")  # a symlink loop
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = scan_folder(root)
    text = " ".join(str(w.message) for w in caught)
    assert "skipped 6 file" in text and "truncated.jpeg" in text and "cmyk" not in text
    assert sorted(data.class_names) == ["normal", "pneumonia"]


@pytest.mark.parametrize(("layout", "message"), [
    ("missing", "data.root not found"),
    ("empty_class", "empty class folder"),
    ("one_class", "only one class folder"),
])
def test_bad_folders(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        write_images(root / "PNEUMONIA")
        if layout == "empty_class":
            (root / "NORMAL").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        scan_folder(root)


def mlflow_folder(folder: Path, model) -> Path:
    """A bare MLflow Keras model folder as the trainer logs one (MLmodel + .keras)."""
    (folder / "data").mkdir(parents=True)
    model.save(folder / "data" / "model.keras")
    (folder / "MLmodel").write_text(
        "flavors:\n  keras:\n    data: data\n    save_exported_model: false\n"
        "metadata:\n  class_names: [normal, pneumonia]\n"
        "  preprocessing: {image_size: 28, channels: 1}\n  threshold: 0.5\n"
    )
    return folder


def test_lambda_layer_model_is_refused_by_safe_mode(tmp_path):
    import keras

    inputs = keras.Input((28, 28, 1))
    outputs = keras.layers.Lambda(lambda x: keras.ops.mean(x, axis=(1, 2, 3))[:, None])(inputs)
    folder = mlflow_folder(tmp_path / "lambda", keras.Model(inputs, outputs))
    with pytest.raises(ValueError, match="safe mode.*Lambda"):
        load_exported(folder)
    assert pr.main([str(folder), str(tmp_path)]) == 2


def test_predict_fails_when_every_input_is_unreadable(tmp_path, capsys):
    import keras

    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.Flatten()(inputs)))
    folder = mlflow_folder(tmp_path / "model", model)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpeg").write_text("nope")
    (bad / "b.png").write_bytes(b"")
    assert pr.main([str(folder), str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 input(s) could be read" in err and "a.jpeg" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pr.main([str(folder), str(empty), "--out", str(tmp_path / "out2")]) == 2
    assert "no image files" in capsys.readouterr().err
    good = tmp_path / "good"
    write_images(good)
    assert pr.main([str(folder), str(good), "--out", str(tmp_path / "out3")]) == 0
    rows = (tmp_path / "out3" / "predictions.csv").read_text().splitlines()
    skipped = (tmp_path / "out3" / "skipped.csv").read_text()
    assert len(rows) == 1 + 4 and "truncated.jpeg" in skipped  # ok, rgba, 16bit, cmyk
    assert "cmyk" not in skipped


def test_predict_never_clobbers_and_checks_the_input_shape(tmp_path, capsys):
    import keras

    def model(size: int):
        inputs = keras.Input((size, size, 1))
        return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(
            keras.layers.Flatten()(inputs)))

    folder = mlflow_folder(tmp_path / "model", model(28))
    good = tmp_path / "good"
    write_images(good)
    out = tmp_path / "out"
    assert pr.main([str(folder), str(good), "--out", str(out)]) == 0
    before = (out / "predictions.csv").read_text()
    assert pr.main([str(folder), str(good), "--out", str(out)]) == 2
    assert "already holds predictions.csv; pass --overwrite" in capsys.readouterr().err
    assert (out / "predictions.csv").read_text() == before
    assert pr.main([str(folder), str(good), "--out", str(out), "--overwrite"]) == 0

    wrong = mlflow_folder(tmp_path / "wrong", model(64))  # metadata says 28 px
    assert pr.main([str(wrong), str(good), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "takes inputs of shape (64, 64, 1)" in err and "(28, 28, 1)" in err


@pytest.mark.slow
def test_pull_never_replaces_another_versions_export(registry_store, tmp_path, capsys):
    from search import pull
    from search.model_registry import registration as registry

    registry.register_and_promote(registry_store.runs.good_run_id)
    registry.register_and_promote(registry_store.runs.poor_run_id)  # -> challenger
    folder = tmp_path / "export"
    uri = ["--tracking-uri", registry_store.uri]
    assert pull.main(["--out", str(folder), *uri]) == 0  # champion, v1
    assert pull.main(["--out", str(folder), *uri]) == 0  # the same version: refreshed
    assert pull.main(["--alias", "challenger", "--out", str(folder), *uri]) == 2
    assert "holds pneumonia-cnn v1, not pneumonia-cnn v2; pass another --out, or --force" in (
        capsys.readouterr().err)
    assert json.loads((folder / "model_info.json").read_text())["version"] == 1
    assert pull.main(["--alias", "challenger", "--out", str(folder), "--force", *uri]) == 0
    assert json.loads((folder / "model_info.json").read_text())["version"] == 2
    assert not list(tmp_path.glob(".export.partial-*"))  # no half-written export left
    assert pull.main(["--alias", "nosuch", *uri]) == 2
    assert "no version of registered model 'pneumonia-cnn' holds the alias 'nosuch'" in (
        capsys.readouterr().err)


def test_pickled_npz_is_refused_by_the_builder_naming_file_and_key(make_npz):
    """What a run does with data.path set to an npz of object arrays: refused before any
    training, by file and key, with the way to re-save it (never numpy's allow_pickle text)."""
    pickled = np.empty(8, dtype=object)
    pickled[:] = list(images(8))
    path = make_npz(train_images=pickled, train_labels=labels(8))
    with pytest.raises(ValueError) as caught:
        build_data(path=path, batch_size=4, seed=0)
    message = str(caught.value)
    assert f"{path}: 'train_images' is an array of Python objects" in message
    assert "np.stack(images).astype('uint8')" in message and "allow_pickle" not in message


def test_pickled_npz_is_refused_for_prediction_and_external_sets(make_npz):
    from search.evaluation.inputs import npz_items

    pickled = np.empty(4, dtype=object)
    pickled[:] = list(images(4))
    path = make_npz(test_images=pickled, test_labels=labels(4))
    with pytest.raises(ValueError) as caught:
        npz_items(path, ["normal", "pneumonia"])
    assert f"{path}: 'test_images' is an array of Python objects" in str(caught.value)
    assert "allow_pickle" not in str(caught.value)
