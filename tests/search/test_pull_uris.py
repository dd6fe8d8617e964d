"""Every MLflow 3 model URI is pulled to a complete folder that predicts offline (issue 28).

`models:/name@alias`, `models:/name/N`, `models:/m-<id>` (a logged model, registered or never
registered) and `runs:/<id>/model` go through one resolution (`model_store.parse_reference`
and `export_model`) in pull and predict; a URI pull cannot use is named, with what to do.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest

from search import predict as pr
from search import pull
from search.model_registry import registration as registry

CLASSES = ["normal", "pneumonia"]


def _logged_uri(run_id: str) -> str:
    uri = mlflow.get_run(run_id).data.tags["best_model_uri"]
    assert re.fullmatch(r"models:/m-[0-9a-f]{32}", uri), uri
    return uri


def _check_export(folder: Path, run_id: str) -> dict:
    """The folder is complete: model, info from the source run, config, card with figures."""
    info = json.loads((folder / "model_info.json").read_text())
    run = mlflow.get_run(run_id)
    assert (folder / "model" / "MLmodel").is_file() and (folder / "config.yaml").is_file()
    assert info["run_id"] == run_id and info["class_names"] == CLASSES
    assert info["preprocessing"]["image_size"] == 28
    assert info["threshold"] == pytest.approx(run.data.metrics["threshold"])
    assert info["data_fingerprint"] == run.data.params["data.fingerprint"]
    assert info["metrics"]["eval_test_roc_auc"] == pytest.approx(
        run.data.metrics["eval_test_roc_auc"])
    card = (folder / "MODEL_CARD.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert links and all((folder / link).is_file() for link in links), links
    assert f"runs:/{run_id}" in card and "roc_auc" in card
    return info


def _predict_offline(folder: Path, image: Path, out: Path) -> list[dict[str, str]]:
    mlflow.set_tracking_uri("sqlite:////nonexistent/offline.db")  # the folder needs no store
    assert pr.main([str(folder), str(image), "--out", str(out)]) == 0
    with open(out / "predictions.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_pull_every_model_uri_then_predict_offline(registry_store, chest_xray_sample_files,
                                                   tmp_path, capsys):
    runs = registry_store.runs
    version = registry.register_and_promote(runs.good_run_id).version
    unregistered = _logged_uri(runs.other_data_run_id)  # a trial's model, never registered
    image = chest_xray_sample_files[-1]  # a real PNEUMONIA X-ray
    cases = {  # URI -> (source run, registered as)
        "models:/pneumonia-cnn@champion": (runs.good_run_id, None),
        f"models:/pneumonia-cnn/{version}": (runs.good_run_id, None),
        _logged_uri(runs.good_run_id): (runs.good_run_id, [f"models:/pneumonia-cnn/{version}"]),
        unregistered: (runs.other_data_run_id, []),
        f"runs:/{runs.other_data_run_id}/model": (runs.other_data_run_id, []),
    }
    answers = {}
    for uri, (run_id, registered_as) in cases.items():
        folder = tmp_path / re.sub(r"\W+", "_", uri)
        mlflow.set_tracking_uri(registry_store.uri)
        assert pull.main([uri, "--out", str(folder), "--tracking-uri", registry_store.uri]) == 0
        printed = capsys.readouterr().out
        info = _check_export(folder, run_id)
        assert info["model_uri"] == uri or uri.startswith("models:/pneumonia-cnn@")
        if registered_as is None:  # a registered version: number and aliases
            assert info["version"] == version and info["aliases"] == ["champion"]
        else:  # a logged model: where it is registered, if anywhere, instead
            assert info["version"] is None and info["registered_as"] == registered_as
            assert info["model_id"] == _logged_uri(run_id).removeprefix("models:/")
            card = (folder / "MODEL_CARD.md").read_text()
            if registered_as:
                assert f"Registered: yes, as {registered_as[0]}" in card
                assert f"registered: as {registered_as[0]}" in printed, printed
            else:
                assert "Registered: no" in card and "not registered" in card.splitlines()[0]
                assert "registered: no" in printed, printed
        rows = _predict_offline(folder, image, tmp_path / f"pred-{folder.name}")
        assert len(rows) == 1 and rows[0]["predicted_label"] in CLASSES
        answers[uri] = float(rows[0]["p_pneumonia"])
    good = [answers[u] for u, (r, _) in cases.items() if r == runs.good_run_id]
    other = [answers[u] for u, (r, _) in cases.items() if r == runs.other_data_run_id]
    np.testing.assert_allclose(good, good[0], atol=1e-6)  # one model under three names
    np.testing.assert_allclose(other, other[0], atol=1e-6)
    assert abs(good[0] - other[0]) > 1e-6  # and the two runs' models differ


def test_pull_names_what_it_cannot_use(tmp_path, capsys):
    """Unknown logged models, runs and model paths, a malformed URI or a folder: exit 2, the
    URI named with what to do, no traceback; a URI with --alias/--version is a usage error."""
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    store = ["--tracking-uri", uri, "--out", str(tmp_path / "out")]
    expected = {
        "models:/m-" + "0" * 32: "check the id",
        "runs:/0123abc/model": "check the id",
        "models:/m-123": "models:/m-<32 hex digits>",
        "runs:/0123abc": "runs:/<run id>/<path>",
        str(tmp_path): "predict takes it as it is",
    }
    try:
        for model, advice in expected.items():
            assert pull.main([model, *store]) == 2, model
            err = capsys.readouterr().err
            assert model in err and advice in err and "Traceback" not in err, err
        with pytest.raises(SystemExit) as stop:
            pull.main(["models:/pneumonia-cnn/1", "--alias", "champion", *store])
        assert stop.value.code == 2
        assert "not both" in capsys.readouterr().err
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
