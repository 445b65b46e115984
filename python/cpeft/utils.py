"""loralib's utilities with its exact substring rules, extended to IA3's ``ia3_`` parameters.

Parameters are selected by substrings of their full dotted names (as loralib does, so that
checkpoint keys stay compatible): a name containing ``lora_`` or ``ia3_`` is an adapter
parameter, a name containing ``bias`` is a bias for ``bias='all'``. Differences from loralib:
``ia3_`` names are treated like ``lora_`` ones and IA3 layers like LoRA layers for
``'lora_only'`` (an extension), and an unknown ``bias`` mode raises NotImplementedError with a
message before anything is frozen (loralib freezes first; Q14).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .layers import IA3Layer, LoRALayer

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict"]

_ADAPTER_MARKERS = ("lora_", "ia3_")
# The bias modes of loralib's utilities, which peft's LoraConfig.bias shares.
_BIAS_MODES = ("none", "all", "lora_only")


def _check_bias_mode(bias) -> None:
    if bias not in _BIAS_MODES:
        raise NotImplementedError(
            f"bias must be one of {', '.join(repr(m) for m in _BIAS_MODES)}; got {bias!r}"
        )


def _adapter_marker(name: str):
    """The first adapter marker occurring in ``name`` (None when there is none)."""
    found = [(name.index(marker), marker) for marker in _ADAPTER_MARKERS if marker in name]
    return min(found)[1] if found else None


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freezes every parameter whose name contains neither ``lora_`` nor ``ia3_``; never
    unfreezes adapter parameters. ``bias='all'`` then unfreezes every parameter whose name
    contains ``bias``; ``'lora_only'`` unfreezes the ``bias`` of LoRA and IA3 layers."""
    _check_bias_mode(bias)
    for name, param in model.named_parameters():
        if _adapter_marker(name) is None:
            param.requires_grad = False
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if (
                isinstance(module, (LoRALayer, IA3Layer))
                and getattr(module, "bias", None) is not None
            ):
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The adapter entries of ``model.state_dict()`` (buffers included, tensors shared, not
    cloned). ``'all'`` adds every key containing ``bias``; ``'lora_only'`` adds, for each
    adapter key, ``key.split(marker)[0] + 'bias'`` when that key exists."""
    _check_bias_mode(bias)
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if _adapter_marker(k) is not None}
    if bias == "all":
        return {k: v for k, v in state.items() if _adapter_marker(k) is not None or "bias" in k}
    selected = {}
    for key, value in state.items():
        marker = _adapter_marker(key)
        if marker is None:
            continue
        selected[key] = value
        bias_name = key.split(marker)[0] + "bias"
        if bias_name in state:
            selected[bias_name] = state[bias_name]
    return selected
