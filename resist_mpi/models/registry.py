"""A name -> constructor registry, so a model name from the CLI becomes a model with no if/elif.

The package's own models register themselves; torchvision's ResNet family is available as
"torchvision.<name>" (torchvision.resnet50, torchvision.wide_resnet50_2, torchvision.resnext50_32x4d).
"""
from __future__ import annotations

from typing import Callable, Dict, List

_MODELS: Dict[str, Callable] = {}
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
               "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")


def register_model(fn: Callable) -> Callable:
    """Decorator: make fn(num_classes=..., width=...) available to create_model under its name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    return sorted(_MODELS) + [f"torchvision.{n}" for n in TORCHVISION]


def is_torchvision(name: str) -> bool:
    return name.startswith("torchvision.") and name[len("torchvision."):] in TORCHVISION


def create_model(name: str, num_classes: int = 10, width: int = 64, **kwargs):
    """Build a registered model.

    Args:
        name: e.g. "preact_resnet101" or "torchvision.resnet50" (see list_models()).
        num_classes: outputs of the head.
        width: channels of the first stage of the package's models (64 in the paper; 8 or 16 for
            thin CPU/test models); torchvision's models have their own widths and ignore it.
        **kwargs: passed on to the constructor.
    """
    if width < 1 or num_classes < 1:
        raise ValueError(f"width and num_classes must be positive (got width={width}, num_classes={num_classes})")
    if is_torchvision(name):
        import torchvision
        return getattr(torchvision.models, name[len("torchvision."):])(num_classes=num_classes, **kwargs)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](num_classes=num_classes, width=width, **kwargs)
