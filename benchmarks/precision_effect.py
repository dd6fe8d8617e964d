"""What the training precision does to a real trial: epoch time and val quality, side by side.

    python benchmarks/precision_effect.py [--seeds 1 2 3] [--epochs 8] [--overrides ...]

For each seed, the platform's own trainer (`search.training.trainer.train`, full tracking into a
private
store) trains the same config once per precision (`trainer.precision`), alternating, on the
built-in PneumoniaMNIST data unless `--overrides` says otherwise (e.g. `model.batch_norm=
after_activation`). Prints each run's seconds per epoch (from the MLflow epoch records), val
ROC AUC and val loss of the best checkpoint (evaluated in float32, as served), then the means
and the paired differences. The last line is the headline: epoch-time ratio and the mean val
ROC AUC change.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import compose, private_store  # noqa: E402 - benchmarks/common.py


def one_run(overrides: list[str]) -> dict[str, float]:
    """Train once; seconds per epoch and the best checkpoint's val metrics."""
    import mlflow

    from search.training.trainer import train

    train(compose(overrides))
    client = mlflow.MlflowClient()
    run = mlflow.last_active_run()
    stamps = [m.timestamp for m in client.get_metric_history(run.info.run_id, "val_loss")]
    per_epoch = (stamps[-1] - stamps[0]) / 1000 / max(len(stamps) - 1, 1)
    return {"s_per_epoch": per_epoch, "val_roc_auc": run.data.metrics["eval_val_roc_auc"],
            "val_loss": run.data.metrics["objective"], "tag": run.data.tags.get("precision")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = private_store(args.workdir, "precision-")
    rows: dict[str, list[dict[str, float]]] = {p: [] for p in args.precisions}
    print("| seed | precision | s/epoch | val ROC AUC | val loss |\n|---|---|---|---|---|")
    for seed in args.seeds:
        for precision in args.precisions:
            result = one_run([
                f"seed={seed}", f"trainer.max_epochs={args.epochs}", "trainer.verbose=0",
                f"trainer.precision={precision}",
                f"hydra.run.dir={workdir / 'runs' / f'{seed}-{precision}'}",
                *args.overrides,
            ])
            rows[precision].append(result)
            print(f"| {seed} | {result['tag']} | {result['s_per_epoch']:.2f} | "
                  f"{result['val_roc_auc']:.4f} | {result['val_loss']:.4f} |", flush=True)
    base, other = args.precisions[0], args.precisions[-1]
    for precision in args.precisions:
        r = rows[precision]
        print(f"mean {precision}: {statistics.mean(x['s_per_epoch'] for x in r):.2f} s/epoch, "
              f"val ROC AUC {statistics.mean(x['val_roc_auc'] for x in r):.4f}, "
              f"val loss {statistics.mean(x['val_loss'] for x in r):.4f}")
    pairs = zip(rows[base], rows[other], strict=True)
    diffs = [o["val_roc_auc"] - b["val_roc_auc"] for b, o in pairs]
    ratio = (statistics.mean(x["s_per_epoch"] for x in rows[other])
             / statistics.mean(x["s_per_epoch"] for x in rows[base]))
    print(f"{other} / {base}: epoch time {ratio:.3f}, val ROC AUC change "
          f"{statistics.mean(diffs):+.4f} (per seed {', '.join(f'{d:+.4f}' for d in diffs)})")


if __name__ == "__main__":
    main()
