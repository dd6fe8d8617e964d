"""Train-step cost of the practitioners' 224 px CNN: batch-norm, dropout, precision and XLA.

    python benchmarks/step_cost.py [--batch 16] [--steps 6] [--variants full,no_bn_dropout]
        [--precisions float32,mixed_bfloat16] [--jit both] [--resnet]

Builds the notebooks' 5-block CNN (224x224 grayscale, 2 convolutions per block, 16 -> 256
filters, batch-norm after every convolution, dropout after every block and in the head) with
`models.cnn.build_cnn`, and variants without batch-norm, without dropout, without either. Each
variant is compiled as the platform compiles it (Adam, binary cross-entropy, the trainer's
metrics) and timed with `train_on_batch` on the same in-memory batch after warm-up steps, so
the figure is the train step alone, no input pipeline. Precisions are Keras dtype policies;
`--jit` times Keras' default (no XLA on a CPU-only machine) and `jit_compile=True` side by
side. `--resnet` adds ResNet50 fine-tuning (all layers trainable, weights=None: the same
arithmetic as ImageNet weights, and nothing is downloaded).

Backend-agnostic (plain Keras and NumPy): on a GPU machine without TensorFlow it runs with
KERAS_BACKEND=jax. The last line is the headline: the full model's img/s over the model
without batch-norm and dropout, each in its faster setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from models.cnn import build_cnn  # noqa: E402
from models.fused_batch_norm import fuse_batch_norm  # noqa: E402

VARIANTS = {
    "full": {"batch_norm": "after_activation", "conv_dropout": "all", "head_dropout_rate": 0.5},
    "no_dropout": {"batch_norm": "after_activation", "conv_dropout": "none",
                   "head_dropout_rate": 0.0},
    "no_bn": {"batch_norm": "none", "conv_dropout": "all", "head_dropout_rate": 0.5},
    "no_bn_dropout": {"batch_norm": "none", "conv_dropout": "none", "head_dropout_rate": 0.0},
}


def practitioners_cnn(variant: str, size: int = 224, channels: int = 1) -> keras.Model:
    """The notebooks' 5-block CNN (one of VARIANTS) at 224 px; below 64 px the platform's
    default CNN (conf/model/cnn.yaml: 3 blocks, dropout after the last) with that variant's
    batch-norm and dropout."""
    if size < 64:
        return build_cnn((size, size, channels), 2, **VARIANTS[variant])
    return build_cnn(
        (size, size, channels), 2, depth=5, convs_per_block=2, base_filters=16,
        conv_dropout_rate=0.2, dense_layers=1, dense_units=512, **VARIANTS[variant],
    )


def resnet50() -> keras.Model:
    """ResNet50 with a binary head, every layer trainable (fine-tuning's step cost)."""
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(224, 224, 3))
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    return keras.Model(base.input, keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x))


def images_per_second(build, precision: str, jit: bool, fused: bool, batch: int,
                      steps: int) -> float:
    """Median img/s of `steps` timed train steps after two warm-up steps (compilation)."""
    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    model = build()
    if fused:
        fuse_batch_norm(model)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
        jit_compile=True if jit else "auto",
    )
    shape = (batch, *model.input_shape[1:])
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    y = (rng.random(batch) > 0.5).astype(np.float32)
    for _ in range(2):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224,
                        help="input px; below 64 the platform's default CNN is timed instead")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--precisions", default="float32,mixed_bfloat16",
                        help="Keras dtype policies, e.g. float32,mixed_bfloat16,mixed_float16")
    parser.add_argument("--jit", choices=["off", "on", "both"], default="both")
    parser.add_argument("--fused", choices=["off", "on", "both"], default="both",
                        help="batch-norm: Keras' ops (off), TF's fused kernel (on), or both")
    parser.add_argument("--resnet", action="store_true", help="also time ResNet50 fine-tuning")
    args = parser.parse_args()
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    precisions = args.precisions.split(",")
    print(f"backend {keras.backend.backend()}, batch {args.batch}, {args.steps} timed steps, "
          f"CPUs {len(os.sched_getaffinity(0))}", flush=True)
    fuseds = {"off": [False], "on": [True], "both": [False, True]}[args.fused]
    if keras.backend.backend() != "tensorflow":
        fuseds = [False]  # the fused kernel is TensorFlow's; other backends fuse by themselves
    rows: dict[tuple[str, str, bool, bool], float] = {}
    models = {name: (lambda name=name: practitioners_cnn(name, args.size)) for name in
              args.variants.split(",")}
    if args.resnet:
        models["resnet50"] = resnet50
    print("| model | batch-norm | precision | XLA | img/s |\n|---|---|---|---|---|")
    for name, build in models.items():
        has_bn = name not in ("no_bn", "no_bn_dropout")
        for fused in fuseds if has_bn else [False]:
            for precision in precisions:
                for jit in jits:
                    rate = images_per_second(build, precision, jit, fused, args.batch,
                                             args.steps)
                    rows[name, precision, jit, fused] = rate
                    kernel = "-" if not has_bn else "fused" if fused else "keras"
                    print(f"| {name} | {kernel} | {precision} | {'on' if jit else 'default'} "
                          f"| {rate:.1f} |", flush=True)
    if "full" in models and "no_bn_dropout" in models:
        full = max(v for (n, *_), v in rows.items() if n == "full")
        bare = max(v for (n, *_), v in rows.items() if n == "no_bn_dropout")
        best = max((k for k in rows if k[0] == "full"), key=rows.get)
        print(f"full model ({best[1]}, XLA {'on' if best[2] else 'default'}, batch-norm "
              f"{'fused' if best[3] else 'keras'}) / no batch-norm no dropout, each at its "
              f"fastest: {full / bare:.3f}")


if __name__ == "__main__":
    main()
