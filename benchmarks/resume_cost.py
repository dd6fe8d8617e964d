"""What the resumable state costs per epoch: the same fit with and without writing it.

    python benchmarks/resume_cost.py [--epochs 4] [--repeats 2] [--transfer-images 256]
                                     [--every 1] [--backbone resnet50]

Two models, each trained with and without `search.training.resume.ResumableState` writing its state
(every variable of the model and optimizer, the callbacks' state and the best checkpoint's
copy) after every `--every` epochs, in alternating order, on the real data:

- the default CNN (`conf/model/cnn.yaml`) on the built-in PneumoniaMNIST at 28 px;
- a 224 px transfer model (`model=transfer`, random init: no downloads; MobileNetV2 unless
  `--backbone`) on PneumoniaMNIST images resized to 224 px, 3 channels (a tenth of the
  train split; epochs of `--transfer-images` images, validation on a quarter as many).

Per epoch: the mean time between epoch ends (the first epoch, with its tracing, left out),
the state's write time and its size. The last line is the worst per-epoch ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import compose  # noqa: E402 - benchmarks/common.py

CNN = ["trainer.precision=float32"]
TRANSFER = ["model=transfer", "model.weights=none", "data.image_size=224", "data.channels=3",
            "data.subset_fraction=0.1",
            "data.batch_size=32", "trainer.precision=float32"]


def one_fit(cfg, epochs: int, every: int | None, folder: Path, images: int | None) -> dict:
    """Fit ``epochs`` epochs; with ``every``, the resumable state is written as in a trial."""
    import keras
    from hydra.utils import instantiate

    from search.tracking.model_logging import config_hash
    from search.training import resume
    from search.training.keras_callbacks import AtomicModelCheckpoint
    from search.training.trainer import compile_model

    keras.utils.set_random_seed(int(cfg.seed))
    data = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    keras.backend.clear_session()
    model = instantiate(cfg.model, input_shape=tuple(data.input_shape), num_classes=2)
    steps = int(data.steps_per_epoch)
    if images:
        steps = max(1, images // int(cfg.data.batch_size))
    schedule = instantiate(cfg.lr_schedule, initial_learning_rate=1e-3, steps_per_epoch=steps,
                           epochs=epochs)
    compile_model(model, instantiate(cfg.optimizer, learning_rate=schedule.learning_rate), True)
    checkpoint = folder / "best.keras"
    stateful = [keras.callbacks.EarlyStopping(patience=epochs, restore_best_weights=True),
                AtomicModelCheckpoint(checkpoint, save_best_only=True), *schedule.callbacks]
    plan = resume.ResumePlan(folder / "state", write=True, every_epochs=every) if every else None
    # max_epochs + 1: the last epoch writes too (a trial skips it: it ends right after)
    state = resume.ResumableState(plan, stateful, checkpoint, steps, epochs + 1,
                                  {"run_id": None, "config_hash": config_hash(cfg)})
    ends: list[float] = []
    clock = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: ends.append(
        time.perf_counter()))
    val = data.val.take(max(1, steps // 4)) if images else data.val
    model.fit(data.train, steps_per_epoch=steps, epochs=epochs, validation_data=val,
              class_weight=data.class_weight, verbose=0, callbacks=[*stateful, state, clock])
    size = sum(p.stat().st_size for p in (folder / "state").glob("*")) if every else 0
    return {"per_epoch": statistics.mean(b - a for a, b in zip(ends, ends[1:], strict=False)),
            "write": state.write_seconds, "mb": size / 1e6,
            "params": model.count_params()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--transfer-images", type=int, default=256)
    parser.add_argument("--backbone", default="mobilenetv2")
    args = parser.parse_args()
    models = {"default CNN 28 px": (CNN, None),
              f"{args.backbone} 224 px": (TRANSFER + [f"model.backbone={args.backbone}"],
                                          args.transfer_images)}
    print(f"{'model':<22} {'params':>10} {'state MB':>9} {'write s':>8} "
          f"{'epoch s (off)':>14} {'epoch s (on)':>13} {'ratio':>7}")
    worst = 0.0
    for name, (overrides, images) in models.items():
        cfg = compose(overrides)
        off, on, writes, size, params = [], [], [], 0.0, 0
        for repeat in range(args.repeats):
            order = (None, args.every) if repeat % 2 == 0 else (args.every, None)
            for every in order:
                with tempfile.TemporaryDirectory() as folder:
                    got = one_fit(cfg, args.epochs, every, Path(folder), images)
                (on if every else off).append(got["per_epoch"])
                if every:
                    writes.append(got["write"])
                    size = got["mb"]
                params = got["params"]
        ratio = statistics.median(on) / statistics.median(off)
        worst = max(worst, ratio)
        print(f"{name:<22} {params:>10,} {size:>9.1f} {statistics.median(writes):>8.3f} "
              f"{statistics.median(off):>14.2f} {statistics.median(on):>13.2f} {ratio:>7.3f}")
    print(f"resumable state every {args.every} epoch(s): worst per-epoch ratio {worst:.3f} "
          f"(target <= 1.03)")


if __name__ == "__main__":
    main()
