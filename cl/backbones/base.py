"""Backbone builder base class, the factory and checkpoint loading with shape checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from cl.config import BackboneConfig
from cl.errors import ConfigError, UserError


class BackboneBuilder:
    """Base of registered backbones: a ``Config`` dataclass and ``build(cfg, input_shape)``."""

    Config: ClassVar[type[BackboneConfig]] = BackboneConfig
    description: ClassVar[str] = ""

    def build(self, cfg: BackboneConfig, input_shape: tuple[int, int, int]) -> nn.Module:  # pragma: no cover
        raise NotImplementedError


def build_backbone(cfg: BackboneConfig, input_shape: tuple[int, int, int]) -> nn.Module:
    """Build the backbone named by ``cfg.name`` and load ``cfg.checkpoint`` if given."""
    from cl.registry import BACKBONES

    name = cfg.name
    if name.startswith("timm:"):
        if hasattr(cfg, "model"):
            cfg.model = name.split(":", 1)[1]
        name = "timm"
    model = BACKBONES.get(name)().build(cfg, input_shape)
    if not hasattr(model, "num_features"):
        raise TypeError(f"backbone '{cfg.name}' has no num_features attribute")
    if cfg.checkpoint:
        load_backbone_checkpoint(model, cfg.checkpoint)
    return model


def load_backbone_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict (a bare one, a ``cl pretrain`` checkpoint with ``state_dict``, or a timm file).

    Keys of a classifier head absent from the backbone are ignored; any other missing, unexpected or mis-shaped key
    is a :class:`UserError` that names it. A ``cl pretrain`` checkpoint's ``content_hash`` is verified first, so a
    corrupted or edited file is refused.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"backbone.checkpoint '{path}' does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise UserError(f"backbone.checkpoint '{path}' cannot be read as a torch state dict: {err}") from None
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise UserError(f"backbone.checkpoint '{path}' holds no state dict")
    expected = obj.get("content_hash") if isinstance(obj, dict) and "state_dict" in obj else None
    if isinstance(expected, str):
        from cl.utils import tensor_hash

        actual = tensor_hash(state)
        if actual != expected:
            raise UserError(f"backbone.checkpoint '{path}' fails its content hash check (stored {expected[:16]}, "
                            f"computed {actual[:16]}): the file is corrupted or was edited; regenerate it with "
                            "the command in its .json sidecar")
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    own = model.state_dict()
    head_like = ("head.", "fc.", "classifier.")
    unexpected = [k for k in state if k not in own and not k.startswith(head_like)]
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            parts.append(f"shape mismatch: {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise UserError(f"backbone.checkpoint '{path}' does not fit backbone: {' | '.join(parts)}; "
                        "check backbone.name and its size options")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
