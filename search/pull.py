"""Export a model from the tracking store into a self-contained local folder for offline prediction.

    python search/pull.py                               # models:/pneumonia-cnn@champion
    python search/pull.py models:/pneumonia-cnn@challenger --out exports/challenger
    python search/pull.py models:/pneumonia-cnn/3       # or --version 3 --name pneumonia-cnn
    python search/pull.py models:/m-<id>                # a logged model, registered or not
    python search/pull.py runs:/<run id>/model          # a run's model

MODEL is any MLflow 3 model URI: `models:/<name>@<alias>`, `models:/<name>/<version>`,
`models:/m-<id>` (a logged model, as the MLflow UI shows it) or `runs:/<run id>/<path>`;
without it, --alias/--version/--name pick a registered version (default: the champion).
The folder holds everything `search/predict.py` needs, with no tracking server in reach:

    model/            the MLflow Keras model (MLmodel, data/model.keras, input example)
    model_info.json   name, version and aliases (or "registered_as" for a logged model), run
                      link, class names, preprocessing, threshold, data fingerprint, config
                      hash, metrics
    config.yaml       the run's composed Hydra config
    MODEL_CARD.md     the same, for humans (with the run's held-out figures under evaluation/)

Models are always loaded from the `.keras` file with Keras' safe mode on (no arbitrary code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from search.model_registry.model_store import DEFAULT_ALIAS, DEFAULT_MODEL_NAME, INFO_FILE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; a URI together with --alias/--version/--name is a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help="models:/name@alias, models:/name/N, models:/m-<id> or "
                        "runs:/<run id>/<path> (default: models:/<--name>@<--alias>)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", default=None, help=f"alias to pull (default: {DEFAULT_ALIAS})")
    which.add_argument("--version", type=int, default=None, help="version number to pull")
    parser.add_argument("--name", default=None,
                        help=f"registered model name (default: {DEFAULT_MODEL_NAME})")
    parser.add_argument("--out", default=None, help="folder (default: exports/<name>-v<N>, "
                        "exports/<m-id> for a logged model)")
    parser.add_argument("--force", action="store_true",
                        help="replace an export of another model in --out")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db")
    args = parser.parse_args(argv)
    flags = [f"--{k}" for k in ("alias", "version", "name") if getattr(args, k) is not None]
    if args.model is not None and flags:
        parser.error(f"give the model either as a URI ({args.model}) or with "
                     f"{'/'.join(flags)}, not both: the URI already names it")
    if args.model is None:  # the registry flags, as a URI: one resolution for both forms
        name = args.name or DEFAULT_MODEL_NAME
        args.model = (f"models:/{name}/{args.version}" if args.version is not None
                      else f"models:/{name}@{args.alias or DEFAULT_ALIAS}")
    return args


def pulled_line(info: dict[str, Any], out: Path) -> str:
    """What was pulled, and where it stands in the registry."""
    if info.get("version") is not None:
        return (f"Pulled {info['model_uri']} (aliases: {', '.join(info['aliases']) or 'none'}) "
                f"to {out}")
    where = ", ".join(info.get("registered_as") or [])
    return (f"Pulled {info['model_uri']} (logged model {info.get('model_id') or info['name']}; "
            f"registered: {'as ' + where if where else 'no'}) to {out}")


def main(argv: list[str] | None = None) -> int:
    from search.model_registry.model_store import export_model
    from search.predict import check_writable_folder
    from search.tracking.descriptions import short_number
    from search.tracking.mlflow_runs import TrackingError, setup_cli

    args = parse_args(argv)
    try:
        # the folder before the store: exports/ (the default) or --out must take the export
        check_writable_folder(Path(args.out) if args.out else Path("exports"), "the export")
        setup_cli(args.tracking_uri)  # reads only: never waits on a process writing the store
        out = export_model(args.model, out=args.out, force=args.force)
    except (LookupError, FileExistsError, ValueError, TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PermissionError as error:  # the folder turned read-only while exporting
        print(f"error: cannot write {error.filename} ({error.strerror}); make --out "
              f"{args.out or 'exports'} writable and re-run, or choose another --out",
              file=sys.stderr)
        return 2
    info = json.loads((out / INFO_FILE).read_text())
    print(pulled_line(info, out))
    print(f"  threshold {short_number(info.get('threshold'))}, classes {info['class_names']}, "
          f"run {info.get('run_uri')}")
    print(f"  predict: python search/predict.py {out} INPUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
