"""Data: loaders (npz, class folders), splits (stratified, patient-aware), tf.data pipelines.

``build_data`` / ``DataBundle`` / ``build_augmenter`` are imported lazily so that
``data.splits`` (numpy + scikit-learn only) can be used without importing TensorFlow.
"""

from typing import Any

__all__ = ["DataBundle", "build_augmenter", "build_data"]


def __getattr__(name: str) -> Any:
    if name in ("DataBundle", "build_data"):
        from data import build

        return getattr(build, name)
    if name == "build_augmenter":
        from data.pipeline import build_augmenter

        return build_augmenter
    raise AttributeError(f"module 'data' has no attribute {name!r}")
