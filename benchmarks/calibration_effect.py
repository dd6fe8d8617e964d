"""What calibration did to every run of a sweep, on the split it was not fitted on.

    python benchmarks/calibration_effect.py --store sqlite:///mlruns/mlflow.db \\
        [--experiment pneumonia]

Reads `evaluation/calibration.json` of every run in the store's experiment that has one
(COMPLETE trials, final-stage repeats, cross-validation folds) and prints, per run, the
fitted temperature and the held-out test split's NLL and expected calibration error before
and after the map, which was fitted on val. The last line counts the runs it improved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="tracking URI (sqlite:///... or http://...)")
    parser.add_argument("--experiment", default="pneumonia")  # tracking.experiment
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"no experiment {args.experiment!r} in {args.store}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            if "calibration" not in run.data.tags:
                continue
            path = client.download_artifacts(run.info.run_id, "evaluation/calibration.json",
                                             str(Path(tmp) / run.info.run_id))
            record = json.loads(Path(path).read_text())
            if "test" in record:
                rows.append((run.info.run_name or run.info.run_id, record))
    if not rows:
        print("no run with a calibrated model and a test split", file=sys.stderr)
        return 2
    print(f"{'run':48s} {'T':>6s} {'NLL before':>10s} {'after':>8s} {'ECE before':>10s} "
          f"{'after':>8s}")
    better_nll = better_ece = 0
    for name, r in sorted(rows, key=lambda row: row[0]):
        before, after = r["test"]["before"], r["test"]["after"]
        better_nll += after["nll"] < before["nll"]
        better_ece += after["ece"] < before["ece"]
        print(f"{name[:48]:48s} {r['temperature']:6.3f} {before['nll']:10.4f} "
              f"{after['nll']:8.4f} {before['ece']:10.4f} {after['ece']:8.4f}")
    print(f"headline: on test, calibration lowered NLL in {better_nll} of {len(rows)} runs and "
          f"ECE in {better_ece} of {len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
