"""Training precision (`trainer.precision`): which Keras dtype policy the train step runs in.

Keras' mixed policies keep float32 variables and compute in bfloat16 or float16; Keras wraps
the optimizer in loss scaling itself for float16. The models the platform saves for serving
are float32 either way (`as_float32`), so predictions, calibration and Grad-CAM never depend
on how a model was trained.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras


@functools.cache  # the CPU does not change within a process; read once per worker
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def resolve_precision(value: str, has_gpu: bool, image_size: int = 224) -> str:
    """The dtype policy for `trainer.precision=value`.

    `auto`: mixed_float16 on a GPU. On a CPU with bfloat16 arithmetic (AMX or AVX512-BF16),
    mixed_bfloat16 for images of 64 px and more, where the convolutions dominate and the
    224 px CNN's step runs 2.2x faster (benchmarks/step_cost.py); float32 below: a 28 px
    epoch takes 0.49x the time in bfloat16 at the same val ROC AUC, but the default sweep is
    bound by per-trial costs and ran at 0.965x the wall time, while the val loss (its
    objective) came out 0.0026 higher on average over 3 seeds (benchmarks/precision_effect.py,
    sweep_throughput.py), so the objective's numerics stay as they were. float32 on CPUs that
    emulate bfloat16.
    """
    if value != "auto":  # search/config_checks.py has refused anything but Keras' policies
        return value
    if has_gpu:
        return "mixed_float16"
    if image_size < 64:
        return "float32"
    return "mixed_bfloat16" if _cpu_flags() & {"amx_bf16", "avx512_bf16"} else "float32"


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under Keras' dtype policy `name`, then restore the previous global one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _float32_policies(node: Any) -> Any:
    """A serialized Keras config with every mixed dtype policy replaced by float32."""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and str(
                node.get("config", {}).get("name", "")).startswith("mixed_"):
            return {**node, "config": {**node["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_float32_policies(value) for value in node]
    return node


def as_float32(model: keras.Model) -> keras.Model:
    """`model`'s weights in a float32 copy of it (the same layers, float32 compute).

    Returns `model` itself when it already computes in float32. The copy is rebuilt from the
    model's own serialized config (safe mode), so any builder's model converts, nested
    backbones included.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):
        return model
    config = _float32_policies(keras.saving.serialize_keras_object(model))
    copy = keras.saving.deserialize_keras_object(config, safe_mode=True)
    copy.set_weights(model.get_weights())
    return copy
