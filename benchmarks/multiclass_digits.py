"""K-class sweeps end to end: 4 and 10 digit classes, champion metrics with per-class recall.

    python benchmarks/multiclass_digits.py [--trials 12] [--workdir DIR]

scikit-learn's bundled 8x8 digits (1,797 images, shipped with scikit-learn: nothing is
downloaded), upscaled to 28x28 grayscale, are written twice: 4 classes as a class-folder
tree (`+experiment=folder_multiclass`) and 10 classes as a MedMNIST-layout npz
(`data.label_mode=multiclass`). Each is swept with the default search space (TPE +
Hyperband pruning) into a private MLflow store and Optuna database under --workdir; the
registry gate promotes each sweep's best trial. The table gives the champion's metrics on
its held-out test split, and the recall of every class.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_images(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits(n_class=n_classes)
    small = (bunch.images * (255 / 16)).round().astype(np.uint8)
    return (np.stack([np.asarray(Image.fromarray(i).resize((28, 28), Image.BILINEAR))
                      for i in small]), bunch.target.astype(np.int64))


def write_tree(root: Path, n_classes: int) -> Path:
    from PIL import Image

    images, labels = digit_images(n_classes)
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / NAMES[label] / f"{k}.png")
    return root


def write_npz(path: Path, n_classes: int) -> Path:
    images, labels = digit_images(n_classes)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.85 * len(order))
    np.savez(path, train_images=images[order[:cut]], train_labels=labels[order[:cut]],
             val_images=images[order[cut:]], val_labels=labels[order[cut:]])
    return path


def sweep(store: Path, trials: int, name: str, *overrides: str) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, str(REPO / "search" / "run.py"), "-m", *overrides,
           f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.study_name={name}",
           f"hydra.sweeper.storage=sqlite:///{store / 'optuna.db'}", f"registry.model_name={name}",
           f"tracking.experiment={name}", f"hydra.sweep.dir={store / 'sweeps' / name}",
           "tracking.artifact_root=" + (store / "artifacts").as_uri()]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - start


def champion_row(store: Path, name: str, seconds: float) -> tuple[list[str], list[str]]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias(name, "champion")
    run = client.get_run(mv.run_id)
    m = run.data.metrics
    classes = [c for c in NAMES if f"eval_test_recall_{c}" in m]
    experiment = client.get_experiment_by_name(name).experiment_id
    trials = [r for r in client.search_runs([experiment]) if "optuna.trial_number" in r.data.tags]
    states = [r.data.tags.get("optuna.trial_state") for r in trials]
    head = [f"{name}", f"v{mv.version} (trial {run.data.tags.get('optuna.trial_number')})",
            f"{states.count('COMPLETE')}/{states.count('PRUNED')}/{len(states)}",
            f"{seconds:.0f}", f"{int(float(run.data.params['data.n_test']))}"]
    head += [f"{m[f'eval_test_{k}']:.4f}" for k in ("accuracy", "macro_recall",
                                                   "macro_specificity", "macro_f1", "roc_auc")]
    per_class = [f"{c} {m[f'eval_test_recall_{c}']:.3f}" for c in classes]
    return head, per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="digits-"))
    work.mkdir(parents=True, exist_ok=True)
    tree = write_tree(work / "digits4", 4)
    npz = write_npz(work / "digits10.npz", 10)
    t4 = sweep(work, args.trials, "digits4", "+experiment=folder_multiclass",
               f"data.root={tree}", "data.image_size=28", "data.channels=1",
               "data.batch_size=32")
    t10 = sweep(work, args.trials, "digits10", f"data.path={npz}",
                "data.label_mode=multiclass", f"data.class_names=[{','.join(NAMES)}]")
    rows = [champion_row(work, "digits4", t4), champion_row(work, "digits10", t10)]
    header = ["sweep", "champion", "complete/pruned/trials", "wall s", "n test", "accuracy",
              "macro_recall", "macro_specificity", "macro_f1", "roc_auc (ovr macro)"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for head, _ in rows:
        print("| " + " | ".join(head) + " |")
    print("\nper-class test recall of each champion:")
    for head, per_class in rows:
        print(f"  {head[0]}: " + ", ".join(per_class))
    print(f"\nstores under {work}")


if __name__ == "__main__":
    main()
