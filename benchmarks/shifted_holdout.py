"""Two champions side by side on a prevalence-shifted test split, at their stored thresholds.

    python benchmarks/shifted_holdout.py --model A=<store>:models:/pneumonia-cnn@champion \\
        --model B=<store>:models:/pneumonia-cnn@champion [--normal-share 0.375] [--seed 42]

Each `--model NAME=STORE:URI` names a registered model in an MLflow store (a sqlite:///...
database or a server URL). The test split is rebuilt from the default data config and
`--seed` (the carved test split of the built-in data, never used for selection), then
re-sampled to `--normal-share` normal images (all normal ones plus a seeded subset of the
pneumonia ones; the public hold-out is 37.5 % normal). Every model is scored there at its own
stored threshold, with 95 % stratified bootstrap intervals, and each later model is compared
with the first by a paired bootstrap on the same images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEYS = ("accuracy", "sensitivity", "specificity", "roc_auc", "f1")


def load(spec: str, workdir: Path) -> tuple[str, object]:
    """(name, LoadedModel) from NAME=STORE:URI."""
    import mlflow

    from search.model_registry.model_store import load_model_reference

    name, rest = spec.split("=", 1)
    store, uri = rest.rsplit(":models:/", 1)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    return name, load_model_reference(f"models:/{uri}", workdir / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=STORE:URI")
    parser.add_argument("--normal-share", type=float, default=0.375)
    parser.add_argument("--seed", type=int, default=42, help="the data config's seed")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from search.evaluation import metrics as ev
    from search.evaluation.intervals import BootstrapSpec, intervals, paired_difference

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"seed={args.seed}"])
    workdir = Path(tempfile.mkdtemp(prefix="shifted-"))
    models = [load(spec, workdir) for spec in args.model]
    names = ["normal", "pneumonia"]
    scored = []
    for name, loaded in models:
        prep = loaded.preprocessing
        data = instantiate(cfg.data, seed=args.seed, image_size=int(prep["image_size"]),
                           channels=int(prep["channels"]), _convert_="all")
        rng = np.random.default_rng(args.seed)
        normal, pneumonia = np.flatnonzero(data.y_test == 0), np.flatnonzero(data.y_test == 1)
        keep = int(round(len(normal) * (1 - args.normal_share) / args.normal_share))
        idx = np.sort(np.r_[normal, rng.choice(pneumonia, min(keep, len(pneumonia)),
                                               replace=False)])
        x = np.concatenate([batch for batch, _ in data.test])[idx]
        scores = ev.positive_scores(loaded.model.predict(x, verbose=0))
        y = data.y_test[idx]
        metrics = ev.evaluate_split("shifted", y, scores, names, loaded.threshold).metrics
        found = intervals(y, scores, names, loaded.threshold, BootstrapSpec(seed=args.seed))
        scored.append((name, loaded, y, scores, metrics, found))
    y = scored[0][2]
    print(f"\nShifted test split: {len(y)} images, {1 - y.mean():.1%} normal, data seed "
          f"{args.seed}; each model at its stored threshold; 95 % intervals\n")
    print("| model | version | threshold | " + " | ".join(KEYS) + " |")
    print("|---|---|---|" + "---|" * len(KEYS))
    for name, loaded, _, _, metrics, found in scored:
        cells = [f"{metrics[k]:.4f} [{found[k][0]:.3f}, {found[k][1]:.3f}]" for k in KEYS]
        print(f"| {name} | v{loaded.info.get('version')} | {loaded.threshold:.4f} | "
              + " | ".join(cells) + " |")
    first = scored[0]
    for name, loaded, yb, scores, _, _ in scored[1:]:
        assert (yb == first[2]).all(), "the models' test splits differ"
        for key in ("specificity", "accuracy", "roc_auc"):
            diff = paired_difference(yb, scores, loaded.threshold, first[3], first[1].threshold,
                                     key, names, BootstrapSpec(seed=args.seed))
            print(f"{name} - {first[0]}: {diff.text()}"
                  + (" (beyond noise)" if diff.decided else " (within noise)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
