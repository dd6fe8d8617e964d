"""Export a registered model version into a self-contained local folder for offline prediction.

    python search/pull.py                               # models:/pneumonia-cnn@champion
    python search/pull.py --alias challenger --out exports/challenger
    python search/pull.py --version 3 --name pneumonia-cnn

The folder holds everything `search/predict.py` needs, with no tracking server in reach:

    model/            the MLflow Keras model (MLmodel, data/model.keras, input example)
    model_info.json   name, version, aliases, run link, class names, preprocessing, threshold,
                      data fingerprint, config hash, metrics
    config.yaml       the run's composed Hydra config
    MODEL_CARD.md     the same, for humans

Models are always loaded from the `.keras` file with Keras' safe mode on (no arbitrary code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from search.model_registry.model_store import DEFAULT_MODEL_NAME, INFO_FILE, export_version


def main(argv: list[str] | None = None) -> int:
    from search.predict import check_writable_folder
    from search.tracking.mlflow_runs import TrackingError, setup_cli

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", default=None, help="alias to pull (default: champion)")
    which.add_argument("--version", type=int, default=None, help="version number to pull")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="registered model name")
    parser.add_argument("--out", default=None, help="folder (default: exports/<name>-v<N>)")
    parser.add_argument("--force", action="store_true",
                        help="replace an export of another version in --out")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db")
    args = parser.parse_args(argv)
    try:
        # the folder before the store: exports/ (the default) or --out must take the export
        check_writable_folder(Path(args.out) if args.out else Path("exports"), "the export")
        setup_cli(args.tracking_uri)  # reads only: never waits on a process writing the store
        out = export_version(args.name, alias=args.alias, version=args.version, out=args.out,
                             force=args.force)
    except (LookupError, FileExistsError, ValueError, TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PermissionError as error:  # the folder turned read-only while exporting
        print(f"error: cannot write {error.filename} ({error.strerror}); make --out "
              f"{args.out or 'exports'} writable and re-run, or choose another --out",
              file=sys.stderr)
        return 2
    info = json.loads((out / INFO_FILE).read_text())
    print(f"Pulled {info['model_uri']} (aliases: {', '.join(info['aliases']) or 'none'}) "
          f"to {out}")
    print(f"  threshold {info.get('threshold')}, classes {info['class_names']}, "
          f"run {info.get('run_uri')}")
    print(f"  predict: python search/predict.py {out} INPUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
