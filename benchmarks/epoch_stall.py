"""Epoch-start stall benchmark: naive tf.data input against the project's pipeline, one run.

    python benchmarks/epoch_stall.py [--epochs 8]

A naive pipeline (finite dataset, AUTOTUNE everywhere, a new iterator every epoch) makes
fit() wait at the start of epochs while tf.data's autotuner spins up. The project's pipeline
repeats the train split forever (fit uses steps_per_epoch) and turns autotune off for val/test.
Both train the same CNN on the built-in PneumoniaMNIST data; the script prints the wait before
each epoch's first batch and the epoch times, then the ratios measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from data.build import build_data
from models.cnn import build_cnn


class FirstBatchTimer(keras.callbacks.Callback):
    """Seconds from epoch start to the end of its first batch, and whole-epoch seconds."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
        self.first = None

    def on_train_batch_end(self, batch, logs=None):
        if self.first is None:
            self.first = time.perf_counter() - self.start

    def on_epoch_end(self, epoch, logs=None):
        self.firsts = [*getattr(self, "firsts", []), self.first]
        self.epochs = [*getattr(self, "epochs", []), time.perf_counter() - self.start]


def naive_datasets(bundle, x_train: np.ndarray, y_train: np.ndarray, batch: int):
    """What a notebook usually writes: finite, autotuned, no repeat."""
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train))
             .batch(batch).prefetch(tf.data.AUTOTUNE))
    x_val = np.concatenate([x for x, _ in bundle.val])
    val = tf.data.Dataset.from_tensor_slices((x_val, bundle.y_val.astype("float32"))).batch(
        batch).prefetch(tf.data.AUTOTUNE)
    return train, val


def fit_timed(train, val, steps: int | None, epochs: int, seed: int) -> FirstBatchTimer:
    keras.utils.set_random_seed(seed)
    model = build_cnn((28, 28, 1), 2)
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    timer = FirstBatchTimer()
    model.fit(train, validation_data=val, steps_per_epoch=steps, epochs=epochs, verbose=0,
              callbacks=[timer])
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundle = build_data(seed=args.seed)
    xs, ys = [], []
    for x, y in bundle.train.take(bundle.steps_per_epoch):
        xs.append(x.numpy())
        ys.append(y.numpy())
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    naive_train, naive_val = naive_datasets(bundle, x_train, y_train, 64)

    results = {
        "naive (finite, autotune)": fit_timed(naive_train, naive_val, None, args.epochs, args.seed),
        "project pipeline": fit_timed(bundle.train, bundle.val, bundle.steps_per_epoch,
                                      args.epochs, args.seed),
    }
    print(f"{'pipeline':<26} {'first-batch wait per epoch (s)':<58} {'epochs total (s)':>8}")
    for name, t in results.items():
        waits = " ".join(f"{w:.2f}" for w in t.firsts[1:])  # epoch 1 includes tracing
        print(f"{name:<26} {waits:<58} {sum(t.epochs[1:]):8.1f}")
    naive, ours = results["naive (finite, autotune)"], results["project pipeline"]
    print(f"max first-batch wait after epoch 1: naive {max(naive.firsts[1:]):.3f} s, "
          f"project {max(ours.firsts[1:]):.3f} s")
    print(f"ratio of epoch time (epochs 2..{args.epochs}), project / naive: "
          f"{sum(ours.epochs[1:]) / sum(naive.epochs[1:]):.2f}")
    print(f"median epoch: naive {statistics.median(naive.epochs[1:]):.2f} s, "
          f"project {statistics.median(ours.epochs[1:]):.2f} s")


if __name__ == "__main__":
    main()
