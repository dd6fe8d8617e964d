"""`xray-sweeps <command> [args]`: the installed command ([project.scripts]) over the scripts.

    xray-sweeps run [overrides]          python search/run.py [overrides]   (one training run)
    xray-sweeps sweep [overrides]        python search/run.py -m [overrides]
    xray-sweeps ui [args]                python search/ui.py [args]
    xray-sweeps pull [args]              python search/pull.py [args]
    xray-sweeps predict MODEL INPUT ...  python search/predict.py MODEL INPUT ...
    xray-sweeps serve [MODEL] [args]     python search/serve.py [MODEL] [args]
    xray-sweeps nightly-summary DIR      python -m search.nightly_summary DIR

Each command is the script's own `main`, imported only when it runs (so `--help` of one never
loads another's libraries); `xray-sweeps <command> --help` shows its options.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

# command -> module whose main(argv) runs it (run and sweep: search/run.py, see `hydra_entry`)
COMMANDS = {
    "pull": "search.pull",
    "predict": "search.predict",
    "serve": "search.serve",
    "ui": "search.ui",
    "nightly-summary": "search.nightly_summary",
}
HYDRA = {"run": [], "sweep": ["-m"]}


def hydra_entry(command: str, args: list[str]) -> int:
    """search/run.py as `python search/run.py` runs it (its __main__ block included).

    Run as a file, not imported: Hydra finds conf/ relative to the entry's file for a script,
    and the block moves a password off the command line and turns Ctrl-C into status 130.
    """
    script = Path(__file__).resolve().with_name("run.py")
    sys.argv = [str(script), *HYDRA[command], *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:  # Hydra's own exit, or an error message from run.py
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    return 0


def usage() -> str:
    return __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: xray-sweeps <command> [args]\n\n{usage()}")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in HYDRA:
        return hydra_entry(command, rest)
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; one of: "
              f"{', '.join([*HYDRA, *COMMANDS])}", file=sys.stderr)
        return 2
    sys.argv = [f"xray-sweeps {command}", *rest]  # argparse's usage line names the command
    try:
        module = importlib.import_module(COMMANDS[command])
    except ModuleNotFoundError as error:
        if error.name != COMMANDS[command]:
            raise  # a missing dependency of the command: its own traceback says which
        print(f"error: this checkout has no {COMMANDS[command]} (the {command!r} command); "
              "update it", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
