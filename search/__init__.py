"""Training, evaluation, tracking and sweep orchestration (entry point: search/run.py)."""

from pathlib import Path

# The checkout this code runs from (conf/, mlruns/, search/run.py): the one place it is computed.
REPO_ROOT = Path(__file__).resolve().parents[1]
