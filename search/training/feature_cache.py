"""Transfer trials trained on cached backbone features instead of images.

A transfer model whose backbone is frozen up to a layer computes the same output there for an
un-augmented image in every epoch of every trial. Here that output is computed once per
(frozen layers and their weights, image size, data fingerprint, split) and kept as `.npy`
files in the decoded-image cache's folder (data/decoded_cache.py: the same location, the same
write-then-rename and the same least-recently-used budget), and the fit trains only what is
above the cut (`models.transfer.split_frozen`) on them. The model checkpointed, evaluated and
logged is still the full image model: its head is the trained head (shared layers).

Trials whose train images change every epoch (`data.augment.*`, `data.mixup`) take the full
path and say so once in their log; `trainer.feature_cache=false` turns the cache off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data.decoded_cache import default_cache_dir, evict
from models.precision import dtype_policy
from models.transfer import FrozenSplit, split_frozen
from search.training.model_setup import BuiltModel, compile_model
from search.training.run_plan import RunPlan

# train()'s own logger: its lines keep the name the terminal and the sweep's console show.
log = logging.getLogger("search.training.trainer")

# Part of every key: a change of how features are computed must not reuse old files.
FEATURE_VERSION = "features-v1"
TRANSFER_TARGET = "models.transfer.build_transfer"


@dataclasses.dataclass(frozen=True)
class Route:
    """What the fit trains on, and what turns its checkpoint into the full model's."""

    data: Any
    built: BuiltModel
    finish: Callable[[Path], None]

    @contextlib.contextmanager
    def assembled(self, checkpoint: Path) -> Iterator[None]:
        """Around the fit: however it ends (finished, pruned, failed), a best checkpoint it
        left is the full image model afterwards. Never hides the fit's own exception."""
        try:
            yield
        except BaseException:
            if checkpoint.is_file():
                try:
                    self.finish(checkpoint)
                except Exception as error:  # noqa: BLE001 - the fit's exception matters more
                    log.warning("best checkpoint %s left as the head on features (%s)",
                                checkpoint, error)
            raise
        self.finish(checkpoint)


def _full_path(data: Any, built: BuiltModel) -> Route:
    return Route(data, built, lambda checkpoint: None)


def fallback_reason(cfg: DictConfig) -> str | None:
    """Why this transfer run trains on images; None when cached features apply."""
    if cfg.trainer.get("feature_cache") is False:
        return "trainer.feature_cache=false"
    if int(cfg.model.trainable_layers) == -1:
        return "model.trainable_layers=-1 trains the whole backbone"
    augment = OmegaConf.to_container(cfg.data.get("augment") or {}, resolve=True)
    changing = sorted(f"data.augment.{k}" for k, v in augment.items() if v)
    if cfg.data.get("mixup"):
        changing.append("data.mixup")
    if changing:
        return f"{', '.join(changing)} change the train images every epoch"
    return None


def route(cfg: DictConfig, plan: RunPlan, data: Any, built: BuiltModel) -> Route:
    """The data and model the fit trains: the head on cached features, or the full model."""
    if cfg.model.get("_target_") != TRANSFER_TARGET:
        return _full_path(data, built)
    reason = fallback_reason(cfg)
    if reason is not None:  # said once, in the trial's own log
        log.info("Backbone feature cache off (%s): training the full model on images", reason)
        return _full_path(data, built)
    with dtype_policy(built.precision):  # the head compiles as the full model did
        split = split_frozen(built.model, int(cfg.model.trainable_layers))
    if split.cut == built.model.get_layer("backbone").layers[0].name:
        log.info("Backbone feature cache off (nothing frozen below the trainable layers)")
        return _full_path(data, built)
    features = split_features(cfg, plan, data, split)
    head = split.head
    optimizer = instantiate(cfg.optimizer, learning_rate=built.schedule.learning_rate)
    compile_model(head, optimizer, built.binary, list(data.class_names))
    log.info("Training the layers above %s/%s (%d of %d parameters) on cached features",
             cfg.model.backbone, split.cut, head.count_params(), built.model.count_params())
    on_features = dataclasses.replace(
        data, train=_train_dataset(cfg, plan, *features["train"]),
        val=_eval_dataset(cfg, *features["val"]))
    return Route(on_features, dataclasses.replace(built, model=head),
                 lambda checkpoint: assemble(built.model, head, checkpoint))


def assemble(full: keras.Model, head: keras.Model, checkpoint: Path) -> None:
    """Replace the head's best checkpoint by the full image model with those head weights.

    `full` shares every layer with `head`, so loading the best head weights sets the full
    model's; pull, predict, serve and continued trials then read an image model as always.
    """
    head.load_weights(checkpoint)  # the weights only: no second model is deserialized
    partial = checkpoint.with_suffix(".full.partial.keras")
    full.save(partial)
    os.replace(partial, checkpoint)


def store_dir(cfg: DictConfig) -> Path | None:
    """The decoded-image cache's folder (`data.decoded_cache`); None keeps features in memory."""
    folder = cfg.data.get("decoded_cache")
    if not folder:
        return None
    return default_cache_dir() if folder == "default" else Path(str(folder)).expanduser()


def feature_key(split: FrozenSplit, fingerprint: str, name: str) -> str:
    """A hash of the frozen graph (layers, sizes, preprocessing), its weights, the data's
    fingerprint (files, split membership, labels) and the split's name."""
    digest = hashlib.sha256(f"{FEATURE_VERSION}|{split.cut}|{fingerprint}|{name}".encode())
    digest.update(split.bottom.to_json().encode())
    for weights in split.bottom.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:32]


def ordered_splits(cfg: DictConfig, plan: RunPlan, fingerprint: str) -> Any:
    """The run's data again with train in split order (a shuffle buffer of 1 keeps it) and
    nothing that changes images; the fingerprint proves it is the same split."""
    data = instantiate(cfg.data, seed=plan.data_seed, shuffle_buffer=1, augment=None,
                       mixup=0.0, _convert_="all")
    if data.fingerprint != fingerprint:
        raise RuntimeError(f"re-reading the data for backbone features gave fingerprint "
                           f"{data.fingerprint[:12]}, not the run's {fingerprint[:12]}")
    return data


def _compute(bottom: keras.Model, dataset: tf.data.Dataset, steps: int | None,
             out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Run `bottom` over `steps` batches (all when None) into `out`; returns (features, y)."""
    chunks, labels, start = [], [], 0
    for x, y in dataset.take(steps) if steps else dataset:
        batch = np.asarray(bottom.predict_on_batch(x), np.float32)
        if out is not None:
            out[start:start + len(batch)] = batch
        else:
            chunks.append(batch)
        labels.append(y.numpy())
        start += len(batch)
    return (out if out is not None else np.concatenate(chunks)), np.concatenate(labels)


def split_features(cfg: DictConfig, plan: RunPlan, data: Any, split: FrozenSplit
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{train, val: (features float32 (N, ...), labels)} in split order, from the store when
    there, else computed once (and written there when the store is set)."""
    folder = store_dir(cfg)
    shape = tuple(int(d) for d in split.bottom.output.shape[1:])
    sizes = {"train": int(data.n_train), "val": int(data.n_val)}
    files = {name: folder / f"features-{feature_key(split, data.fingerprint, name)}.npy"
             for name in sizes} if folder else {}
    found = {name: _read(files[name], (sizes[name], *shape)) for name in files}
    if files and all(v is not None for v in found.values()):
        log.info("Backbone features up to %s read from the cache %s", split.cut, folder)
        return found  # type: ignore[return-value]
    started, ordered = time.perf_counter(), ordered_splits(cfg, plan, data.fingerprint)
    results = {}
    for name, dataset, steps in (("train", ordered.train, ordered.steps_per_epoch),
                                 ("val", ordered.val, None)):
        kept = found.get(name)
        results[name] = kept if kept is not None else _write(
            split.bottom, dataset, steps, files.get(name), (sizes[name], *shape))
    log.info("Backbone features up to %s (%s images) computed in %.1f s %s", split.cut,
             " + ".join(str(n) for n in sizes.values()), time.perf_counter() - started,
             f"into the cache {folder}" if folder else "(in memory: data.decoded_cache=null)")
    return results


def _read(file: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(features memory-mapped, labels) from the store, or None when absent or unusable."""
    labels_file = file.with_suffix(".labels.npy")
    try:
        features = np.load(file, mmap_mode="r")
        labels = np.load(labels_file)
    except (OSError, ValueError):
        return None
    if features.shape != shape or features.dtype != np.float32 or len(labels) != shape[0]:
        return None
    with contextlib.suppress(OSError):  # a read-only shared cache is still a cache
        os.utime(file)  # recently used: evicted last, as decoded images are
        os.utime(labels_file)
    return features, labels


def _write(bottom: keras.Model, dataset: tf.data.Dataset, steps: int | None,
           file: Path | None, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Compute features into `file` (temporary name, then renamed) or, without one, memory."""
    if file is None:
        return _compute(bottom, dataset, steps, None)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_name(f".{file.stem}.{os.getpid()}.tmp.npy")
        out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=shape)
    except OSError as error:
        log.warning("feature cache folder %s is not writable (%s); features in memory for "
                    "this run only", file.parent, error)
        return _compute(bottom, dataset, steps, None)
    try:
        _, labels = _compute(bottom, dataset, steps, out)
        out.flush()
        del out
        labels_temporary = file.with_name(f".{file.stem}.{os.getpid()}.tmp.labels.npy")
        np.save(labels_temporary, labels)
        os.replace(labels_temporary, file.with_suffix(".labels.npy"))
        os.replace(temporary, file)  # last: a features file always has its labels
    finally:
        temporary.unlink(missing_ok=True)
    evict(file.parent, keep=file)
    return np.load(file, mmap_mode="r"), labels


def _gather(features: np.ndarray) -> Callable[[tf.Tensor], tf.Tensor]:
    """Rows -> their features, read from the (memory-mapped) array in a batch."""
    shape = (None, *features.shape[1:])

    def read(rows: tf.Tensor) -> tf.Tensor:
        batch = tf.numpy_function(lambda r: np.asarray(features[r]), [rows], tf.float32)
        return tf.ensure_shape(batch, shape)

    return read


def _finish(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()  # as data.pipeline does: fixed prefetch, deterministic order
    options.autotune.enabled = False
    options.deterministic = True
    return dataset.prefetch(2).with_options(options)


def _train_dataset(cfg: DictConfig, plan: RunPlan, features: np.ndarray, labels: np.ndarray
                   ) -> tf.data.Dataset:
    """Shuffled, batched, repeated as data.pipeline.make_dataset shuffles images: the same
    seed and buffer over the same split order give the same batches, epoch by epoch."""
    dataset = tf.data.Dataset.from_tensor_slices((np.arange(len(labels)), labels))
    if len(labels) > 1:
        buffer = min(max(int(cfg.data.shuffle_buffer), 1), len(labels))
        dataset = dataset.shuffle(buffer, seed=plan.data_seed, reshuffle_each_iteration=True)
    read = _gather(features)
    dataset = dataset.batch(int(cfg.data.batch_size)).map(lambda rows, y: (read(rows), y))
    return _finish(dataset.repeat())


def _eval_dataset(cfg: DictConfig, features: np.ndarray, labels: np.ndarray
                  ) -> tf.data.Dataset:
    """Finite, in split order, batched as the images are."""
    read = _gather(features)
    dataset = tf.data.Dataset.from_tensor_slices((np.arange(len(labels)), labels))
    return _finish(dataset.batch(int(cfg.data.batch_size)).map(lambda rows, y: (read(rows), y)))
