"""trainer.precision: how `auto` resolves, and float32 copies of mixed-precision models."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from models import precision
from models.cnn import build_cnn
from models.precision import as_float32, dtype_policy, resolve_precision
from models.transfer import build_transfer


def test_resolve(monkeypatch):
    assert resolve_precision("float32", has_gpu=True) == "float32"
    assert resolve_precision("mixed_bfloat16", has_gpu=False) == "mixed_bfloat16"
    assert resolve_precision("auto", has_gpu=True) == "mixed_float16"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert resolve_precision("auto", has_gpu=False, image_size=224) == "mixed_bfloat16"
    assert resolve_precision("auto", has_gpu=False, image_size=28) == "float32"
    assert resolve_precision("auto", has_gpu=True, image_size=28) == "mixed_float16"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "fma"})
    assert resolve_precision("auto", has_gpu=False, image_size=224) == "float32"


@pytest.mark.parametrize("builder", ["cnn", "transfer"])
def test_float32_copy_of_a_mixed_model(builder):
    with dtype_policy("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        if builder == "cnn":
            mixed = build_cnn((32, 32, 1), 2, batch_norm="after_activation")
        else:  # a nested backbone converts too
            mixed = build_transfer((32, 32, 3), 3, backbone="mobilenetv2", weights="none")
    assert keras.config.dtype_policy().name == "float32"  # the context restored it
    copy = as_float32(mixed)
    assert {layer.dtype_policy.name for layer in copy._flatten_layers()} == {"float32"}
    assert copy.layers[-1].name == mixed.layers[-1].name
    x = np.random.default_rng(0).random((4, *mixed.input_shape[1:]), dtype=np.float32)
    np.testing.assert_allclose(copy(x).numpy(), mixed(x).numpy().astype(np.float32), atol=3e-2)
    assert as_float32(copy) is copy


def test_config_check_names_the_key(compose_cfg):
    from search.config_checks import ConfigError, check_run_config

    with pytest.raises(ConfigError, match=r"trainer.precision='fp8'.*mixed_bfloat16"):
        check_run_config(compose_cfg("trainer.precision=fp8"))
    assert OmegaConf.select(compose_cfg(), "trainer.precision") == "auto"
