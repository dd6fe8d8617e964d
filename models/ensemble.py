"""Ensembles: several trained models of one task as one Keras model (averaged probabilities).

The ensemble is a plain functional model: one input, every member applied to it, Keras'
`Average` layer over their outputs. It saves to one `.keras` file and loads with
`safe_mode=True` like any other model, so pull, predict, serving and Grad-CAM need nothing
special (Grad-CAM averages its members' heatmaps, see `search.evaluation.gradcam`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

PREFIX = "ensemble"


def build_ensemble(members: Sequence[keras.Model], name: str = PREFIX) -> keras.Model:
    """One model averaging the members' outputs (sigmoid or softmax probabilities).

    Members must take the same input and give outputs of the same shape; they are renamed
    `member_0`, `member_1`, ... (layer names must be unique within a model).
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    shapes = {tuple(m.input_shape[1:]) for m in members}
    outputs = {tuple(m.output_shape[1:]) for m in members}
    if len(shapes) != 1 or len(outputs) != 1:
        raise ValueError(f"ensemble members differ in input {sorted(shapes)} or output "
                         f"{sorted(outputs)} shapes; they must share one task and preprocessing")
    if not name.startswith(PREFIX):
        raise ValueError(f"an ensemble's name must start with {PREFIX!r} (Grad-CAM finds its "
                         f"members by it), got {name!r}")
    inputs = keras.Input(shape=shapes.pop(), name="image")
    for i, member in enumerate(members):
        member.name = f"member_{i}"  # Keras 3: a model's name is settable before nesting
    averaged = keras.layers.Average(name="average")([member(inputs) for member in members])
    return keras.Model(inputs, averaged, name=name)


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The members of a model from `build_ensemble` (an empty list for any other model)."""
    if not model.name.startswith(PREFIX):
        return []
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]
