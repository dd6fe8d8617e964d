"""Transfer trials on cached backbone features (search/training/feature_cache.py).

Real JPEGs (the 16-image chest X-ray sample), real Keras backbones with random frozen weights
(`model.weights=none`: ImageNet files cannot be downloaded here; frozen is frozen), a real
cache folder. Small: 32 px, batch 4.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import optuna
import pytest
from hydra.utils import instantiate

from search.config_checks import check_run_config
from search.training import feature_cache
from search.training.model_setup import build_model
from search.training.run_plan import plan_run
from search.training.trainer import configure_runtime


def _cfg(compose_cfg, root: Path, cache: Path, *extra: str):
    return compose_cfg(
        "data=chest_xray", f"data.root={root}", "data.image_size=32", "data.channels=3",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "data.batch_size=4",
        f"data.decoded_cache={cache}", "model=transfer", "model.weights=none", *extra)


def _trial(cfg, tmp_path: Path):
    """What train() does up to the fit: plan, data, model, and the route the fit takes."""
    plan = plan_run(cfg, check_run_config(cfg), tmp_path / "out")
    configure_runtime(plan.train_seed, False, None)
    data = instantiate(cfg.data, seed=plan.data_seed, _convert_="all")
    built = build_model(cfg, data, plan)
    return plan, data, built, feature_cache.route(cfg, plan, data, built)


def _labels(dataset, steps: int) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in dataset.take(steps)])


@pytest.mark.parametrize("backbone, trainable, cut", [
    ("resnet50", 20, "conv5_block1_out"),  # partly frozen: the cut is a block's output
    ("vgg19", 0, "block5_pool"),           # frozen: the backbone's own output
])
def test_cached_features_give_the_full_models_logits(compose_cfg, chest_xray_tree, tmp_path,
                                                      caplog, backbone, trainable, cut):
    cfg = _cfg(compose_cfg, chest_xray_tree, tmp_path / "cache", f"model.backbone={backbone}",
               f"model.trainable_layers={trainable}")
    with caplog.at_level(logging.INFO, logger="search.training.trainer"):
        _, data, built, fit_on = _trial(cfg, tmp_path)
    assert f"Training the layers above {backbone}/{cut} " in caplog.text
    head = fit_on.built.model
    assert head is not built.model and head.input_shape[1:] != built.model.input_shape[1:]
    # the same images, the same weights: head on cached features == full model on images
    on_images = built.model.predict(data.val, verbose=0)
    on_features = head.predict(fit_on.data.val, verbose=0)
    np.testing.assert_allclose(on_features, on_images, rtol=1e-5, atol=1e-5)
    # the train batches come in the same order, epoch after epoch (same shuffle)
    steps = 3 * int(data.steps_per_epoch)
    np.testing.assert_array_equal(_labels(fit_on.data.train, steps), _labels(data.train, steps))
    # train the head a little; the checkpoint becomes the full image model with its weights
    head.fit(fit_on.data.train, steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
    checkpoint = tmp_path / "best.keras"
    head.save(checkpoint)
    fit_on.finish(checkpoint)
    full = keras.models.load_model(checkpoint, safe_mode=True, compile=False)
    assert full.input_shape == built.model.input_shape
    assert full.count_params() == built.model.count_params()
    np.testing.assert_allclose(full.predict(data.val, verbose=0),
                               head.predict(fit_on.data.val, verbose=0), rtol=1e-5, atol=1e-5)
    # a pruned trial's checkpoint is the full image model too, and the pruning still ends it
    pruned = tmp_path / "pruned" / "best.keras"
    pruned.parent.mkdir()
    with pytest.raises(optuna.TrialPruned), fit_on.assembled(pruned):
        head.save(pruned)
        raise optuna.TrialPruned()
    reloaded = keras.models.load_model(pruned, safe_mode=True, compile=False)
    assert reloaded.input_shape == built.model.input_shape


def test_a_second_trial_reads_the_features_instead_of_computing_them(
        compose_cfg, chest_xray_tree, tmp_path, caplog):
    cache = tmp_path / "cache"
    cfg = _cfg(compose_cfg, chest_xray_tree, cache, "model.backbone=vgg19",
               "model.trainable_layers=0")
    with caplog.at_level(logging.INFO, logger="search.training.trainer"):
        _trial(cfg, tmp_path)
    assert "computed in" in caplog.text and "read from the cache" not in caplog.text
    files = sorted(cache.glob("features-*.npy"))
    assert len(files) == 4  # train and val, each with its labels
    written = {f: f.stat().st_ino for f in files}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="search.training.trainer"):
        _, data, built, fit_on = _trial(cfg, tmp_path)  # another trial, a fresh process' model
    assert "read from the cache" in caplog.text and "computed in" not in caplog.text
    assert {f: f.stat().st_ino for f in sorted(cache.glob("features-*.npy"))} == written
    np.testing.assert_allclose(fit_on.built.model.predict(fit_on.data.val, verbose=0),
                               built.model.predict(data.val, verbose=0), rtol=1e-5, atol=1e-5)
    # another cut is another key: computed, beside the first
    caplog.clear()
    other = _cfg(compose_cfg, chest_xray_tree, cache, "model.backbone=vgg19",
                 "model.trainable_layers=3")
    with caplog.at_level(logging.INFO, logger="search.training.trainer"):
        _trial(other, tmp_path)
    assert "computed in" in caplog.text
    assert len(list(cache.glob("features-*.npy"))) == 8


@pytest.mark.parametrize("override, said", [
    ("data.augment.flip=true", "data.augment.flip change the train images every epoch"),
    ("data.mixup=0.2", "data.mixup change the train images every epoch"),
])
def test_an_augmented_trial_trains_on_images_and_says_so(compose_cfg, chest_xray_tree,
                                                          tmp_path, caplog, override, said):
    cfg = _cfg(compose_cfg, chest_xray_tree, tmp_path / "cache", "model.backbone=vgg19",
               "model.trainable_layers=0", override)
    with caplog.at_level(logging.INFO, logger="search.training.trainer"):
        _, data, built, fit_on = _trial(cfg, tmp_path)
    assert fit_on.built is built and fit_on.data is data
    lines = [r.getMessage() for r in caplog.records if "feature cache off" in r.getMessage()]
    assert lines == [f"Backbone feature cache off ({said}): training the full model on images"]
    assert not list((tmp_path / "cache").glob("features-*"))


@pytest.mark.slow
def test_a_cached_transfer_run_logs_the_full_image_model(compose_cfg, chest_xray_tree,
                                                          tmp_path, caplog):
    """train() end to end: the fit runs on features, the logged model takes images."""
    import mlflow

    from search.training.trainer import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(compose_cfg, chest_xray_tree, tmp_path / "cache", "model.backbone=vgg19",
               "model.trainable_layers=0", "trainer.max_epochs=2", "trainer.verbose=0",
               f"tracking.uri={uri}", f"tracking.artifact_root={(tmp_path / 'art').as_uri()}")
    with caplog.at_level(logging.INFO, logger="search.training.trainer"):
        value = train(cfg, tmp_path / "out")
    assert "on cached features" in caplog.text
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    # the objective is evaluated through the full image model; the fit's val_loss came from
    # the head on features: the best epoch's two values agree
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert len(epochs) >= 2 and value == pytest.approx(min(epochs[:2]), abs=1e-4)
    logged = mlflow.keras.load_model(run.data.tags["best_model_uri"])  # what pull/serve read
    assert logged.input_shape == (None, 32, 32, 3)
    assert logged.count_params() > 20_000_000  # vgg19's backbone is in it, not only the head
