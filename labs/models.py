"""Any torchvision classification model by name, randomly initialised (nothing downloaded)."""

from __future__ import annotations

import difflib

import torch
import torchvision

from labs.errors import UsageError

# Models whose auxiliary classifier would make forward() return a tuple in training mode.
_AUX_LOGITS = {"inception_v3", "googlenet"}


def classification_models() -> list[str]:
    # module=torchvision.models lists classification models only (not detection etc.)
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    known = classification_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; e.g. resnet18, resnet50, vit_b_16"
        raise UsageError(f"unknown model {name!r}: not a torchvision classification model{hint}")


def build_model(name: str, num_classes: int, img_size: int) -> torch.nn.Module:
    """Randomly initialised; a vision transformer is built for ``img_size`` (torchvision's
    default of 224 would refuse other sizes). ``train.check_trains`` then tries it."""
    check_model_name(name)
    kwargs = {"weights": None, "num_classes": num_classes}
    if name.startswith("vit_"):
        kwargs["image_size"] = img_size
    if name in _AUX_LOGITS:
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, **kwargs)

