"""A name -> constructor registry, so a model name from the CLI becomes a model with no if/elif."""
from __future__ import annotations

from typing import Callable, Dict, List

_MODELS: Dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Decorator: make fn available to create_model under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 10, width: int = 64, **kwargs):
    """Build a registered model.

    Args:
        name: e.g. "preact_resnet101" (see list_models()).
        num_classes: outputs of the head.
        width: channels of the first stage (64 in the paper; 8 or 16 for thin CPU/test models).
        **kwargs: passed on (e.g. partition_stages=(2,)).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if width < 1 or num_classes < 1:
        raise ValueError(f"width and num_classes must be positive (got width={width}, num_classes={num_classes})")
    return _MODELS[name](num_classes=num_classes, width=width, **kwargs)
