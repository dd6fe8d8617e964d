"""A `search_space=transfer` sweep on images against the same sweep on cached backbone features.

    python benchmarks/transfer_cache.py [--images 96] [--size 96] [--trials 3] [--epochs 3]
                                        [--workdir DIR]

1. Writes a `chest_xray`-layout folder of `--images` full-size JPEGs made from the 16 real
   X-rays (benchmarks/input_pipeline.py's `make_folder`) and decodes it once into the
   decoded-image cache both sweeps share, so neither pays the decoding.
2. Runs `python search/run.py -m search_space=transfer` twice with the same seed, so the same
   trials are sampled: "images" with `+trainer.feature_cache=false` (every epoch runs the
   frozen backbone over every image, as before) and "features" with the cache on
   (search/training/feature_cache.py). ImageNet weights cannot be downloaded here:
   `model.weights=none` (random frozen weights are still a frozen backbone). No pruner, so
   every trial runs the same epochs in both.
3. Prints each trial's parameters, seconds and val_loss side by side, then the sweeps' wall
   times and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from common import REPO, compose  # noqa: E402 - benchmarks/common.py
from input_pipeline import make_folder  # noqa: E402

STUDY = "transfer-cache-bench"


def overrides(root: Path, args: argparse.Namespace) -> list[str]:
    return [
        "search_space=transfer", "data=chest_xray", f"data.root={root}",
        f"data.image_size={args.size}", "data.channels=3", "model.weights=none",
        f"trainer.max_epochs={args.epochs}", f"trainer.patience={args.epochs}",
        "trainer.verbose=0",
    ]


def sweep(name: str, workdir: Path, common: list[str], extra: list[str]) -> dict:
    """One sweep in its own MLflow and Optuna stores; its wall time and its trials."""
    import optuna

    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "OPTUNA_STORAGE": storage, "XRAY_CACHE_DIR": str(workdir / "cache"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "search/run.py", "-m", f"hydra.sweep.dir={folder / 'sweep'}",
               f"hydra.sweeper.study_name={STUDY}", "hydra/sweeper/pruner=nop", *common, *extra]
    started = time.perf_counter()
    with (folder / "sweep.log").open("w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
                              ).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the {name} sweep failed ({code}); see {folder / 'sweep.log'}")
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    logs = [(folder / "sweep.log").read_text(), *(
        f.read_text() for f in sorted((folder / "sweep").rglob("*.log")))]
    trials = sorted(trials, key=lambda t: t.number)
    return {"wall": wall, "trials": trials, "log": "\n".join(logs),
            "fit": [fit_seconds(folder, t.number) for t in trials]}


def seconds(trial) -> float:
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def fit_seconds(folder: Path, number: int) -> float:
    """From the trial's MLflow run start to its first evaluation line: the features (if
    computed), the fit, the full model assembled and loaded; not the process start, the
    evaluation or the model logging, which both paths share."""
    stamps = {}
    for line in (folder / "sweep" / str(number) / "run.log").read_text().splitlines():
        for key, text in (("start", "] - MLflow run "), ("end", "] - val: loss ")):
            if text in line and key not in stamps:
                stamps[key] = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    return (stamps["end"] - stamps["start"]).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="transfer-cache-"))
    root = workdir / "chest_xray"
    if not root.exists():
        make_folder(root, args.images)
    common = [*overrides(root, args), f"hydra.sweeper.n_trials={args.trials}"]
    os.environ["XRAY_CACHE_DIR"] = str(workdir / "cache")
    from hydra.utils import instantiate

    instantiate(compose(common[:6]).data, seed=42, _convert_="all")  # decoded once, shared
    images = sweep("images", workdir, common, ["++trainer.feature_cache=false"])
    features = sweep("features", workdir, common, [])
    print(f"{args.images} full-size JPEGs at {args.size} px, {args.trials} trials x "
          f"{args.epochs} epochs, model.weights=none, no pruner; workdir {workdir}\n")
    print("| trial | backbone | trainable_layers | batch | trial s: images | features | "
          "fit s: images | features | val_loss: images | features |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, (a, b) in enumerate(zip(images["trials"], features["trials"], strict=True)):
        p = a.params
        print(f"| {a.number} | {p.get('model.backbone')} | {p.get('model.trainable_layers')} | "
              f"{p.get('data.batch_size')} | {seconds(a):.1f} | {seconds(b):.1f} | "
              f"{images['fit'][i]:.1f} | {features['fit'][i]:.1f} | "
              f"{a.value:.4f} | {b.value:.4f} |")
    reads = features["log"].count("read from the cache")
    computed = features["log"].count("features up to")
    print(f"\nfeature files: computed {computed - reads}, read {reads}; "
          f"fallbacks said: {features['log'].count('feature cache off')}")
    print(f"sweep wall: images {images['wall']:.1f} s, features {features['wall']:.1f} s, "
          f"speed-up {images['wall'] / features['wall']:.2f}x; trial time "
          f"{sum(map(seconds, images['trials'])):.1f} s vs "
          f"{sum(map(seconds, features['trials'])):.1f} s "
          f"({sum(map(seconds, images['trials'])) / sum(map(seconds, features['trials'])):.2f}x)"
          f"; fit {sum(images['fit']):.1f} s vs {sum(features['fit']):.1f} s "
          f"({sum(images['fit']) / sum(features['fit']):.2f}x)")


if __name__ == "__main__":
    main()
