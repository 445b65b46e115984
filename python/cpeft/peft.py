"""Hugging Face peft-style API on top of cpeft's C core.

Switching from peft is one import: ``LoraConfig``, ``IA3Config``, ``get_peft_model`` and
``PeftModel.from_pretrained`` take the same arguments, match target modules by the same rules
(including ``rank_pattern``, ``alpha_pattern``, ``layers_to_transform``/``layers_pattern`` and
``exclude_modules``) and read and write adapter directories in peft's layout
(``adapter_config.json`` plus ``adapter_model.safetensors`` with
``base_model.model.<path>.lora_A.weight``-style keys, a model card ``README.md``, non-default
adapters in subfolders named after them).

Targeted ``nn.Linear``, ``nn.Embedding`` and transformers' GPT-2 ``Conv1D`` modules are wrapped by
the layers of cpeft.tuners, which keep the original module as ``base_layer`` (pretrained values
kept without a copy, tied weights stay tied, ``unload()`` puts the untouched originals back) and
hold any number of named adapters, as peft's layers do.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import functools
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from . import tuners, tuners_conv
from .layers import _embedding_options_in_use
from .tuners import BaseTunerLayer
from .utils import _BIAS_MODES

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BaseTunerLayer",
    "CpeftModel",
    "IA3Config",
    "LoraConfig",
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_base_model_state_dict",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# peft's pickled format (save_pretrained(safe_serialization=False)); read with weights_only=True.
ADAPTER_BIN_WEIGHTS_NAME = "adapter_model.bin"
MODEL_CARD_NAME = "README.md"
DEFAULT_ADAPTER = "default"
_KEY_PREFIX = "base_model.model."


class TaskType(str, enum.Enum):
    """peft's task types (a str enum: members compare equal to their names)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


_TASK_TYPES = tuple(t.value for t in TaskType)


class PeftType(str, enum.Enum):
    """peft's ``PeftType`` for the methods cpeft implements: a str enum, so ``config.peft_type``
    compares equal to ``"LORA"`` and ``config.peft_type.value`` works as in peft. (``str()`` gives
    the value, so messages and f-strings read "LORA" on every Python version.)"""

    LORA = "LORA"
    IA3 = "IA3"

    def __str__(self) -> str:
        return self.value


# peft's task-specific model classes add their heads to modules_to_save.
_TASK_HEADS = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}
_ALL_LINEAR = "all-linear"

# Subsets of peft's TRANSFORMERS_MODELS_TO_{LORA,IA3}_*_MAPPING used when target_modules is None.
_LORA_DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
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
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
_IA3_UNSUPPORTED_FIELDS: dict[str, Any] = {}
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
            raise ValueError(
                f"{field_name}: expected a valid regular expression, got {value!r} ({exc})"
            ) from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = []
        for entry in sorted(value) if isinstance(value, (set, frozenset)) else value:
            if not isinstance(entry, str) or not entry:
                raise ValueError(
                    f"{field_name}: expected non-empty strings, got the entry {entry!r}"
                )
            if entry not in names:
                names.append(entry)
        return names
    raise ValueError(
        f"{field_name}: expected None, a string or a list of strings, got {type(value).__name__} {value!r}"
    )


def _check_bool(value: Any, field_name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field_name}: expected True or False, got {value!r}")


def _check_task_type(task_type: Any) -> None:
    if task_type is not None and task_type not in _TASK_TYPES:
        raise ValueError(
            f"task_type: expected None or one of {', '.join(_TASK_TYPES)}, got {task_type!r}"
        )


def _task_type_value(task_type: Any) -> str | None:
    if task_type is None:
        return None
    value = task_type.value if isinstance(task_type, TaskType) else task_type
    if value not in _TASK_TYPES:
        raise ValueError(
            f"task_type: expected None or one of {', '.join(_TASK_TYPES)}, got {task_type!r}"
        )
    return value


def _layer_indexes(value: Any) -> int | list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        return list(value)
    raise ValueError(
        f"layers_to_transform: expected None, a layer index or a list of layer indexes "
        f"(ints >= 0), got {value!r}"
    )


def _pattern_dict(value: Any, field_name: str, positive_int: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"{field_name}: expected a dict of regex -> value, got {type(value).__name__}"
        )
    for key, entry in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{field_name}: expected non-empty string keys, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(
                f"{field_name}: the key {key!r} is not a valid regular expression ({exc})"
            ) from None
        if positive_int:
            if isinstance(entry, bool) or not isinstance(entry, int) or entry <= 0:
                raise ValueError(
                    f"{field_name}: the rank for {key!r} must be a positive integer, got {entry!r}"
                )
        elif (
            isinstance(entry, bool)
            or not isinstance(entry, (int, float))
            or not math.isfinite(entry)
        ):
            raise ValueError(
                f"{field_name}: the alpha for {key!r} must be a finite number, got {entry!r}"
            )
    return dict(value)


@dataclass
class PeftConfig:
    """What every cpeft adapter config shares with ``peft.PeftConfig``: the task, the base model's
    name, ``inference_mode``; ``save_pretrained`` writes ``adapter_config.json`` and
    ``PeftConfig.from_pretrained`` reads one (returning the class its ``peft_type`` names)."""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        self.task_type = _task_type_value(self.task_type)
        _check_bool(self.inference_mode, "inference_mode")
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: expected None or a string, got {value!r}")

    def to_dict(self) -> dict:
        """The adapter_config.json content, with every key peft 0.21 writes."""
        out = dict(
            _LORA_UNSUPPORTED_FIELDS
            if getattr(self, "peft_type", None) == "LORA"
            else _IA3_UNSUPPORTED_FIELDS
        )
        out.update(dataclasses.asdict(self))
        out.update(auto_mapping=None, peft_version=None, inference_mode=True)
        if "peft_type" in out:
            out["peft_type"] = str(out["peft_type"])
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Writes ``adapter_config.json`` into ``save_directory`` (created if needed)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(
                f"save_directory: expected a directory, got the file {save_directory!r}"
            )
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data.update(kwargs)
        _write_json(os.path.join(save_directory, ADAPTER_CONFIG_NAME), data)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> PeftConfig:
        """Reads ``adapter_config.json`` from a local directory; ``kwargs`` override its fields."""
        directory = os.fspath(pretrained_model_name_or_path)
        if subfolder is not None:
            directory = os.path.join(directory, subfolder)
        config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(
                f"{config_path}: adapter config not found (cpeft reads local "
                f"directories only, not the Hugging Face Hub)"
            )
        data = _read_json(config_path)
        if isinstance(data, dict):
            data = dict(data, **kwargs)
        config = _config_from_dict(data, config_path)
        if cls is not PeftConfig and not isinstance(config, cls):
            raise ValueError(
                f"{config_path}: peft_type {config.peft_type!r} is not a {cls.__name__}"
            )
        return config


@dataclass
class LoraConfig(PeftConfig):
    """The LoRA subset of ``peft.LoraConfig``; same names, defaults and matching rules."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    peft_type: PeftType = field(default=PeftType.LORA, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: expected a positive integer, got {self.r!r}")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or not math.isfinite(self.lora_alpha)
        ):
            raise ValueError(f"lora_alpha: expected a finite number, got {self.lora_alpha!r}")
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not 0.0 <= self.lora_dropout < 1.0
        ):
            raise ValueError(
                f"lora_dropout: expected a number in [0, 1), got {self.lora_dropout!r}"
            )
        self.target_modules = _name_list(self.target_modules, "target_modules", allow_regex=True)
        self.exclude_modules = _name_list(self.exclude_modules, "exclude_modules", allow_regex=True)
        if self.bias not in _BIAS_MODES:
            *others, last = map(repr, _BIAS_MODES)
            raise ValueError(f"bias: expected {', '.join(others)} or {last}, got {self.bias!r}")
        _check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        if not (
            self.init_lora_weights is True
            or self.init_lora_weights is False
            or self.init_lora_weights == "gaussian"
        ):
            raise ValueError(
                f"init_lora_weights: expected True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        _check_bool(self.use_rslora, "use_rslora")
        _check_bool(self.lora_bias, "lora_bias")
        _check_bool(self.use_dora, "use_dora")
        if self.use_dora and self.lora_bias:
            raise ValueError(
                "lora_bias: True is not supported for DoRA (as in peft); pass use_dora=False"
            )
        self.modules_to_save = _name_list(
            self.modules_to_save, "modules_to_save", allow_regex=False
        )
        _check_layer_selection(self)
        self.rank_pattern = _pattern_dict(self.rank_pattern, "rank_pattern", positive_int=True)
        self.alpha_pattern = _pattern_dict(self.alpha_pattern, "alpha_pattern", positive_int=False)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_layer_selection(config: PeftConfig) -> None:
    config.layers_to_transform = _layer_indexes(config.layers_to_transform)
    config.layers_pattern = _name_list(config.layers_pattern, "layers_pattern", allow_regex=False)
    if isinstance(config.layers_pattern, list) and len(config.layers_pattern) == 1:
        config.layers_pattern = config.layers_pattern[0]
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(
            "layers_pattern: only meaningful together with layers_to_transform, which is None"
        )
    if config.layers_to_transform is not None and isinstance(config.target_modules, str):
        raise ValueError(
            "layers_to_transform: cannot be used when target_modules is a regular expression "
            "(a string); pass target_modules as a list"
        )


@dataclass
class IA3Config(PeftConfig):
    """The IA3 subset of ``peft.IA3Config``; same names, defaults and matching rules."""

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    feedforward_modules: str | list[str] | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    peft_type: PeftType = field(default=PeftType.IA3, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = _name_list(self.target_modules, "target_modules", allow_regex=True)
        self.exclude_modules = _name_list(self.exclude_modules, "exclude_modules", allow_regex=True)
        self.feedforward_modules = _name_list(
            self.feedforward_modules, "feedforward_modules", allow_regex=True
        )
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            outside = [m for m in self.feedforward_modules if m not in self.target_modules]
            if outside:
                raise ValueError(
                    f"feedforward_modules: expected a subset of target_modules "
                    f"{self.target_modules}, got the extra entries {outside}"
                )
        _check_bool(self.fan_in_fan_out, "fan_in_fan_out")
        self.modules_to_save = _name_list(
            self.modules_to_save, "modules_to_save", allow_regex=False
        )
        _check_bool(self.init_ia3_weights, "init_ia3_weights")


_CONFIG_CLASSES = {"LORA": LoraConfig, "IA3": IA3Config}


def _write_json(path: str, data: dict) -> None:
    # Written beside the target and renamed, so an interrupted save never leaves a half-written
    # file under the name a loader looks for.
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _write_weights(
    directory: str, tensors: dict[str, torch.Tensor], safe_serialization: bool
) -> None:
    """adapter_model.safetensors, or peft's pickled adapter_model.bin; written beside the target
    and renamed, like _write_json."""
    if safe_serialization:
        from safetensors.torch import save_file

        path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
        save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    else:
        path = os.path.join(directory, ADAPTER_BIN_WEIGHTS_NAME)
        torch.save(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


def _read_json(config_path: str) -> Any:
    try:
        with open(config_path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise ValueError(
            f"{config_path}: cannot read the adapter config ({exc.strerror or exc})"
        ) from None
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, bad UTF-8 and integers beyond Python's digit limit;
        # RecursionError is json's answer to deeply nested arrays or objects.
        raise ValueError(f"{config_path}: invalid JSON ({type(exc).__name__}: {exc})") from None


def _config_from_file(config_path: str) -> LoraConfig | IA3Config:
    data = _read_json(config_path)
    try:
        return _config_from_dict(data, config_path)
    except (TypeError, RecursionError) as exc:
        # A field of an unexpected JSON type that a check did not anticipate, or a value nested
        # too deeply to print in a message.
        raise ValueError(
            f"{config_path}: unusable adapter config ({type(exc).__name__}: {exc})"
        ) from None


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
                raise ValueError(
                    f"{path}: field {key!r} = {value!r} is not supported by cpeft "
                    f"(supported: {unsupported[key]!r})"
                )
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
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Embedding:
        return "embedding"
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return "conv"
    if type(module) is nn.MultiheadAttention:
        return "mha"
    return None


def _in_out_features(module: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv":
        return module.in_channels, module.out_channels
    if kind == "mha":
        return module.embed_dim, 3 * module.embed_dim
    return module.num_embeddings, module.embedding_dim


def _kind_refusal(base: nn.Module, kind: str, config: PeftConfig, r: int) -> str | None:
    """Why this module cannot carry the config's adapter (None when it can)."""
    is_lora = isinstance(config, LoraConfig)
    if kind == "conv":
        return tuners_conv.conv_refusal(base, "lora" if is_lora else "ia3", r)
    if kind == "mha":
        if not is_lora:
            return "IA3 does not adapt nn.MultiheadAttention (as in peft)"
        if not base._qkv_same_embed_dim:
            return "only nn.MultiheadAttention with packed q/k/v (kdim = vdim = embed_dim) is supported, as in peft"
        if config.lora_bias:
            return "lora_bias=True is not supported for MultiheadAttention"
    if kind == "embedding" and is_lora and config.lora_bias:
        return "lora_bias=True is not supported for Embedding (as in peft)"
    return None


@dataclass
class _Target:
    path: str
    module: nn.Module  # what is at ``path`` now: the original module or a cpeft layer
    kind: str
    in_features: int
    out_features: int
    feedforward: bool = False
    r: int = 0
    lora_alpha: float = 0.0


@dataclass
class _Plan:
    config: LoraConfig | IA3Config
    targets: list[_Target]
    saved_paths: list[str]


def _is_excluded(config: PeftConfig, name: str) -> bool:
    excluded = getattr(config, "exclude_modules", None)
    if not excluded:
        return False
    if isinstance(excluded, str):
        return re.fullmatch(excluded, name) is not None
    return name in excluded or any(name.endswith("." + entry) for entry in excluded)


def _layer_index_allowed(config: PeftConfig, name: str) -> bool:
    """peft's ``layers_to_transform``/``layers_pattern`` rule: the first numbered path segment
    (after ``layers_pattern`` when given) must be one of the selected layer indexes."""
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _matches(config: PeftConfig, name: str) -> bool:
    pattern = config.target_modules
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    if name in pattern:
        return True
    return any(name.endswith("." + entry) for entry in pattern) and _layer_index_allowed(
        config, name
    )


def _pattern_key(pattern_keys, name: str) -> str | None:
    """peft's ``get_pattern_key``: the first key matching a dotted suffix of ``name``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _matches_modules_to_save(modules_to_save: list[str] | None, name: str) -> bool:
    return bool(modules_to_save) and any(
        re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save
    )


def _resolve_config(model: nn.Module, config: LoraConfig | IA3Config) -> LoraConfig | IA3Config:
    """A copy of ``config`` with defaults that depend on the model filled in, as peft does."""
    config = copy.deepcopy(config)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is None:
        defaults = _LORA_DEFAULT_TARGETS if isinstance(config, LoraConfig) else _IA3_DEFAULT_TARGETS
        if model_type not in defaults:
            raise ValueError(
                f"target_modules: None has no default for model_type {model_type!r}; "
                f"pass target_modules explicitly"
            )
        if isinstance(config, LoraConfig):
            config.target_modules = list(defaults[model_type])
        else:
            config.target_modules, default_feedforward = (list(v) for v in defaults[model_type])
            if config.feedforward_modules is None:
                config.feedforward_modules = default_feedforward
    if isinstance(config, IA3Config) and config.feedforward_modules is None:
        config.feedforward_modules = []
    if isinstance(config, LoraConfig) and config.target_modules == _ALL_LINEAR:
        output_layer = (
            model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        )
        if isinstance(output_layer, BaseTunerLayer):
            output_layer = output_layer.get_base_layer()
        names = {
            name.rsplit(".", 1)[-1]
            for name, module in _plain_named_modules(model)
            if _module_kind(module) in ("linear", "conv1d") and _base_of(module) is not output_layer
        }
        config.target_modules = sorted(names)
    heads = _TASK_HEADS.get(config.task_type, [])
    if heads:
        config.modules_to_save = (config.modules_to_save or []) + [
            h for h in heads if h not in (config.modules_to_save or [])
        ]
    return config


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _plain_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the insides of cpeft layers and modules_to_save wrappers: the
    paths a config's names are matched against, as in a model without adapters."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        yield name, module
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            inside.append(name + ".")


def _plan(
    model: nn.Module, config: LoraConfig | IA3Config, adapter_name: str = DEFAULT_ADAPTER
) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, PeftModel):
        raise ValueError(
            "model: expected a plain model, got a cpeft PeftModel; pass "
            "model.get_base_model() or call unload() first"
        )
    if not isinstance(config, (LoraConfig, IA3Config)):
        raise TypeError(
            f"config: expected cpeft.LoraConfig or cpeft.IA3Config, got {type(config).__name__}"
        )
    _check_adapter_name(adapter_name)
    config = _resolve_config(model, config)
    is_lora = isinstance(config, LoraConfig)
    layer_class = tuners.LoraLayer if is_lora else tuners.IA3Layer
    targets: list[_Target] = []
    excluded_any = False
    used_rank_keys: set[str] = set()
    used_alpha_keys: set[str] = set()
    for name, module in _plain_named_modules(model):
        if not name or _matches_modules_to_save(config.modules_to_save, name):
            continue
        if not _matches(config, name):
            continue
        if _is_excluded(config, name):
            excluded_any = True
            continue
        if isinstance(module, ModulesToSaveWrapper):
            raise ValueError(
                f"target_modules: {name!r} is a modules_to_save copy of another adapter; "
                f"it cannot also be an adapter target"
            )
        kind = _module_kind(module)
        if kind is None:
            raise ValueError(
                f"target_modules: the module {name!r} ({type(module).__name__}) is not supported; "
                f"cpeft adapts torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/2d/3d, "
                f"torch.nn.MultiheadAttention and transformers' Conv1D"
            )
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, layer_class):
                raise ValueError(
                    f"target_modules: {name!r} already holds {type(module).__name__} adapters "
                    f"{module.adapter_names}; cpeft does not stack {config.peft_type} adapters on "
                    f"another adapter type in one module"
                )
            if adapter_name in module.adapter_names:
                raise ValueError(
                    f"adapter_name: {name!r} already holds an adapter named {adapter_name!r}"
                )
        base = _base_of(module)
        options_in_use = _embedding_options_in_use(base) if kind == "embedding" else []
        if options_in_use:
            raise ValueError(
                f"target_modules: the embedding {name!r} uses "
                f"{' and '.join(options_in_use)}, which cpeft's Embedding does not "
                f"support"
            )
        if is_lora and config.use_dora and kind in ("conv", "mha"):
            raise ValueError(
                f"use_dora: {name!r} is a {type(base).__name__}; cpeft runs DoRA on linear, "
                f"Conv1D and embedding targets only"
            )
        in_features, out_features = _in_out_features(base, kind)
        target = _Target(name, module, kind, in_features, out_features)
        if is_lora:
            rank_key = _pattern_key(config.rank_pattern, name)
            alpha_key = _pattern_key(config.alpha_pattern, name)
            used_rank_keys.add(rank_key)
            used_alpha_keys.add(alpha_key)
            target.r = config.rank_pattern.get(rank_key, config.r)
            target.lora_alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
        else:
            feedforward = (
                re.fullmatch(config.feedforward_modules, name) is not None
                if isinstance(config.feedforward_modules, str)
                else any(name.endswith(entry) for entry in config.feedforward_modules)
            )
            if feedforward and kind == "embedding":
                raise ValueError(
                    f"feedforward_modules: {name!r} is an embedding; only linear layers "
                    f"can scale their input"
                )
            if isinstance(module, tuners.IA3Layer) and module.is_feedforward != feedforward:
                raise ValueError(
                    f"feedforward_modules: {name!r} already holds IA3 adapters with "
                    f"is_feedforward={module.is_feedforward}; a new adapter cannot change it"
                )
            target.feedforward = feedforward
        refusal = _kind_refusal(base, kind, config, target.r)
        if refusal is not None:
            raise ValueError(f"target_modules: {name!r} ({type(base).__name__}): {refusal}")
        targets.append(target)
    if not targets:
        if excluded_any:
            raise ValueError(
                f"target_modules: every module matching {config.target_modules!r} is excluded "
                f"by exclude_modules {config.exclude_modules!r}"
            )
        raise ValueError(
            f"target_modules: {config.target_modules!r} matched no module of the model"
        )
    if is_lora:
        for field_name, keys, used in (
            ("rank_pattern", config.rank_pattern, used_rank_keys),
            ("alpha_pattern", config.alpha_pattern, used_alpha_keys),
        ):
            unused = [key for key in keys if key not in used]
            if unused:
                raise ValueError(
                    f"{field_name}: the key {unused[0]!r} matches no targeted module "
                    f"(targets: {[t.path for t in targets][:8]}...)"
                )
    # As in peft: the layer layout decides, and the stored config records what was used.
    if any(t.kind == "conv1d" for t in targets) and not config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. "
            "Setting fan_in_fan_out to True.",
            stacklevel=3,
        )
        config.fan_in_fan_out = True
    elif config.fan_in_fan_out and not any(t.kind == "conv1d" for t in targets):
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
            "Setting fan_in_fan_out to False.",
            stacklevel=3,
        )
        config.fan_in_fan_out = False
    saved_paths: list[str] = []
    target_paths = {t.path for t in targets}
    for name, module in _plain_named_modules(model):
        if not name or not config.modules_to_save or name in target_paths:
            continue
        if any(name.endswith(m) for m in config.modules_to_save) and not any(
            name.startswith(p + ".") for p in saved_paths
        ):
            if isinstance(module, BaseTunerLayer):
                raise ValueError(
                    f"modules_to_save: {name!r} holds adapters; it cannot also be saved whole"
                )
            saved_paths.append(name)
    return _Plan(config, targets, saved_paths)


def _check_adapter_name(adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name: expected a non-empty string, got {adapter_name!r}")
    if "." in adapter_name or adapter_name == "__base__":
        raise ValueError(
            f"adapter_name: {adapter_name!r} cannot be used as an adapter name "
            f"(no '.', and '__base__' means 'no adapter' in mixed batches)"
        )


def _expected_adapter_shapes(model: nn.Module, plan: _Plan) -> dict[str, tuple[int, ...]]:
    """peft file key -> tensor shape, computed from the plan alone (nothing built yet)."""
    config = plan.config
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan.targets:
        key = _KEY_PREFIX + t.path
        base = _base_of(t.module)
        if isinstance(config, LoraConfig):
            if t.kind == "embedding":
                shapes[key + ".lora_embedding_A"] = (t.r, t.in_features)
                shapes[key + ".lora_embedding_B"] = (t.out_features, t.r)
            elif t.kind == "conv":
                ones = (1,) * (base.weight.dim() - 2)
                shapes[key + ".lora_A.weight"] = (t.r, t.in_features, *base.kernel_size)
                shapes[key + ".lora_B.weight"] = (t.out_features, t.r // base.groups, *ones)
            else:
                shapes[key + ".lora_A.weight"] = (t.r, t.in_features)
                shapes[key + ".lora_B.weight"] = (t.out_features, t.r)
            if config.lora_bias:
                shapes[key + ".lora_B.bias"] = (t.out_features,)
            if config.use_dora:
                shapes[key + ".lora_magnitude_vector"] = (t.out_features,)
            if t.kind == "mha":
                embed = base.embed_dim
                shapes[key + ".base_layer.out_proj.lora_A.weight"] = (t.r, embed)
                shapes[key + ".base_layer.out_proj.lora_B.weight"] = (embed, t.r)
        elif t.kind == "conv":
            channels = t.in_features if t.feedforward else t.out_features
            shapes[key + ".ia3_l"] = (1, channels) + (1,) * (base.weight.dim() - 2)
        else:
            shapes[key + ".ia3_l"] = (1, t.in_features) if t.feedforward else (t.out_features, 1)
    for path in plan.saved_paths:
        for name, tensor in model.get_submodule(path).state_dict().items():
            shapes[f"{_KEY_PREFIX}{path}.{name}"] = tuple(tensor.shape)
    for key, parameter in _trainable_bias_slots(
        model, getattr(config, "bias", "none"), {t.path for t in plan.targets}, plan.saved_paths
    ).items():
        shapes[key] = tuple(parameter.shape)
    return shapes


def _integer_slots(model: nn.Module, plan: _Plan) -> dict[str, torch.dtype]:
    """peft key -> dtype of the non-floating tensors of ``modules_to_save`` (a BatchNorm's int64
    ``num_batches_tracked``): loaded only from a tensor of that very dtype, never cast."""
    return {
        f"{_KEY_PREFIX}{path}.{name}": tensor.dtype
        for path in plan.saved_paths
        for name, tensor in model.get_submodule(path).state_dict().items()
        if not tensor.is_floating_point()
    }


def _trainable_bias_slots(
    model: nn.Module, mode: str, target_paths: set[str], saved_paths: list[str]
) -> dict[str, nn.Parameter]:
    """peft file key -> bias Parameter for LoRA's bias="all"/"lora_only" (peft 0.21's key names:
    a targeted module's bias is ``<path>.base_layer.bias``)."""
    if mode == "none":
        return {}
    slots = {}
    for path, module in _plain_named_modules(model):
        if any(path == p or path.startswith(p + ".") for p in saved_paths):
            continue
        base = _base_of(module)
        bias = base._parameters.get("bias") if isinstance(base._parameters, dict) else None
        if bias is None:
            continue
        if path in target_paths or isinstance(module, BaseTunerLayer):
            if path in target_paths or mode == "all":
                slots[f"{_KEY_PREFIX}{path}.base_layer.bias"] = bias
        elif mode == "all":
            slots[f"{_KEY_PREFIX}{path}.bias" if path else f"{_KEY_PREFIX}bias"] = bias
    return slots


# ---------------------------------------------------------------------------------------------
# Building the adapter layers.


class ModulesToSaveWrapper(nn.Module):
    """peft's wrapper for ``modules_to_save``: the frozen original and one trainable copy per
    adapter (``modules_to_save.<adapter>``); the active adapter's copy runs in forward."""

    def __init__(self, original_module: nn.Module, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict({adapter_name: copy.deepcopy(original_module)})
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self._mixed_adapter_names: list[str] | None = None

    def add_adapter(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    @property
    def trained_module(self) -> nn.Module:
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        names = self._mixed_adapter_names
        if names is not None and not self.disable_adapters:
            return self._mixed_forward(names, *args, **kwargs)
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.trained_module(*args, **kwargs)

    def _mixed_forward(self, names: list[str], x: torch.Tensor, *args, **kwargs):
        """Each sample through its adapter's copy (the original for others), as peft does."""
        if x.shape[0] != len(names):
            raise ValueError(
                f"adapter_names: expected one name per sample, i.e. {x.shape[0]} names for "
                f"an input of shape {tuple(x.shape)}, got {len(names)}"
            )
        result = self.original_module(x, *args, **kwargs)
        for adapter in dict.fromkeys(names):
            if adapter not in self.modules_to_save:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == adapter], device=x.device)
            result = result.index_put(
                (rows,), self.modules_to_save[adapter](x[rows], *args, **kwargs)
            )
        return result

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if (
                name in ("original_module", "modules_to_save", "active_adapter", "disable_adapters")
                or "_modules" not in self.__dict__
            ):
                raise
            # As peft: the attributes of the copy that runs (the original when disabled).
            if self.disable_adapters or self.active_adapter not in self.modules_to_save:
                return getattr(self.original_module, name)
            return getattr(self.trained_module, name)


def _new_layer(t: _Target, config: LoraConfig | IA3Config) -> BaseTunerLayer:
    if t.kind == "conv":
        if isinstance(config, LoraConfig):
            return tuners_conv.Conv(t.module)
        return tuners_conv.IA3Conv(t.module, is_feedforward=t.feedforward)
    if t.kind == "mha":
        return tuners_conv.MultiheadAttention(t.module)
    if isinstance(config, LoraConfig):
        if t.kind == "embedding":
            return tuners.Embedding(t.module, t.in_features, t.out_features)
        return tuners.Linear(
            t.module, t.in_features, t.out_features, fan_in_fan_out=t.kind == "conv1d"
        )
    if t.kind == "embedding":
        return tuners.IA3Embedding(t.module, t.in_features, t.out_features)
    return tuners.IA3Linear(
        t.module,
        t.in_features,
        t.out_features,
        is_feedforward=t.feedforward,
        fan_in_fan_out=t.kind == "conv1d",
    )


def _add_lora(layer: BaseTunerLayer, adapter: str, t: _Target, config: LoraConfig) -> None:
    if t.kind == "embedding":
        layer.update_layer(adapter, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora)
    else:
        layer.update_layer(
            adapter,
            t.r,
            t.lora_alpha,
            config.lora_dropout,
            config.use_rslora,
            lora_bias=config.lora_bias,
        )
    _init_lora(layer, adapter, t, config)
    if t.kind == "mha":
        _init_lora(layer.base_layer.out_proj, adapter, t, config)


def _init_lora(layer: BaseTunerLayer, adapter: str, t: _Target, config: LoraConfig) -> None:
    with torch.no_grad():
        if t.kind == "embedding":
            lora_a, lora_b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
            # peft: A = 0, B ~ N(0, 1) unless init_lora_weights=False (both random).
            if config.init_lora_weights is False:
                nn.init.normal_(lora_a)
            else:
                nn.init.zeros_(lora_a)
            nn.init.normal_(lora_b)
        else:
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if config.init_lora_weights == "gaussian":
                nn.init.normal_(lora_a, std=1.0 / t.r)
            else:
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            if config.init_lora_weights is False:
                nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
            else:
                nn.init.zeros_(lora_b)
                if layer.lora_B[adapter].bias is not None:
                    nn.init.zeros_(layer.lora_B[adapter].bias)
    if config.use_dora:
        # peft: the magnitude starts as the row norms of W + s·B·A with the initialized A, B.
        layer.add_dora_magnitude(adapter)


# peft's autocast_adapter_dtype: adapters of 16-bit layers are kept in float32 for training
# stability; the layers compute with them directly (no float32 copy of the activations).
_AUTOCAST_ADAPTER_DTYPES = (torch.float16, torch.bfloat16)


def _cast_adapter_dtype(layer: BaseTunerLayer, adapter: str, autocast_adapter_dtype: bool) -> None:
    if not autocast_adapter_dtype:
        return
    # Nested layers too (MultiheadAttention's out_proj), as peft walks every tuner layer.
    for sublayer in layer.modules():
        if not isinstance(sublayer, BaseTunerLayer):
            continue
        for container_name in sublayer.adapter_layer_names:
            container = getattr(sublayer, container_name)
            if adapter not in container:
                continue
            entry = container[adapter]
            if isinstance(entry, nn.Module):
                for parameter in entry.parameters():
                    if parameter.dtype in _AUTOCAST_ADAPTER_DTYPES:
                        parameter.data = parameter.data.to(torch.float32)
            elif entry.dtype in _AUTOCAST_ADAPTER_DTYPES:
                container[adapter] = nn.Parameter(
                    entry.detach().to(torch.float32), requires_grad=entry.requires_grad
                )


def _progress(items: list, enabled: bool, description: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn(
            "progressbar=True needs tqdm, which is not installed; continuing without a bar",
            stacklevel=4,
        )
        return items
    return tqdm(items, desc=description)


def _set_parent(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, module)


# ---------------------------------------------------------------------------------------------
# The wrapper model.


class _TunerModel(nn.Module):
    """peft's ``LoraModel``/``IA3Model`` position: holds the user's model as ``.model`` so that
    parameter names read ``base_model.model.<path>``; ``set_adapter`` here takes several names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def tuner_layers(self) -> Iterator[tuple[str, BaseTunerLayer]]:
        for name, module in _plain_named_modules(self.model):
            if isinstance(module, BaseTunerLayer):
                yield name, module

    def wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in _plain_named_modules(self.model):
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activates one or several adapters (several: their outputs are summed, as in peft)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for _, layer in self.tuner_layers():
            layer.set_adapter(names, inference_mode=inference_mode)
        for _, wrapper in self.wrappers():
            held = [n for n in names if n in wrapper.modules_to_save]
            if held:
                wrapper.active_adapter = held[0]
            for adapter, copy_module in wrapper.modules_to_save.items():
                copy_module.requires_grad_(adapter in held[:1] and not inference_mode)

    def _set_adapter_layers(self, enabled: bool) -> None:
        for _, layer in self.tuner_layers():
            layer.enable_adapters(enabled)
        for _, wrapper in self.wrappers():
            wrapper.disable_adapters = not enabled

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)


class _ForwardWithBaseSignature:
    """``PeftModel.forward`` as seen from outside: calls the wrapped function, and reports the
    wrapped model's forward signature (``inspect.signature``), as peft's models do for
    transformers' Trainer, which keeps only the dataset columns the forward accepts."""

    def __init__(self, function):
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self.function
        bound = functools.partial(self.function, instance)
        signature = instance.__dict__.get("_forward_signature")
        if signature is None:
            try:
                signature = inspect.signature(instance.get_base_model().forward)
            except (TypeError, ValueError):
                signature = inspect.signature(self.function)
            instance.__dict__["_forward_signature"] = signature
        bound.__signature__ = signature
        return bound


class _LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class PeftModel(nn.Module):
    """A model with cpeft adapter layers in place: peft's ``PeftModel`` surface, with any number
    of named adapters (``add_adapter``, ``load_adapter``, ``set_adapter``, ``delete_adapter``)."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig | IA3Config,
        adapter_name: str = DEFAULT_ADAPTER,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ):
        _check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        _check_bool(low_cpu_mem_usage, "low_cpu_mem_usage")
        plan = _plan(model, peft_config, adapter_name)
        for name, module in model.named_modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                raise ValueError(
                    f"model: already contains a cpeft adapter layer at {name!r}; "
                    f"call unload() on its PeftModel first"
                )
        super().__init__()
        self.base_model = _TunerModel(model)
        self.__dict__["_peft_config"] = {}
        self.__dict__["_active"] = adapter_name
        # adapter -> (targeted paths, modules_to_save paths)
        self.__dict__["_adapter_paths"] = {}
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._inject(adapter_name, plan, autocast_adapter_dtype)
        self.base_model.set_adapter(adapter_name, inference_mode=plan.config.inference_mode)
        for parameter in self._bias_parameters(adapter_name):
            parameter.requires_grad_(not plan.config.inference_mode)
        self.__class__ = _trainer_visible(type(self))

    # ---- peft's attributes -------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, LoraConfig | IA3Config]:
        return self.__dict__["_peft_config"]

    @property
    def active_adapter(self) -> str:
        return self.__dict__["_active"]

    @property
    def active_adapters(self) -> list[str]:
        return [self.__dict__["_active"]]

    @property
    def peft_type(self) -> str:
        return self.peft_config[self.active_adapter].peft_type

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    @_ForwardWithBaseSignature
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward. ``adapter_names`` (one name per sample, ``"__base__"``
        for none) runs a mixed-adapter batch, in training too: every LoRA layer computes all the
        adapters it holds in one grouped call, and gradients reach each adapter used."""
        if adapter_names is None:
            return self.base_model.model(*args, **kwargs)
        with self._mixed_batch(adapter_names):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's ``generate``; ``adapter_names`` as in ``forward``, one name per
        prompt. As in peft, with ``num_beams`` > 1 each name is repeated for the beams, except in
        the encoder of an encoder-decoder model, which sees the prompts once."""
        generate = self.base_model.model.generate
        if adapter_names is None:
            return generate(*args, **kwargs)
        num_beams = kwargs.get("num_beams")
        names = adapter_names
        if (
            isinstance(num_beams, int)
            and num_beams > 1
            and isinstance(adapter_names, (list, tuple))
        ):
            names = [name for name in adapter_names for _ in range(num_beams)]
        with self._mixed_batch(names, encoder_names=adapter_names):
            return generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Any, encoder_names: Any = None) -> Iterator[None]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ValueError(
                f"adapter_names: expected a list with one adapter name per sample, "
                f"got {adapter_names!r}"
            )
        unknown = sorted(
            {n for n in adapter_names if n != "__base__" and n not in self.peft_config}, key=str
        )
        if unknown:
            raise ValueError(
                f"adapter_names: unknown adapters {unknown}; expected names among "
                f"{list(self.peft_config)} or '__base__'"
            )
        model = self.base_model.model
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if model.training and checkpointing:
            # Checkpointed blocks run their forward again during backward, after this call has
            # returned and the names are gone: the recomputation would use other adapters.
            raise ValueError(
                "adapter_names: mixed-adapter batches cannot train with gradient "
                "checkpointing enabled; disable it or train one adapter per batch"
            )
        names = list(adapter_names)
        modules = [m for _, m in self.base_model.tuner_layers()] + [
            m for _, m in self.base_model.wrappers()
        ]
        for module in modules:
            module._mixed_adapter_names = names
        if encoder_names is not None and getattr(
            getattr(model, "config", None), "is_encoder_decoder", False
        ):
            for module in model.get_encoder().modules():
                if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                    module._mixed_adapter_names = list(encoder_names)
        try:
            yield
        finally:
            for module in modules:
                module._mixed_adapter_names = None

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
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ---- several adapters ----------------------------------------------------------------------

    def _inject(self, adapter_name: str, plan: _Plan, autocast_adapter_dtype: bool = True) -> None:
        """Puts ``adapter_name`` into the model. Every new module is built before the first one
        goes in, so a failure leaves the model as it was."""
        config = plan.config
        if isinstance(config, LoraConfig) and config.bias != "none":
            others = [
                n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"
            ]
            if others:
                raise ValueError(
                    f"bias: only one adapter may train biases; {others} already sets bias, "
                    f"so {adapter_name!r} needs bias='none'"
                )
        model = self.base_model.model
        name_or_path = model.__dict__.get("name_or_path")
        if name_or_path is not None:
            config.base_model_name_or_path = name_or_path
        new_layers = {
            t.path: _new_layer(t, config)
            for t in plan.targets
            if not isinstance(t.module, BaseTunerLayer)
        }
        for t in plan.targets:
            layer = new_layers.get(t.path, t.module)
            if isinstance(config, LoraConfig):
                _add_lora(layer, adapter_name, t, config)
            else:
                layer.update_layer(adapter_name, config.init_ia3_weights)
            _cast_adapter_dtype(layer, adapter_name, autocast_adapter_dtype)
            for parameter in layer._adapter_parameters(adapter_name):
                parameter.requires_grad_(False)
        wrappers = {}
        for path in plan.saved_paths:
            module = model.get_submodule(path)
            if isinstance(module, ModulesToSaveWrapper):
                module.add_adapter(adapter_name)
                wrapper = module
            else:
                wrapper = wrappers[path] = ModulesToSaveWrapper(module, adapter_name)
            wrapper.modules_to_save[adapter_name].requires_grad_(False)
        for path, layer in new_layers.items():
            layer.train(layer.base_layer.training)
            _set_parent(model, path, layer)
        for path, wrapper in wrappers.items():
            _set_parent(model, path, wrapper)
        self.peft_config[adapter_name] = config
        self.__dict__["_adapter_paths"][adapter_name] = (
            [t.path for t in plan.targets],
            list(plan.saved_paths),
        )

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig | IA3Config,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Adds a new adapter, not active and frozen until ``set_adapter(adapter_name)``."""
        _check_bool(low_cpu_mem_usage, "low_cpu_mem_usage")
        _check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
        self._inject(
            adapter_name,
            _plan(self.base_model.model, peft_config, adapter_name),
            autocast_adapter_dtype,
        )
        self.base_model.set_adapter(
            self.active_adapter, inference_mode=self.peft_config[self.active_adapter].inference_mode
        )

    def set_adapter(self, adapter_name: str) -> None:
        """Makes ``adapter_name`` the one active adapter (trainable unless in inference mode)."""
        self._check_known(adapter_name)
        self.base_model.set_adapter(
            adapter_name, inference_mode=self.peft_config[adapter_name].inference_mode
        )
        self.__dict__["_active"] = adapter_name

    def _check_known(self, adapter_name: Any) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"adapter_name: expected one of {list(self.peft_config)}, got {adapter_name!r}"
            )

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter everywhere; a layer left without adapters becomes its base module again."""
        self._check_known(adapter_name)
        if len(self.peft_config) == 1:
            raise ValueError(
                f"adapter_name: {adapter_name!r} is the only adapter; use unload() to remove it"
            )
        merged = [
            path
            for path, layer in self.base_model.tuner_layers()
            if adapter_name in layer.merged_adapters
        ]
        if merged:
            raise ValueError(
                f"adapter_name: {adapter_name!r} is merged into {merged}; call unmerge_adapter() "
                f"before deleting it"
            )
        model = self.base_model.model
        for path, layer in list(self.base_model.tuner_layers()):
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    restore_base = getattr(layer, "restore_base", None)
                    _set_parent(
                        model,
                        path,
                        restore_base() if restore_base is not None else layer.base_layer,
                    )
        for path, wrapper in list(self.base_model.wrappers()):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
                if not len(wrapper.modules_to_save):
                    _set_parent(model, path, wrapper.original_module)
                elif wrapper.active_adapter == adapter_name:
                    wrapper.active_adapter = next(iter(wrapper.modules_to_save))
        del self.peft_config[adapter_name]
        del self.__dict__["_adapter_paths"][adapter_name]
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config)))

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Folds the active adapter (or ``adapter_names``) into the base weights, keeping the
        layers. ``safe_merge=True``: every layer is checked for non-finite results first."""
        _check_bool(safe_merge, "safe_merge")
        names = (
            self.active_adapters
            if adapter_names is None
            else self._check_adapter_names(adapter_names)
        )
        layers = list(self.base_model.tuner_layers())
        if safe_merge:
            for path, layer in layers:
                layer.check_merge_is_finite(self._layer_adapters(layer, names), path)
        for _, layer in layers:
            layer.merge(adapter_names=[n for n in names if n in layer.adapter_names])

    def unmerge_adapter(self) -> None:
        """Restores the base weights bit for bit."""
        for _, layer in self.base_model.tuner_layers():
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the base modules (the pretrained weights, unmerged) instead of the adapters."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # ---- state dicts and files -----------------------------------------------------------------

    def _adapter_key_map(self, adapter_name: str) -> dict[str, str]:
        """peft file key -> this model's state-dict key, for one adapter."""
        keys: dict[str, str] = {}
        model = self.base_model.model
        for path, layer in self.base_model.tuner_layers():
            if adapter_name in layer.adapter_names:
                for suffix, local in layer.adapter_tensors(adapter_name).items():
                    keys[f"{_KEY_PREFIX}{path}.{suffix}"] = f"{_KEY_PREFIX}{path}.{local}"
        for path, wrapper in self.base_model.wrappers():
            if adapter_name in wrapper.modules_to_save:
                for name in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True):
                    keys[f"{_KEY_PREFIX}{path}.{name}"] = (
                        f"{_KEY_PREFIX}{path}.modules_to_save.{adapter_name}.{name}"
                    )
        parameter_names = {id(p): n for n, p in model.named_parameters(prefix="base_model.model")}
        for key, parameter in self._bias_slots(adapter_name).items():
            keys[key] = parameter_names[id(parameter)]
        return keys

    def _bias_slots(self, adapter_name: str) -> dict[str, nn.Parameter]:
        config = self.peft_config[adapter_name]
        targets, saved = self.__dict__["_adapter_paths"][adapter_name]
        return _trainable_bias_slots(
            self.base_model.model, getattr(config, "bias", "none"), set(targets), saved
        )

    def _bias_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return list(self._bias_slots(adapter_name).values())

    def get_adapter_state_dict(
        self, adapter_name: str = DEFAULT_ADAPTER, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors peft would save for ``adapter_name``, under peft's key names, detached on
        the CPU; taken from ``state_dict`` (this model's own keys) when given."""
        self._check_known(adapter_name)
        source = self.state_dict(keep_vars=True) if state_dict is None else state_dict
        out = {}
        for key, local in self._adapter_key_map(adapter_name).items():
            if local not in source:
                raise ValueError(
                    f"state_dict: missing {local!r}, needed for the adapter key {key!r}"
                )
            tensor = source[local].detach()
            if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2): every rank gathers it
                tensor = tensor.full_tensor()
            out[key] = tensor.to("cpu").contiguous().clone()
        return out

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes each adapter in peft's layout: ``default`` in ``save_directory``, any other in
        ``save_directory/<name>``, plus a model card ``README.md``. The weights go to
        ``adapter_model.safetensors``, or with ``safe_serialization=False`` to peft's pickled
        ``adapter_model.bin``."""
        _check_bool(safe_serialization, "safe_serialization")
        _check_bool(is_main_process, "is_main_process")
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError(
                "path_initial_model_for_weight_conversion: PiSSA/CorDA/OLoRA conversion is "
                "not supported by cpeft; expected None"
            )
        if save_embedding_layers not in ("auto", False):
            raise ValueError(
                f"save_embedding_layers: cpeft saves only adapter tensors; expected 'auto' or "
                f"False, got {save_embedding_layers!r}"
            )
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(
                f"save_directory: expected a directory, got the file {save_directory!r}"
            )
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_known(name)
        state_dict = kwargs.pop("state_dict", None)
        _refuse_unsupported(kwargs, "save_pretrained")
        tensors = {name: self.get_adapter_state_dict(name, state_dict) for name in names}
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self._write_model_card(save_directory)
        for name in names:
            output_dir = (
                save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
            )
            os.makedirs(output_dir, exist_ok=True)
            _write_weights(output_dir, tensors[name], safe_serialization)
            config = self.peft_config[name]
            auto_mapping = None
            if config.task_type is None:
                model_class = type(self.base_model.model)
                auto_mapping = {
                    "base_model_class": model_class.__name__,
                    "parent_library": model_class.__module__,
                }
            config.save_pretrained(output_dir, auto_mapping=auto_mapping)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "push_to_hub: cpeft does not upload to the Hugging Face Hub; call "
            "save_pretrained(directory) and upload that directory (peft's file layout) with "
            "huggingface_hub's upload_folder"
        )

    def _write_model_card(self, directory: str) -> None:
        """A short model card as peft writes one (library_name: peft lets the Hub treat the
        folder as an adapter); an existing README.md is left alone."""
        path = os.path.join(directory, MODEL_CARD_NAME)
        if os.path.exists(path):
            return
        from . import __version__

        config = self.peft_config[self.active_adapter]
        base = config.base_model_name_or_path
        lines = ["---"]
        if base:
            lines.append(f"base_model: {base}")
        lines += ["library_name: peft", "tags:"]
        if base:
            lines.append(f"- base_model:adapter:{base}")
        lines += [
            f"- {config.peft_type.lower()}",
            "- cpeft",
            "---",
            "",
            f"# {config.peft_type} adapter" + (f" for {base}" if base else ""),
            "",
            f"Adapters {sorted(self.peft_config)} in peft's adapter format, written by cpeft "
            f"{__version__}; they load with `peft.PeftModel.from_pretrained` or "
            f"`cpeft.PeftModel.from_pretrained`.",
            "",
            "### Framework versions",
            "",
            f"- cpeft {__version__}",
            "",
        ]
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines))

    def _load_checked(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str
    ) -> None:
        state = self.state_dict(keep_vars=True)
        key_map = self._adapter_key_map(adapter_name)
        expected = {key: tuple(state[local].shape) for key, local in key_map.items()}
        integer_slots = {
            key: state[local].dtype
            for key, local in key_map.items()
            if not state[local].is_floating_point()
        }
        _check_tensors(expected, tensors, source, integer_slots)
        with torch.no_grad():
            for key, local in self._adapter_key_map(adapter_name).items():
                state[local].copy_(tensors[key])

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> _LoadResult:
        """Loads an adapter directory as ``adapter_name``: a new adapter (not activated), or new
        values for an existing one. Everything is checked before the model changes.
        ``torch_device`` / ``device_map`` choose where the file is read to (the adapter
        parameters live on their base layer's device); see ``from_pretrained``. Other
        arguments cpeft does not implement are refused (``_local_adapter_dir``)."""
        _check_bool(is_trainable, "is_trainable")
        _check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        _check_bool(low_cpu_mem_usage, "low_cpu_mem_usage")
        model_id = _local_adapter_dir(model_id, kwargs, "load_adapter")
        load_device = _load_device(torch_device, kwargs.get("device_map"))
        config, tensors, weights_path = _read_adapter_dir(model_id, load_device)
        if adapter_name in self.peft_config:
            self._load_checked(adapter_name, tensors, weights_path)
        else:
            config.inference_mode = not is_trainable
            plan = _plan_from_file(self.base_model.model, config, adapter_name, model_id)
            _check_tensors(
                _expected_adapter_shapes(self.base_model.model, plan),
                tensors,
                weights_path,
                _integer_slots(self.base_model.model, plan),
            )
            self._inject(adapter_name, plan, autocast_adapter_dtype)
            self._load_checked(adapter_name, tensors, weights_path)
            self.base_model.set_adapter(
                self.active_adapter,
                inference_mode=self.peft_config[self.active_adapter].inference_mode,
            )
        if not is_trainable:
            self.eval()
        return _LoadResult([], [])

    def _restore(
        self,
        merge: bool,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        model = self.base_model.model
        layers = list(self.base_model.tuner_layers())
        if merge:
            self._warn_about_tied_targets()
            if safe_merge:
                # Every layer is checked before the first one is written, so a failure leaves
                # the whole model as it was (peft checks layer by layer, after merging earlier ones).
                for path, layer in layers:
                    layer.check_merge_is_finite(self._layer_adapters(layer, adapter_names), path)
        description = "Unloading and merging model" if merge else "Unloading model"
        for path, layer in _progress(layers, progressbar, description):
            if merge:
                layer.merge(adapter_names=self._layer_adapters(layer, adapter_names))
            else:
                layer.unmerge()
            restore_base = getattr(layer, "restore_base", None)
            _set_parent(
                model, path, restore_base() if restore_base is not None else layer.base_layer
            )
        for path, wrapper in list(self.base_model.wrappers()):
            keep = wrapper.original_module
            if merge and wrapper.active_adapter in wrapper.modules_to_save:
                keep = wrapper.modules_to_save[wrapper.active_adapter]
            _set_parent(model, path, keep)
        return model

    @staticmethod
    def _layer_adapters(layer: BaseTunerLayer, adapter_names: list[str] | None) -> list[str] | None:
        return (
            None
            if adapter_names is None
            else [n for n in adapter_names if n in layer.adapter_names]
        )

    def _check_adapter_names(self, adapter_names: Any) -> list[str] | None:
        if adapter_names is None:
            return None
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ValueError(
                f"adapter_names: expected None or a list of adapter names, got {adapter_names!r}"
            )
        unknown = [name for name in adapter_names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"adapter_names: {unknown} are not adapters of this model "
                f"(it has {list(self.peft_config)})"
            )
        return list(dict.fromkeys(adapter_names))

    def _warn_about_tied_targets(self) -> None:
        # A merge writes into the shared Parameter, so every module tied to it changes too
        # (GPT-2's lm_head when wte is targeted), exactly as in peft.
        uses: dict[int, int] = {}
        for _, parameter in self.base_model.model.named_parameters(remove_duplicate=False):
            uses[id(parameter)] = uses.get(id(parameter), 0) + 1
        tied = [
            path
            for path, layer in self.base_model.tuner_layers()
            if uses.get(id(getattr(layer.get_base_layer(), "weight", None)), 0) > 1
        ]
        if tied:
            warnings.warn(
                f"merge_and_unload: the weights of {tied} are tied to other modules of the "
                f"model; merging changes those modules as well",
                stacklevel=3,
            )

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Folds the active adapters (or ``adapter_names``; ``[]`` merges none) into the
        pretrained weights; returns the plain model (use the return value).

        ``safe_merge=True`` merges every layer on a copy first and raises ``ValueError`` before
        any weight changes if a merged tensor is not finite. ``progressbar`` shows a tqdm bar
        when tqdm is installed.
        """
        _check_bool(progressbar, "progressbar")
        _check_bool(safe_merge, "safe_merge")
        return self._restore(
            merge=True,
            progressbar=progressbar,
            safe_merge=safe_merge,
            adapter_names=self._check_adapter_names(adapter_names),
        )

    def unload(self) -> nn.Module:
        """Removes the adapters; returns the plain model with its original modules and weights."""
        return self._restore(merge=False)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Loads an adapter directory written by cpeft or peft onto ``model``.

        The weights come from ``adapter_model.safetensors``, or from peft's pickled
        ``adapter_model.bin`` (read with ``weights_only=True``) when there is no safetensors file.
        ``config`` replaces the directory's ``adapter_config.json``. ``torch_device`` and
        ``device_map`` (one device, ``{"": device}`` or ``"auto"``) choose where the file is read
        to; the adapter parameters always live on their base layer's device.
        ``low_cpu_mem_usage`` is accepted for peft compatibility: cpeft builds each adapter once,
        on that device.

        Every check (files, JSON, config fields, tensor keys and shapes) runs before the model is
        modified, so a failed load leaves ``model`` exactly as it was.
        """
        _check_bool(is_trainable, "is_trainable")
        _check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        _check_bool(low_cpu_mem_usage, "low_cpu_mem_usage")
        if ephemeral_gpu_offload is not False:
            raise ValueError(
                f"ephemeral_gpu_offload: not supported by cpeft; expected False, "
                f"got {ephemeral_gpu_offload!r}"
            )
        if config is not None and not isinstance(config, (LoraConfig, IA3Config)):
            raise TypeError(
                f"config: expected None, cpeft.LoraConfig or cpeft.IA3Config, "
                f"got {type(config).__name__}"
            )
        model_id = _local_adapter_dir(model_id, kwargs, "from_pretrained", extra=("torch_device",))
        load_device = _load_device(kwargs.get("torch_device"), kwargs.get("device_map"))
        file_config, tensors, weights_path = _read_adapter_dir(
            model_id, load_device, need_config=config is None
        )
        config = copy.deepcopy(config) if config is not None else file_config
        config.inference_mode = not is_trainable
        plan = _plan_from_file(model, config, adapter_name, model_id)
        _check_tensors(
            _expected_adapter_shapes(model, plan),
            tensors,
            weights_path,
            _integer_slots(model, plan),
        )
        model_class = cls
        if cls is PeftModel:
            model_class = _TASK_MODEL_CLASSES.get(config.task_type, PeftModel)
        peft_model = model_class(
            model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
        )
        peft_model._load_checked(adapter_name, tensors, weights_path)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    # ---- pickling of the Trainer-visible class -------------------------------------------------

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        plain = getattr(type(self), "_cpeft_class", None)
        if plain is None:
            return reduced
        # Pickled as the plain cpeft class (an importable name); __setstate__ pairs it again.
        _, _, *rest = reduced
        return (_new_instance, (plain,), *rest)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__class__ = _trainer_visible(type(self))


CpeftModel = PeftModel


def _new_instance(cls: type) -> PeftModel:
    return cls.__new__(cls)


def _refuse_unsupported(kwargs: dict, where: str) -> None:
    if kwargs:
        raise TypeError(
            f"{where}: unsupported arguments {sorted(kwargs)} (cpeft does not implement them)"
        )


def _plan_from_file(
    model: nn.Module, config: PeftConfig, adapter_name: str, model_id: str | os.PathLike
) -> _Plan:
    """The injection plan of a config read from ``model_id``; its errors name the config file."""
    try:
        return _plan(model, config, adapter_name)
    except ValueError as exc:
        raise ValueError(
            f"{os.path.join(os.fspath(model_id), ADAPTER_CONFIG_NAME)}: {exc}"
        ) from None


def _check_tensors(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, torch.Tensor],
    source: str,
    integer_slots: dict[str, torch.dtype] | None = None,
) -> None:
    """Every expected key present with its shape, nothing else; floating-point tensors except
    for ``integer_slots`` (key -> dtype, e.g. a BatchNorm's ``num_batches_tracked``), which must
    come in exactly that dtype: nothing is cast."""
    integer_slots = integer_slots or {}
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise ValueError(
            f"{source}: missing the key {missing[0]!r} of shape {expected[missing[0]]} "
            f"that the model needs ({len(missing)} missing in all)"
        )
    unexpected = [key for key in tensors if key not in expected]
    if unexpected:
        raise ValueError(
            f"{source}: the key {unexpected[0]!r} matches no adapter slot of the model "
            f"({len(unexpected)} unexpected in all)"
        )
    for key, shape in expected.items():
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{source}: key {key!r}: expected a tensor, got {type(tensor).__name__}"
            )
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{source}: key {key!r}: expected shape {shape}, got {tuple(tensor.shape)}"
            )
        slot_dtype = integer_slots.get(key)
        if slot_dtype is None and not tensor.is_floating_point():
            raise ValueError(
                f"{source}: key {key!r}: expected a floating-point tensor, got {tensor.dtype}"
            )
        if slot_dtype is not None and tensor.dtype != slot_dtype:
            raise ValueError(
                f"{source}: key {key!r}: expected {slot_dtype} as in the model, got {tensor.dtype}"
            )


class PeftModelForCausalLM(PeftModel):
    """peft's task class for ``CAUSAL_LM``; ``generate`` runs the wrapped model's."""


class PeftModelForSeq2SeqLM(PeftModel):
    """peft's task class for ``SEQ_2_SEQ_LM``."""


class PeftModelForSequenceClassification(PeftModel):
    """peft's task class for ``SEQ_CLS`` (the classifier head is trained as modules_to_save)."""


class PeftModelForTokenClassification(PeftModel):
    """peft's task class for ``TOKEN_CLS``."""


class PeftModelForQuestionAnswering(PeftModel):
    """peft's task class for ``QUESTION_ANS``."""


class PeftModelForFeatureExtraction(PeftModel):
    """peft's task class for ``FEATURE_EXTRACTION``."""


_TASK_MODEL_CLASSES = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


# transformers' Trainer recognises adapter models only by ``isinstance(model, peft.PeftModel)``
# (transformers.trainer_utils._is_peft_model; Trainer._save): only then does it read the wrapped
# model's forward signature, save checkpoints through save_pretrained (adapter only) and resume
# with load_adapter. When transformers is in use and peft is installed, each cpeft model class is
# therefore paired with a subclass that also derives from peft.PeftModel. peft's own attributes
# never show through: every name peft.PeftModel defines that cpeft does not is either nn.Module's
# or hidden (then found on the wrapped model, as for any other attribute). peft's __init__ is
# never called.
_TRAINER_VISIBLE: dict[type, type] = {}
_NOT_COPIED = frozenset(
    (
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__init__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
    )
)


class _Hidden:
    """A class attribute that is not there: reading it raises AttributeError, which sends the
    lookup on to ``PeftModel.__getattr__``."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, instance, owner=None):
        raise AttributeError(self.name)


def _trainer_visible(cls: type) -> type:
    if getattr(cls, "_cpeft_class", None) is not None:
        return cls
    if cls in _TRAINER_VISIBLE:
        return _TRAINER_VISIBLE[cls]
    if "transformers" not in sys.modules or importlib.util.find_spec("peft") is None:
        return cls
    try:
        from peft import PeftModel as HFPeftModel
    except Exception:  # a broken peft install must not break cpeft  # noqa: BLE001
        return cls
    ours = set()
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        ours.update(vars(klass))
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_cpeft_class": cls,
    }
    for klass in HFPeftModel.__mro__:
        if klass is nn.Module or klass is object:
            break
        for name in vars(klass):
            if name in ours or name in namespace or name in _NOT_COPIED:
                continue
            module_attribute = inspect.getattr_static(nn.Module, name, None)
            namespace[name] = module_attribute if module_attribute is not None else _Hidden(name)
    combined = type(cls.__name__, (cls, HFPeftModel), namespace)
    _TRAINER_VISIBLE[cls] = combined
    return combined


# Hub download options of peft's loaders: meaningless for a local directory, so accepted and
# ignored; key_mapping only as None.
_HUB_KWARGS = (
    "revision",
    "cache_dir",
    "token",
    "use_auth_token",
    "local_files_only",
    "force_download",
    "proxies",
)


def _local_adapter_dir(
    model_id: Any, kwargs: dict[str, Any], caller: str, extra: tuple[str, ...] = ()
) -> str:
    """The adapter directory (``subfolder`` joined); refuses loader options cpeft does not
    implement instead of ignoring them."""
    if kwargs.get("key_mapping") is not None:
        raise ValueError(f"{caller}: key_mapping is not supported by cpeft; expected None")
    if kwargs.get("ephemeral_gpu_offload", False) is not False:
        raise ValueError(
            f"{caller}: ephemeral_gpu_offload is not supported by cpeft; expected False"
        )
    known = (
        set(_HUB_KWARGS)
        | {"device_map", "subfolder", "key_mapping", "ephemeral_gpu_offload"}
        | set(extra)
    )
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{caller}: unsupported arguments {unknown}")
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"model_id: expected a directory path, got {type(model_id).__name__}")
    subfolder = kwargs.get("subfolder")
    if subfolder is None:
        return os.fspath(model_id)
    if not isinstance(subfolder, str):
        raise ValueError(f"subfolder: expected None or a string, got {subfolder!r}")
    return os.path.join(os.fspath(model_id), subfolder)


def _load_device(torch_device: Any, device_map: Any) -> torch.device:
    """The device adapter files are read to, from peft's ``torch_device`` and ``device_map``."""

    def as_device(value: Any, name: str) -> torch.device:
        if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
            raise ValueError(
                f"{name}: expected a device (a string such as 'cpu' or 'cuda:0', an index "
                f"or a torch.device), got {value!r}"
            )
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{name}: expected a device, got {value!r} ({exc})") from None
        if device.type == "cpu":
            return device
        if device.type != "cuda":
            raise ValueError(f"{name}: expected a CPU or CUDA device, got {value!r}")
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"{name}: {value!r} names a CUDA device this process does not have "
                f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} visible)"
            )
        return device

    device = (
        torch.device("cpu") if torch_device is None else as_device(torch_device, "torch_device")
    )
    if device_map is None or device_map == "auto":
        return device
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(
                f"device_map: cpeft places an adapter on one device; expected 'auto', a device "
                f"or {{'': device}}, got a map of {len(device_map)} entries {list(device_map)[:4]}"
            )
        device_map = device_map[""]
    mapped = as_device(device_map, "device_map")
    if torch_device is not None and mapped != device:
        raise ValueError(
            f"device_map: names {mapped} but torch_device names {device}; pass one of them"
        )
    return mapped


def _read_adapter_dir(
    model_id: str | os.PathLike, device: torch.device | None = None, need_config: bool = True
) -> tuple[LoraConfig | IA3Config | None, dict[str, torch.Tensor], str]:
    """(config, or None when not needed; tensors read to ``device``; the weights file's path)."""
    directory = os.fspath(model_id)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model_id: adapter directory {directory!r} does not exist")
    device = torch.device("cpu") if device is None else device
    config = None
    if need_config:
        config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path}: adapter config not found")
        config = _config_from_file(config_path)
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
        raise FileNotFoundError(
            f"{weights_path}: adapter weights not found (nor {ADAPTER_BIN_WEIGHTS_NAME})"
        )
    try:
        tensors = torch.load(bin_path, map_location=device, weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file (pickle, zip, EOF, ...)
        raise ValueError(
            f"{bin_path}: not a readable torch state dict ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(
            f"{bin_path}: expected a dict of tensors keyed by name, got {type(tensors).__name__}"
        )
    return config, tensors, bin_path


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig | IA3Config,
    adapter_name: str = DEFAULT_ADAPTER,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Injects cpeft adapter layers into ``model`` (in place) and returns the wrapper, of peft's
    task class for ``peft_config.task_type`` (``PeftModelForCausalLM``...) when one is set.

    The targeted modules keep their pretrained weights; everything except the adapters, the
    biases selected by ``bias`` and the ``modules_to_save`` copies is frozen. With
    ``autocast_adapter_dtype=True`` (peft's default) the adapters of float16/bfloat16 layers are
    float32; with False they take the layer's dtype.
    """
    if mixed is not False:
        raise TypeError(
            f"get_peft_model: mixed={mixed!r} (PeftMixedModel) is not supported; expected False"
        )
    if revision is not None:
        raise TypeError(f"get_peft_model: revision={revision!r} is not supported; expected None")
    model_class = _TASK_MODEL_CLASSES.get(getattr(peft_config, "task_type", None), PeftModel)
    return model_class(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def inject_adapter_in_model(
    peft_config: LoraConfig | IA3Config,
    model: nn.Module,
    adapter_name: str = DEFAULT_ADAPTER,
    low_cpu_mem_usage: bool = False,
    *,
    autocast_adapter_dtype: bool = False,
) -> nn.Module:
    """peft's low-level API: puts adapter layers into ``model`` in place and returns ``model``
    itself (no wrapper), the new adapter active and trainable, everything else frozen. As in
    peft 0.21 the adapters keep the layers' dtype; cpeft's extra ``autocast_adapter_dtype=True``
    gives float32 adapters on 16-bit layers instead."""
    return PeftModel(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    ).get_base_model()


def get_peft_model_state_dict(
    model: PeftModel,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """peft's function: the tensors of ``adapter_name`` under the keys peft writes to files."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"model: expected a cpeft PeftModel, got {type(model).__name__}")
    return model.get_adapter_state_dict(adapter_name, state_dict)


def set_peft_model_state_dict(
    model: PeftModel,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = DEFAULT_ADAPTER,
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _LoadResult:
    """peft's function: loads tensors keyed as in peft's files into ``adapter_name``. Every key
    and shape is checked before anything is written."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"model: expected a cpeft PeftModel, got {type(model).__name__}")
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes: not supported by cpeft; expected False")
    model._check_known(adapter_name)
    model._load_checked(adapter_name, dict(peft_model_state_dict), "peft_model_state_dict")
    return _LoadResult([], [])


def get_base_model_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """peft's function: the base model's state dict under its original keys, without adapter
    tensors (``base_layer`` and ``original_module`` infixes removed; a ``modules_to_save``
    module contributes its original values)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"model: expected a cpeft PeftModel, got {type(model).__name__}")
    result: dict[str, torch.Tensor] = {}
    for key, value in model.get_base_model().state_dict().items():
        original = _original_key(model.get_base_model(), key)
        if original is not None:
            result[original] = value
    return result


def _original_key(model: nn.Module, key: str) -> str | None:
    """The key ``key`` has in the model without adapters, or None for adapter tensors."""
    parts: list[str] = []
    current: nn.Module | None = model
    for part in key.split("."):
        child = current._modules.get(part) if current is not None else None
        if isinstance(current, BaseTunerLayer):
            if part != "base_layer":
                return None
        elif isinstance(current, ModulesToSaveWrapper):
            if part != "original_module":
                return None
        else:
            parts.append(part)
        current = child
    return ".".join(parts)


class AutoPeftModel:
    """peft's ``AutoPeftModel``: reads ``base_model_name_or_path`` from the adapter config, loads
    that base model with transformers' Auto class, then the adapter with ``PeftModel.from_pretrained``."""

    _auto_class_name = "AutoModel"
    _peft_class: type = PeftModel

    def __init__(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} is used through {type(self).__name__}.from_pretrained(...)"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        import transformers

        peft_config = (
            config
            if config is not None
            else PeftConfig.from_pretrained(pretrained_model_name_or_path)
        )
        base_name = peft_config.base_model_name_or_path
        if not base_name:
            raise ValueError(
                f"{os.path.join(os.fspath(pretrained_model_name_or_path), ADAPTER_CONFIG_NAME)}: "
                f"base_model_name_or_path is empty; load the base model yourself and use "
                f"PeftModel.from_pretrained(base_model, path)"
            )
        task_type = peft_config.task_type
        if cls is AutoPeftModel and task_type is not None:
            raise ValueError(
                f"AutoPeftModel: the adapter has task_type {task_type!r}; use the class for that "
                f"task (e.g. AutoPeftModelForCausalLM for 'CAUSAL_LM')"
            )
        expected_class = _TASK_MODEL_CLASSES.get(task_type)
        if expected_class is not None and cls._peft_class is not expected_class:
            raise ValueError(
                f"{cls.__name__}: the adapter has task_type {task_type!r}, which needs "
                f"{expected_class.__name__}, not {cls._peft_class.__name__}"
            )
        auto_class = getattr(transformers, cls._auto_class_name)
        if task_type is None and cls is AutoPeftModel:
            auto_class = _auto_mapping_class(pretrained_model_name_or_path) or auto_class
        base_revision = revision if revision is not None else peft_config.revision
        if base_revision is not None:
            kwargs["revision"] = base_revision
        base_model = auto_class.from_pretrained(base_name, **kwargs)
        peft_class = cls._peft_class
        if peft_class is PeftModel:
            peft_class = _TASK_MODEL_CLASSES.get(peft_config.task_type, PeftModel)
        return peft_class.from_pretrained(
            base_model,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
        )


def _auto_mapping_class(directory: str | os.PathLike) -> type | None:
    """The base model class named by ``auto_mapping`` (written by peft and cpeft when there is no
    task_type); only classes of transformers are imported."""
    config_path = os.path.join(os.fspath(directory), ADAPTER_CONFIG_NAME)
    data = _read_json(config_path) if os.path.isfile(config_path) else None
    mapping = data.get("auto_mapping") if isinstance(data, dict) else None
    if not isinstance(mapping, dict):
        return None
    library, class_name = mapping.get("parent_library"), mapping.get("base_model_class")
    if (
        not isinstance(library, str)
        or not isinstance(class_name, str)
        or not (library == "transformers" or library.startswith("transformers."))
    ):
        raise ValueError(
            f"{config_path}: auto_mapping: cpeft imports base model classes from transformers only, "
            f"got {mapping!r}"
        )
    import importlib

    return getattr(importlib.import_module(library), class_name)


class AutoPeftModelForCausalLM(AutoPeftModel):
    _auto_class_name = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    _auto_class_name = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    _auto_class_name = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(AutoPeftModel):
    _auto_class_name = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    _auto_class_name = "AutoModelForQuestionAnswering"
    _peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    _auto_class_name = "AutoModel"
    _peft_class = PeftModelForFeatureExtraction
