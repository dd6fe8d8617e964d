"""A damaged pulled folder is named file by file, never a bare parser or Keras error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import mlflow
import pytest

from search.model_registry.model_store import DamagedFileError, load_exported


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A real MLflow Keras model folder and its model_info.json, as a pull writes them."""
    folder = tmp_path_factory.mktemp("export") / "m-v1"
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])
    mlflow.keras.save_model(model, str(folder / "model"))
    (folder / "model_info.json").write_text(json.dumps(
        {"name": "m", "version": 1, "class_names": ["a", "b"],
         "preprocessing": {"image_size": 8, "channels": 1}}, indent=2))
    return folder


def damaged(export: Path, tmp_path: Path, file: str, change) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    target = copy / file
    target.write_bytes(change(target.read_bytes()))
    return copy


@pytest.mark.parametrize(("file", "change", "says"), [
    ("model_info.json", lambda b: b[: len(b) // 2], "is damaged (not valid JSON"),
    ("model/MLmodel", lambda b: b"flavors: [\n", "is damaged (not valid YAML"),
    ("model/data/model.keras", lambda b: b[:1000], "is not a readable .keras archive"),
    ("model/data/model.keras",
     lambda b: b[:200] + bytes(200) + b[400:], "is damaged ("),
], ids=["info-truncated", "mlmodel-garbled", "keras-truncated", "keras-overwritten"])
def test_each_damaged_file_is_named_with_what_to_do(export, tmp_path, file, change, says):
    assert load_exported(export).info["name"] == "m"  # the intact folder loads
    with pytest.raises(DamagedFileError) as caught:
        load_exported(damaged(export, tmp_path, file, change))
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "copy" / file)) and says in message, message
    assert "search/pull.py" in message
