"""Per-epoch Keras metrics for K-class models trained on class indices.

Keras' `AUC(multi_label=True)` (one-vs-rest AUC per class, averaged) and
`Recall(class_id=i, top_k=1)` (recall of class i when the most probable class is the
prediction) are exactly the per-epoch values a K-class task needs, but both expect one-hot
labels, while our pipeline feeds class indices (sparse cross-entropy). These subclasses only
one-hot the labels; the arithmetic is Keras' own.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from search.evaluation.metric_maths import class_keys


def _one_hot(y_true: Any, num_classes: int) -> Any:
    return ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), num_classes)


@keras.saving.register_keras_serializable(package="xray")
class SparseMacroAUC(keras.metrics.AUC):
    """One-vs-rest ROC AUC of each class, macro-averaged, from class-index labels."""

    def __init__(self, num_classes: int, name: str = "auc", **kwargs: Any) -> None:
        kwargs.pop("multi_label", None)
        kwargs.pop("num_labels", None)
        super().__init__(name=name, multi_label=True, num_labels=int(num_classes), **kwargs)
        self.num_classes = int(num_classes)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        return super().update_state(_one_hot(y_true, self.num_classes), y_pred, sample_weight)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("multi_label", None)
        config.pop("num_labels", None)
        return {**config, "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="xray")
class SparseClassRecall(keras.metrics.Recall):
    """Recall of one class under an argmax decision (top-1), from class-index labels."""

    def __init__(self, class_id: int, num_classes: int, name: str | None = None,
                 **kwargs: Any) -> None:
        kwargs.pop("top_k", None)
        kwargs.pop("thresholds", None)
        super().__init__(class_id=int(class_id), top_k=1, name=name, **kwargs)
        self.num_classes = int(num_classes)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        return super().update_state(_one_hot(y_true, self.num_classes), y_pred, sample_weight)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for key in ("top_k", "thresholds"):
            config.pop(key, None)
        return {**config, "num_classes": self.num_classes}


def multiclass_metrics(class_names: list[str]) -> list[keras.metrics.Metric]:
    """Accuracy, macro one-vs-rest AUC (`auc`) and per-class recall (`recall_<class>`)."""
    k = len(class_names)
    return [
        keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
        SparseMacroAUC(k, name="auc"),
        *(SparseClassRecall(i, k, name=f"recall_{key}")
          for i, key in enumerate(class_keys(class_names))),
    ]
