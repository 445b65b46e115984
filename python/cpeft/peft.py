"""Hugging Face peft-style API on top of cpeft's torch layers.

Switching from peft is one import: ``LoraConfig``, ``IA3Config``, ``get_peft_model`` and
``PeftModel.from_pretrained`` take the same arguments, match target modules by the same rules
and read and write adapter directories in peft's layout (``adapter_config.json`` plus
``adapter_model.safetensors`` with ``base_model.model.<path>.lora_A.weight``-style keys).

Targeted ``nn.Linear``, ``nn.Embedding`` and transformers' GPT-2 ``Conv1D`` modules are replaced
by cpeft layers that *share* the original weight and bias Parameters: the pretrained values are
kept without a copy, tied weights (GPT-2's ``wte``/``lm_head``) stay tied, and ``unload()`` can
put the untouched original modules back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import _autograd, layers

__all__ = [
    "ADAPTER_BIN_WEIGHTS_NAME",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CpeftModel",
    "IA3Config",
    "LoraConfig",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PeftType",
    "get_base_model_state_dict",
    "get_peft_model",
    "inject_adapter_in_model",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# peft's pickled format (save_pretrained(safe_serialization=False)); read with weights_only=True.
ADAPTER_BIN_WEIGHTS_NAME = "adapter_model.bin"


class PeftType(str, enum.Enum):
    """peft's ``PeftType`` for the methods cpeft implements: a str enum, so ``config.peft_type``
    compares equal to ``"LORA"`` and ``config.peft_type.value`` works as in peft."""

    LORA = "LORA"
    IA3 = "IA3"

_KEY_PREFIX = "base_model.model."
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
               "FEATURE_EXTRACTION")
# peft's task-specific model classes add their heads to modules_to_save.
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
               "QUESTION_ANS": ["qa_outputs"]}
_ALL_LINEAR = "all-linear"

# Subsets of peft's TRANSFORMERS_MODELS_TO_{LORA,IA3}_*_MAPPING used when target_modules is None.
_LORA_DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"], "gpt_neo": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"], "t5": ["q", "v"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}
_IA3_DEFAULT_TARGETS = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
}

# Fields peft 0.21 writes that cpeft does not implement, with the value meaning "feature off".
# Files carrying any other value are refused rather than loaded with different semantics.
_LORA_UNSUPPORTED_FIELDS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16,
    "rank_pattern": {}, "target_parameters": None, "trainable_token_indices": None,
    "use_bdlora": None, "use_dora": False, "use_qalora": False, "velora_config": None,
}
_IA3_UNSUPPORTED_FIELDS = {"exclude_modules": None}
# Written by peft, meaningless for loading here.
_INFORMATIONAL_FIELDS = ("auto_mapping", "peft_version", "peft_type")


def _name_list(value: Any, field_name: str, allow_regex: bool) -> str | list[str] | None:
    """Normalises a peft module-name field: None, a regex string, or a de-duplicated list."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            return [value]
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{field_name}: expected a valid regular expression, got {value!r} ({exc})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = []
        for entry in (sorted(value) if isinstance(value, (set, frozenset)) else value):
            if not isinstance(entry, str) or not entry:
                raise ValueError(f"{field_name}: expected non-empty strings, got the entry {entry!r}")
            if entry not in names:
                names.append(entry)
        return names
    raise ValueError(f"{field_name}: expected None, a string or a list of strings, got {type(value).__name__} {value!r}")


def _check_bool(value: Any, field_name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field_name}: expected True or False, got {value!r}")


def _check_task_type(task_type: Any) -> None:
    if task_type is not None and task_type not in _TASK_TYPES:
        raise ValueError(f"task_type: expected None or one of {', '.join(_TASK_TYPES)}, got {task_type!r}")


@dataclass
class LoraConfig:
    """The LoRA subset of ``peft.LoraConfig``; same names, defaults and matching rules."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: PeftType = field(default=PeftType.LORA, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: expected a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha: expected a finite number, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected a number in [0, 1), got {self.lora_dropout!r}")
        self.target_modules = _name_list(self.target_modules, "target_modules", allow_regex=True)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias: expected 'none', 'all' or 'lora_only', got {self.bias!r}")
        _check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        if not (self.init_lora_weights is True or self.init_lora_weights is False
                or self.init_lora_weights == "gaussian"):
            raise ValueError(f"init_lora_weights: expected True, False or 'gaussian', got {self.init_lora_weights!r}")
        _check_bool(self.use_rslora, "use_rslora")
        self.modules_to_save = _name_list(self.modules_to_save, "modules_to_save", allow_regex=False)
        _check_task_type(self.task_type)
        _check_bool(self.inference_mode, "inference_mode")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        """The adapter_config.json content, with every key peft 0.21 writes."""
        out = dict(_LORA_UNSUPPORTED_FIELDS)
        out.update(dataclasses.asdict(self))
        out.update(auto_mapping=None, peft_version=None, inference_mode=True,
                   peft_type=self.peft_type.value)
        return out


@dataclass
class IA3Config:
    """The IA3 subset of ``peft.IA3Config``; same names, defaults and matching rules."""

    target_modules: str | list[str] | None = None
    feedforward_modules: str | list[str] | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: PeftType = field(default=PeftType.IA3, init=False)

    def __post_init__(self) -> None:
        self.target_modules = _name_list(self.target_modules, "target_modules", allow_regex=True)
        self.feedforward_modules = _name_list(self.feedforward_modules, "feedforward_modules", allow_regex=True)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            outside = [m for m in self.feedforward_modules if m not in self.target_modules]
            if outside:
                raise ValueError(f"feedforward_modules: expected a subset of target_modules "
                                 f"{self.target_modules}, got the extra entries {outside}")
        _check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        self.modules_to_save = _name_list(self.modules_to_save, "modules_to_save", allow_regex=False)
        _check_bool(self.init_ia3_weights, "init_ia3_weights")
        _check_task_type(self.task_type)
        _check_bool(self.inference_mode, "inference_mode")

    def to_dict(self) -> dict:
        out = dict(_IA3_UNSUPPORTED_FIELDS)
        out.update(dataclasses.asdict(self))
        out.update(auto_mapping=None, peft_version=None, inference_mode=True,
                   peft_type=self.peft_type.value)
        return out


_CONFIG_CLASSES = {"LORA": LoraConfig, "IA3": IA3Config}


def _config_from_dict(data: Any, path: str) -> LoraConfig | IA3Config:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type not in _CONFIG_CLASSES:
        raise ValueError(f"{path}: peft_type: expected 'LORA' or 'IA3', got {peft_type!r}")
    config_cls = _CONFIG_CLASSES[peft_type]
    unsupported = _LORA_UNSUPPORTED_FIELDS if peft_type == "LORA" else _IA3_UNSUPPORTED_FIELDS
    init_names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key in init_names:
            kwargs[key] = value
        elif key in unsupported:
            if value != unsupported[key] and value not in (None, False, {}, []):
                raise ValueError(f"{path}: field {key!r} = {value!r} is not supported by cpeft "
                                 f"(supported: {unsupported[key]!r})")
        elif key not in _INFORMATIONAL_FIELDS:
            warnings.warn(f"{path}: ignoring unknown field {key!r}", stacklevel=3)
    try:
        return config_cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Planning: everything that can fail is decided here, before the user's model is touched.


def _conv1d_class() -> type | None:
    # Looked up only when transformers is already loaded: a model that contains a Conv1D
    # implies it, and cpeft must not import transformers itself.
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _module_kind(module: nn.Module) -> str | None:
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Embedding:
        return "embedding"
    return None


def _in_out_features(module: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    if kind == "linear":
        return module.in_features, module.out_features
    return module.num_embeddings, module.embedding_dim


@dataclass
class _Target:
    path: str
    module: nn.Module
    kind: str
    in_features: int
    out_features: int
    feedforward: bool = False


@dataclass
class _Plan:
    config: LoraConfig | IA3Config
    targets: list[_Target]
    saved_paths: list[str]


def _is_adapter_layer(module: nn.Module) -> bool:
    return isinstance(module, (layers.Linear, layers.Embedding, layers.IA3Linear, layers.IA3Embedding,
                               ModulesToSaveWrapper))


def _matches(pattern: str | list[str], name: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return name in pattern or any(name.endswith("." + entry) for entry in pattern)


def _matches_modules_to_save(modules_to_save: list[str] | None, name: str) -> bool:
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name)
                                         for m in modules_to_save)


def _resolve_config(model: nn.Module, config: LoraConfig | IA3Config) -> LoraConfig | IA3Config:
    """A copy of ``config`` with defaults that depend on the model filled in, as peft does."""
    config = copy.deepcopy(config)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is None:
        defaults = _LORA_DEFAULT_TARGETS if isinstance(config, LoraConfig) else _IA3_DEFAULT_TARGETS
        if model_type not in defaults:
            raise ValueError(f"target_modules: None has no default for model_type {model_type!r}; "
                             f"pass target_modules explicitly")
        if isinstance(config, LoraConfig):
            config.target_modules = list(defaults[model_type])
        else:
            config.target_modules, default_feedforward = (list(v) for v in defaults[model_type])
            if config.feedforward_modules is None:
                config.feedforward_modules = default_feedforward
    if isinstance(config, IA3Config) and config.feedforward_modules is None:
        config.feedforward_modules = []
    if isinstance(config, LoraConfig) and config.target_modules == _ALL_LINEAR:
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                 if _module_kind(module) in ("linear", "conv1d") and module is not output_layer}
        config.target_modules = sorted(names)
    heads = _TASK_HEADS.get(config.task_type, [])
    if heads:
        config.modules_to_save = (config.modules_to_save or []) + [h for h in heads
                                                                    if h not in (config.modules_to_save or [])]
    return config


def _plan(model: nn.Module, config: LoraConfig | IA3Config) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, PeftModel):
        raise ValueError("model: expected a plain model, got a cpeft PeftModel; pass "
                         "model.get_base_model() or call unload() first")
    if not isinstance(config, (LoraConfig, IA3Config)):
        raise TypeError(f"config: expected cpeft.LoraConfig or cpeft.IA3Config, got {type(config).__name__}")
    for name, module in model.named_modules():
        if _is_adapter_layer(module):
            raise ValueError(f"model: already contains a cpeft adapter layer at {name!r}; "
                             f"call unload() on its PeftModel first")
    config = _resolve_config(model, config)
    is_lora = isinstance(config, LoraConfig)
    targets: list[_Target] = []
    for name, module in model.named_modules():
        if not name or _matches_modules_to_save(config.modules_to_save, name):
            continue
        if not _matches(config.target_modules, name):
            continue
        kind = _module_kind(module)
        if kind is None:
            raise ValueError(f"target_modules: the module {name!r} ({type(module).__name__}) is not supported; "
                             f"cpeft replaces torch.nn.Linear, torch.nn.Embedding and transformers' Conv1D")
        if kind == "embedding" and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
            raise ValueError(f"target_modules: the embedding {name!r} uses max_norm, scale_grad_by_freq "
                             f"or sparse, which cpeft's Embedding does not support")
        in_features, out_features = _in_out_features(module, kind)
        feedforward = False
        if not is_lora:
            feedforward = (re.fullmatch(config.feedforward_modules, name) is not None
                           if isinstance(config.feedforward_modules, str)
                           else any(name.endswith(entry) for entry in config.feedforward_modules))
            if feedforward and kind == "embedding":
                raise ValueError(f"feedforward_modules: {name!r} is an embedding; only linear layers "
                                 f"can scale their input")
        targets.append(_Target(name, module, kind, in_features, out_features, feedforward))
    if not targets:
        raise ValueError(f"target_modules: {config.target_modules!r} matched no module of the model")
    # As in peft: the layer layout decides, and the stored config records what was used.
    if any(t.kind == "conv1d" for t in targets) and not config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                      "Setting fan_in_fan_out to True.", stacklevel=3)
        config.fan_in_fan_out = True
    elif config.fan_in_fan_out and not any(t.kind == "conv1d" for t in targets):
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.", stacklevel=3)
        config.fan_in_fan_out = False
    saved_paths: list[str] = []
    target_paths = {t.path for t in targets}
    for name, _ in model.named_modules():
        if not name or not config.modules_to_save or name in target_paths:
            continue
        if any(name.endswith(m) for m in config.modules_to_save) \
                and not any(name.startswith(p + ".") for p in saved_paths):
            saved_paths.append(name)
    return _Plan(config, targets, saved_paths)


def _expected_adapter_shapes(model: nn.Module, plan: _Plan) -> dict[str, tuple[int, ...]]:
    """peft key -> tensor shape in the file, computed from the plan alone (nothing built yet)."""
    config = plan.config
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan.targets:
        key = _KEY_PREFIX + t.path
        if isinstance(config, LoraConfig):
            if t.kind == "embedding":
                shapes[key + ".lora_embedding_A"] = (config.r, t.in_features)
                shapes[key + ".lora_embedding_B"] = (t.out_features, config.r)
            else:
                shapes[key + ".lora_A.weight"] = (config.r, t.in_features)
                shapes[key + ".lora_B.weight"] = (t.out_features, config.r)
        else:
            shapes[key + ".ia3_l"] = (1, t.in_features) if t.feedforward else (t.out_features, 1)
    for path in plan.saved_paths:
        for name, tensor in model.get_submodule(path).state_dict().items():
            shapes[f"{_KEY_PREFIX}{path}.{name}"] = tuple(tensor.shape)
    bias_slots = _trainable_bias_slots(model, getattr(config, "bias", "none"),
                                       {t.path for t in plan.targets}, plan.saved_paths)
    for key, parameter in bias_slots.items():
        shapes[key] = tuple(parameter.shape)
    return shapes


def _trainable_bias_slots(model: nn.Module, mode: str, target_paths: set[str],
                         saved_paths: list[str]) -> dict[str, nn.Parameter]:
    """peft key -> bias Parameter for LoRA's bias="all"/"lora_only" (peft 0.21's key names)."""
    if mode == "none":
        return {}
    slots = {}
    for path, module in model.named_modules():
        if any(path == p or path.startswith(p + ".") for p in saved_paths):
            continue
        bias = module._parameters.get("bias")
        if bias is None:
            continue
        if path in target_paths:
            slots[f"{_KEY_PREFIX}{path}.base_layer.bias"] = bias
        elif mode == "all":
            slots[f"{_KEY_PREFIX}{path}.bias" if path else f"{_KEY_PREFIX}bias"] = bias
    return slots


# ---------------------------------------------------------------------------------------------
# Building the adapter layers.


class ModulesToSaveWrapper(nn.Module):
    """peft's wrapper for ``modules_to_save``: a frozen original and a trainable copy used in forward."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(original_module)})

    @property
    def trained_module(self) -> nn.Module:
        return self.modules_to_save["default"]

    def forward(self, *args, **kwargs):
        return self.trained_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.trained_module, name)


def _build_lora_layer(t: _Target, config: LoraConfig) -> nn.Module:
    weight = t.module.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    if t.kind == "embedding":
        layer = layers.Embedding(t.in_features, t.out_features, r=config.r, lora_alpha=config.lora_alpha,
                                 merge_weights=False, padding_idx=t.module.padding_idx, **factory)
    else:
        layer = layers.Linear(t.in_features, t.out_features, r=config.r, lora_alpha=config.lora_alpha,
                              lora_dropout=config.lora_dropout, fan_in_fan_out=t.kind == "conv1d",
                              merge_weights=False, bias=t.module.bias is not None, **factory)
    _share_base_parameters(layer, t)
    layer.scaling = config.scaling
    with torch.no_grad():
        if t.kind == "embedding":
            # peft: A = 0, B ~ N(0, 1) unless init_lora_weights=False (both random).
            if config.init_lora_weights is False:
                nn.init.normal_(layer.lora_A)
            else:
                nn.init.zeros_(layer.lora_A)
            nn.init.normal_(layer.lora_B)
        else:
            if config.init_lora_weights == "gaussian":
                nn.init.normal_(layer.lora_A, std=1.0 / config.r)
            else:
                nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
            if config.init_lora_weights is False:
                nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(layer.lora_B)
    return layer


def _build_ia3_layer(t: _Target, config: IA3Config) -> nn.Module:
    weight = t.module.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    if t.kind == "embedding":
        layer = layers.IA3Embedding(t.in_features, t.out_features, merge_weights=False,
                                    padding_idx=t.module.padding_idx, **factory)
    else:
        layer = layers.IA3Linear(t.in_features, t.out_features, is_feedforward=t.feedforward,
                                 bias=t.module.bias is not None, fan_in_fan_out=t.kind == "conv1d",
                                 merge_weights=False, **factory)
    _share_base_parameters(layer, t)
    with torch.no_grad():
        if config.init_ia3_weights:
            nn.init.ones_(layer.ia3_l)
        else:
            nn.init.normal_(layer.ia3_l)
    return layer


def _share_base_parameters(layer: nn.Module, t: _Target) -> None:
    # Sharing (not copying) the pretrained Parameters keeps tied weights tied, costs no memory
    # and leaves the original module usable as the exact base path (disable_adapter, unload).
    if tuple(layer.weight.shape) != tuple(t.module.weight.shape):
        raise RuntimeError(f"cpeft layer for {t.path!r} stores its weight as {tuple(layer.weight.shape)}, "
                           f"the original module as {tuple(t.module.weight.shape)}")
    layer.weight = t.module.weight
    if "bias" in layer._parameters:
        layer.bias = t.module.bias


def _adapter_parameter_names(layer: nn.Module) -> list[str]:
    if isinstance(layer, (layers.IA3Linear, layers.IA3Embedding)):
        return ["ia3_l"]
    return ["lora_A", "lora_B"]


def _adapter_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [getattr(layer, name) for name in _adapter_parameter_names(layer)]


# peft's autocast_adapter_dtype: adapters of 16-bit layers are kept in float32 for training
# stability; the layers compute with them directly (no float32 copy of the activations).
_AUTOCAST_ADAPTER_DTYPES = (torch.float16, torch.bfloat16)


def _cast_adapter_dtype(layer: nn.Module, autocast_adapter_dtype: bool) -> None:
    if not autocast_adapter_dtype:
        return
    for name in _adapter_parameter_names(layer):
        parameter = getattr(layer, name)
        if parameter.dtype in _AUTOCAST_ADAPTER_DTYPES:
            setattr(layer, name, nn.Parameter(parameter.detach().to(torch.float32),
                                              requires_grad=parameter.requires_grad))


def _set_parent(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, module)


def _load_tensors_into(slots: dict[str, nn.Parameter | torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, destination in slots.items():
            destination.copy_(tensors[key].reshape(destination.shape))


# ---------------------------------------------------------------------------------------------
# The wrapper model.


def _core_merge_dtype(tensor: torch.Tensor) -> torch.dtype:
    return _autograd.core_dtype(tensor.dtype, tensor.device.type)


def _progress(items: list, enabled: bool, description: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progressbar=True needs tqdm, which is not installed; continuing without a bar",
                      stacklevel=4)
        return items
    return tqdm(items, desc=description)


class _TunerModel(nn.Module):
    """Holds the user's model as ``.model`` so that parameter names read ``base_model.model.<path>``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model with cpeft adapter layers in place; peft's ``PeftModel`` surface for one adapter."""

    def __init__(self, model: nn.Module, plan: _Plan, autocast_adapter_dtype: bool = True):
        super().__init__()
        _check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        config = plan.config
        self.base_model = _TunerModel(model)
        self.peft_config = {"default": config}
        self.active_adapter = "default"
        # (path, original module, adapter module). A plain list keeps the originals out of the
        # module tree: they share their Parameters with the adapter layers.
        self._swaps: list[tuple[str, nn.Module, nn.Module]] = []
        build = _build_lora_layer if isinstance(config, LoraConfig) else _build_ia3_layer
        # Every layer is built before the first one goes in, so a failure leaves the model as it was.
        built = [(t, build(t, config)) for t in plan.targets]
        for _, layer in built:
            _cast_adapter_dtype(layer, autocast_adapter_dtype)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for t, layer in built:
            layer.train(t.module.training)
            _set_parent(model, t.path, layer)
            self._swaps.append((t.path, t.module, layer))
            for parameter in _adapter_parameters(layer):
                parameter.requires_grad_(not config.inference_mode)
        for path in plan.saved_paths:
            original = model.get_submodule(path)
            wrapper = ModulesToSaveWrapper(original)
            for parameter in wrapper.trained_module.parameters():
                parameter.requires_grad_(not config.inference_mode)
            _set_parent(model, path, wrapper)
            self._swaps.append((path, original, wrapper))
        self._target_paths = {t.path for t in plan.targets}
        self._saved_paths = list(plan.saved_paths)
        for parameter in self._bias_slots().values():
            parameter.requires_grad_(not config.inference_mode)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    def forward(self, *args, **kwargs):
        return self.base_model.model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                trainable += parameter.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the original modules (sharing the pretrained weights) instead of the adapters."""
        model = self.base_model.model
        for path, original, _ in self._swaps:
            _set_parent(model, path, original)
        try:
            yield
        finally:
            for path, _, adapter in self._swaps:
                _set_parent(model, path, adapter)

    def _adapter_slots(self) -> dict[str, torch.Tensor]:
        """peft key -> live tensor, in the shape peft stores."""
        slots: dict[str, torch.Tensor] = {}
        for path, _, module in self._swaps:
            key = _KEY_PREFIX + path
            if isinstance(module, ModulesToSaveWrapper):
                for name, tensor in module.trained_module.state_dict(keep_vars=True).items():
                    slots[f"{key}.{name}"] = tensor
            elif isinstance(module, layers.Embedding):
                slots[key + ".lora_embedding_A"] = module.lora_A
                slots[key + ".lora_embedding_B"] = module.lora_B
            elif isinstance(module, layers.Linear):
                slots[key + ".lora_A.weight"] = module.lora_A
                slots[key + ".lora_B.weight"] = module.lora_B
            else:
                feedforward = getattr(module, "is_feedforward", False)
                slots[key + ".ia3_l"] = module.ia3_l.view(
                    (1, -1) if feedforward else (-1, 1))
        slots.update(self._bias_slots())
        return slots

    def _bias_slots(self) -> dict[str, nn.Parameter]:
        return _trainable_bias_slots(self.base_model.model, getattr(self.peft_config["default"], "bias", "none"),
                                     self._target_paths, self._saved_paths)

    def get_adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors peft would save, under peft's key names, detached on the CPU."""
        return {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in self._adapter_slots().items()}

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        is_main_process: bool = True) -> None:
        """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's layout), or
        peft's pickled ``adapter_model.bin`` with ``safe_serialization=False``. Only the process
        with ``is_main_process=True`` writes (peft's rule for distributed runs)."""
        _check_bool(safe_serialization, "safe_serialization")
        _check_bool(is_main_process, "is_main_process")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: expected a directory, got the file {save_directory!r}")
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        config_path = os.path.join(save_directory, ADAPTER_CONFIG_NAME)
        tensors = self.get_adapter_state_dict()
        # Written beside the target and renamed, so an interrupted save never leaves a
        # half-written file under the name a loader looks for.
        if safe_serialization:
            from safetensors.torch import save_file

            weights_path = os.path.join(save_directory, ADAPTER_WEIGHTS_NAME)
            save_file(tensors, weights_path + ".tmp", metadata={"format": "pt"})
        else:
            weights_path = os.path.join(save_directory, ADAPTER_BIN_WEIGHTS_NAME)
            torch.save(tensors, weights_path + ".tmp")
        os.replace(weights_path + ".tmp", weights_path)
        with open(config_path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(self.peft_config["default"].to_dict(), handle, indent=2, sort_keys=True)
        os.replace(config_path + ".tmp", config_path)

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError(
            "push_to_hub: cpeft does not upload to the Hugging Face Hub; call "
            "save_pretrained(directory) and upload that directory (peft's file layout) with "
            "huggingface_hub's upload_folder")

    def _restore(self, merge: bool, progressbar: bool = False) -> nn.Module:
        model = self.base_model.model
        if merge:
            self._warn_about_tied_targets()
        for path, original, adapter in _progress(self._swaps, progressbar,
                                                 "Unloading and merging model" if merge else "Unloading model"):
            if isinstance(adapter, ModulesToSaveWrapper):
                _set_parent(model, path, adapter.trained_module if merge else original)
                continue
            if merge:
                # The layer's own merge (loralib's merge-on-eval) writes into the shared weight,
                # i.e. into the original module that goes back into the model.
                adapter.merge_weights = True
                adapter.train(False)
                if not adapter.merged:
                    raise RuntimeError(f"cpeft layer {path!r} did not merge")
            _set_parent(model, path, original)
        self._swaps = []
        return model

    def _adapters_to_merge(self, adapter_names: Any) -> list[str]:
        if adapter_names is None:
            return [self.active_adapter]
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ValueError(f"adapter_names: expected None or a list of adapter names, got {adapter_names!r}")
        unknown = [name for name in adapter_names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter_names: {unknown} are not adapters of this model "
                             f"(it has {list(self.peft_config)})")
        return list(dict.fromkeys(adapter_names))

    def _check_merge_is_finite(self) -> None:
        """safe_merge: every layer's merge is done on a copy first; nothing is written unless
        all merged tensors are finite (peft's check, raised before any weight changes)."""
        for path, _, adapter in self._swaps:
            if isinstance(adapter, ModulesToSaveWrapper):
                continue
            targets = adapter._merge_targets()
            work = {name: t.to(_core_merge_dtype(t), copy=True) for name, t in targets.items()}
            adapter._merge_tensors(work)
            for name, merged in work.items():
                if not bool(torch.isfinite(merged.to(targets[name].dtype)).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter "
                                     f"{self.active_adapter} seems to be broken (layer {path!r}, {name}); "
                                     f"no weight was changed")

    def _warn_about_tied_targets(self) -> None:
        # A merge writes into the shared Parameter, so every module tied to it changes too
        # (GPT-2's lm_head when wte is targeted), exactly as in peft.
        uses: dict[int, int] = {}
        for _, parameter in self.base_model.model.named_parameters(remove_duplicate=False):
            uses[id(parameter)] = uses.get(id(parameter), 0) + 1
        tied = [path for path, original, _ in self._swaps
                if not isinstance(original, ModulesToSaveWrapper) and uses.get(id(original.weight), 0) > 1]
        if tied:
            warnings.warn(f"merge_and_unload: the weights of {tied} are tied to other modules of the "
                          f"model; merging changes those modules as well", stacklevel=3)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Folds the adapters into the pretrained weights; returns the plain model (use the return value).

        ``safe_merge=True`` merges every layer on a copy first and raises ``ValueError`` before
        any weight changes if a merged tensor is not finite. ``adapter_names`` lists the
        adapters to merge (default: the active one; ``[]`` unloads without merging).
        ``progressbar`` shows a tqdm bar when tqdm is installed.
        """
        _check_bool(progressbar, "progressbar")
        _check_bool(safe_merge, "safe_merge")
        merge = bool(self._adapters_to_merge(adapter_names))
        if merge and safe_merge:
            self._check_merge_is_finite()
        return self._restore(merge=merge, progressbar=progressbar)

    def unload(self) -> nn.Module:
        """Removes the adapters; returns the plain model with its original modules and weights."""
        return self._restore(merge=False)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, is_trainable: bool = False, *,
                        config: LoraConfig | IA3Config | None = None, autocast_adapter_dtype: bool = True,
                        low_cpu_mem_usage: bool = False, torch_device: str | torch.device | None = None,
                        device_map: Any = None) -> PeftModel:
        """Loads an adapter directory written by cpeft or peft onto ``model``.

        The weights come from ``adapter_model.safetensors``, or from peft's pickled
        ``adapter_model.bin`` (read with ``weights_only=True``) when there is no safetensors file.
        ``config`` replaces the directory's ``adapter_config.json``. ``torch_device`` and
        ``device_map`` (one device, ``{"": device}`` or ``"auto"``) choose where the file is read
        to; the adapter parameters always live on their base layer's device. ``low_cpu_mem_usage``
        is accepted for peft compatibility: cpeft builds each adapter once, on that device.

        Every check (files, JSON, config fields, tensor keys and shapes) runs before the model is
        modified, so a failed load leaves ``model`` exactly as it was.
        """
        _check_bool(is_trainable, "is_trainable")
        _check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        _check_bool(low_cpu_mem_usage, "low_cpu_mem_usage")
        if config is not None and not isinstance(config, (LoraConfig, IA3Config)):
            raise TypeError(f"config: expected None, cpeft.LoraConfig or cpeft.IA3Config, "
                            f"got {type(config).__name__}")
        load_device = _load_device(torch_device, device_map)
        file_config, tensors, weights_path = _read_adapter_dir(model_id, load_device,
                                                               need_config=config is None)
        config = copy.deepcopy(config) if config is not None else file_config
        config.inference_mode = not is_trainable
        plan = _plan(model, config)
        expected = _expected_adapter_shapes(model, plan)
        missing = [key for key in expected if key not in tensors]
        if missing:
            raise ValueError(f"{weights_path}: missing the key {missing[0]!r} of shape {expected[missing[0]]} "
                             f"that the model needs ({len(missing)} missing in all)")
        unexpected = [key for key in tensors if key not in expected]
        if unexpected:
            raise ValueError(f"{weights_path}: the key {unexpected[0]!r} matches no adapter slot of the model "
                             f"({len(unexpected)} unexpected in all)")
        for key, shape in expected.items():
            tensor = tensors[key]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{weights_path}: key {key!r}: expected shape {shape}, got {tuple(tensor.shape)}")
            if not tensor.is_floating_point():
                raise ValueError(f"{weights_path}: key {key!r}: expected a floating-point tensor, got {tensor.dtype}")
        peft_model = cls(model, plan, autocast_adapter_dtype=autocast_adapter_dtype)
        _load_tensors_into(peft_model._adapter_slots(), tensors)
        if not is_trainable:
            peft_model.eval()
        return peft_model


CpeftModel = PeftModel


def _load_device(torch_device: Any, device_map: Any) -> torch.device:
    """The device adapter files are read to, from peft's ``torch_device`` and ``device_map``."""
    def as_device(value: Any, name: str) -> torch.device:
        if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
            raise ValueError(f"{name}: expected a device (a string such as 'cpu' or 'cuda:0', an index "
                             f"or a torch.device), got {value!r}")
        try:
            return torch.device(value)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{name}: expected a device, got {value!r} ({exc})") from None

    device = torch.device("cpu") if torch_device is None else as_device(torch_device, "torch_device")
    if device_map is None or device_map == "auto":
        return device
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map: cpeft places an adapter on one device; expected 'auto', a device "
                             f"or {{'': device}}, got a map of {len(device_map)} entries {list(device_map)[:4]}")
        device_map = device_map[""]
    mapped = as_device(device_map, "device_map")
    if torch_device is not None and mapped != device:
        raise ValueError(f"device_map: names {mapped} but torch_device names {device}; pass one of them")
    return mapped


def _read_adapter_dir(model_id: str | os.PathLike, device: torch.device | None = None, need_config: bool = True
                      ) -> tuple[LoraConfig | IA3Config | None, dict[str, torch.Tensor], str]:
    """(config or None when not needed, tensors on ``device``, the weights file's path)."""
    directory = os.fspath(model_id)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model_id: adapter directory {directory!r} does not exist")
    device = torch.device("cpu") if device is None else device
    config = None
    if need_config:
        config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path}: adapter config not found")
        try:
            with open(config_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path}: invalid JSON ({exc})") from None
        config = _config_from_dict(data, config_path)
    # peft's order: safetensors first, then the pickled file.
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    bin_path = os.path.join(directory, ADAPTER_BIN_WEIGHTS_NAME)
    if os.path.isfile(weights_path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(weights_path, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{weights_path}: not a readable safetensors file ({exc})") from None
        return config, tensors, weights_path
    if not os.path.isfile(bin_path):
        raise FileNotFoundError(f"{weights_path}: adapter weights not found (nor {ADAPTER_BIN_WEIGHTS_NAME})")
    try:
        tensors = torch.load(bin_path, map_location=device, weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file (pickle, zip, EOF, ...)
        raise ValueError(f"{bin_path}: not a readable torch state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{bin_path}: expected a dict of tensors keyed by name, got {type(tensors).__name__}")
    return config, tensors, bin_path


def get_peft_model(model: nn.Module, peft_config: LoraConfig | IA3Config, *,
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    """Injects cpeft adapter layers into ``model`` (in place) and returns the wrapper.

    The targeted modules keep their pretrained weights; everything except the adapters, the
    biases selected by ``bias`` and the ``modules_to_save`` copies is frozen. With
    ``autocast_adapter_dtype=True`` (peft's default) the adapters of float16/bfloat16 layers are
    float32; with False they take the layer's dtype.
    """
    return PeftModel(model, _plan(model, peft_config), autocast_adapter_dtype=autocast_adapter_dtype)


def inject_adapter_in_model(peft_config: LoraConfig | IA3Config, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, *, autocast_adapter_dtype: bool = False) -> nn.Module:
    """peft's low-level API: puts adapter layers into ``model`` in place and returns ``model``
    itself (no wrapper). As in peft 0.21 the adapters keep the layers' dtype; cpeft's extra
    ``autocast_adapter_dtype=True`` keeps float32 adapters on 16-bit layers instead."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name: expected a non-empty string, got {adapter_name!r}")
    _check_bool(low_cpu_mem_usage, "low_cpu_mem_usage")
    return PeftModel(model, _plan(model, peft_config), autocast_adapter_dtype=autocast_adapter_dtype).get_base_model()


def get_base_model_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys (peft's function): no adapter
    tensors, and the original values of ``modules_to_save`` modules."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"model: expected a cpeft PeftModel, got {type(model).__name__}")
    # The original modules share their Parameters with the adapter layers, so putting them back
    # for the duration of state_dict() yields exactly the base model's tensors.
    with model.disable_adapter():
        return dict(model.get_base_model().state_dict())
