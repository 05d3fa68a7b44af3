"""The models of `fxsparse train | export | flops` live in the library core, fxsparse.models (one resolver of
model names, also used by fxsparse.accelerate_checkpoint); re-exported here for imports that predate the move."""

from ..models import (
    BUILTIN_MODELS,
    CIFAR_RESNETS,
    INPUT_SIZES,
    CifarResNet,
    SmallCNN,
    UntrustedModelName,
    build_model,
    default_input_size,
)

__all__ = [
    "BUILTIN_MODELS",
    "CIFAR_RESNETS",
    "INPUT_SIZES",
    "CifarResNet",
    "SmallCNN",
    "UntrustedModelName",
    "build_model",
    "default_input_size",
]
