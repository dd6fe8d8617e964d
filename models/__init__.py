"""Model builders (config in, object out), referenced by `_target_` in conf/model, conf/optimizer
and conf/lr_schedule, plus Grad-CAM model building for any model they produce."""

from models.cnn import build_cnn
from models.optim import ScheduleSpec, build_optimizer, build_schedule
from models.transfer import build_gradcam_model, build_transfer, last_conv_layer_name

__all__ = [
    "ScheduleSpec",
    "build_cnn",
    "build_gradcam_model",
    "build_optimizer",
    "build_schedule",
    "build_transfer",
    "last_conv_layer_name",
]
