"""Training, evaluation, tracking and sweep orchestration (entry point: search/run.py)."""
