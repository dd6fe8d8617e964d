"""Every image the pulled MODEL_CARD.md links exists where the link points (issue 28, item 4).

A real MLflow store holds a run with the two held-out figures under `evaluation/`, as a
trained run logs them; the pull's figure copy and the card are then checked link by link.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from search.model_registry.model_card import operating_point
from search.model_registry.model_store import CARD_FIGURES, copy_figures


def test_the_cards_figures_are_where_its_links_point(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("card", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(experiment)
    for artifact in CARD_FIGURES:
        png = tmp_path / Path(artifact).name
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
        client.log_artifact(run.info.run_id, str(png), str(Path(artifact).parent))
    export = tmp_path / "export"
    export.mkdir()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        figures = copy_figures(client, run.info.run_id, export)
    finally:
        mlflow.set_tracking_uri(previous)
    assert figures == list(CARD_FIGURES)
    info = {"figures": figures, "threshold": 0.5, "threshold_rule": "youden",
            "class_names": ["normal", "pneumonia"],
            "metrics": {"eval_test_sensitivity": 0.9, "eval_test_specificity": 0.8}}
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", "\n".join(operating_point(info)))
    assert sorted(links) == sorted(CARD_FIGURES)
    for link in links:
        assert (export / link).is_file(), f"{link} is linked but not at {export / link}"
