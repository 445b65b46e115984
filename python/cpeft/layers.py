"""loralib-compatible LoRA layers and IA3 layers, running on the cpeft C/CUDA core.

Names, constructor signatures, defaults, parameter names and shapes, initialization (including
loralib's order of random draws, so equal seeds give equal parameters), scaling, freezing and the
``train(mode)`` merge state machine follow loralib 0.1.2. The deliberate differences are listed
in docs/loralib-differences.md; each is also named in the docstring of the class it concerns.

Forward passes of unmerged adapters are one autograd node each (cpeft._autograd), calling the C
core; merged layers, and layers without an adapter, run the plain torch op on the merged weight.
Merge and unmerge go through cpeft.functional's exact merge: unmerge restores W bit for bit.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _autograd, functional

__all__ = [
    "LoRALayer",
    "Linear",
    "Embedding",
    "MergedLinear",
    "ConvLoRA",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "IA3Layer",
    "IA3Linear",
    "IA3Embedding",
]


def _identity(x):
    """Module-level so that layers pickle (loralib's ``lambda x: x`` does not)."""
    return x


def _transpose_if(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.transpose(0, 1) if fan_in_fan_out else weight


def _active_dropout_p(dropout) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _lora_linear_parameters(layer: nn.Module):
    """(weight, bias, lora_A, lora_B) as ``layer.<name>`` returns them, read from
    ``_parameters`` directly: attribute access reaches a parameter only through
    ``Module.__getattr__`` after a failed lookup has built an AttributeError (about 2 µs per
    name, on the per-call path). Read afresh each call, so a replaced parameter is seen; a name
    that is not there (a torch.nn.utils.parametrize property) is looked up as an attribute."""
    params = layer._parameters
    try:
        return params["weight"], params["bias"], params["lora_A"], params["lora_B"]
    except KeyError:
        return layer.weight, layer.bias, layer.lora_A, layer.lora_B


def _core_merges(tensor: torch.Tensor) -> bool:
    """Whether the C core can merge into this tensor in place: a dtype it has kernels for on
    the tensor's device, and a layout whose matrix view is BLAS-able (2-D weights in either
    order; conv kernels are viewed as matrices, which needs them contiguous)."""
    if _autograd.core_dtype(tensor.dtype, tensor.device.type) != tensor.dtype:
        return False
    if tensor.dim() == 2:
        return tensor.is_contiguous() or tensor.transpose(0, 1).is_contiguous()
    return tensor.is_contiguous()


def _embedding_options_in_use(layer: nn.Embedding) -> List[str]:
    """The options of ``layer`` that adapted embeddings (these layers and peft-style targets)
    refuse, in the order messages name them: loralib applies max_norm to lora_A in place (and
    to the merged W, which breaks the next unmerge; torch renormalizes whenever it is not
    None), its sparse backward fails, and scale_grad_by_freq has no C kernel."""
    in_use = {
        "max_norm": layer.max_norm is not None,
        "sparse": bool(layer.sparse),
        "scale_grad_by_freq": bool(layer.scale_grad_by_freq),
    }
    return [option for option, on in in_use.items() if on]


def _reject_embedding_options(layer: nn.Embedding, adapter: str) -> None:
    in_use = _embedding_options_in_use(layer)
    if in_use:
        option = in_use[0]
        raise ValueError(
            f"{type(layer).__name__}: {option}={getattr(layer, option)!r} is not supported with "
            f"{adapter}; expected {option}={'None' if option == 'max_norm' else 'False'}"
        )


def _state_dict_unmerged_hook(module, state_dict, prefix, local_metadata):
    module._write_unmerged_weights(state_dict, prefix)


def _load_state_dict_remerge_hook(module, incompatible_keys):
    module._remerge_after_load()


class _MergeOnEval:
    """loralib's ``train(mode)`` state machine (eval merges, train unmerges), made exact and
    checkpoint-safe.

    * Merge records (indices and original values of the elements whose round trip would not
      restore W bit for bit) live in non-persistent buffers, out of state dicts. Dtypes the
      core cannot merge in place (float16/bfloat16 on the CPU) or non-contiguous conv weights
      keep a full copy of the original instead.
    * ``.to()`` & co. on a merged layer unmerge, convert and merge again (``_apply``), so a
      dtype change never strands a merge record the core cannot unmerge.
    * ``state_dict()`` of a merged layer holds the unmerged weights, so a checkpoint means the
      same thing whatever mode it was saved in (loralib saves merged W; Q1).
    * ``load_state_dict()`` into a merged layer unmerges first, loads, then merges the loaded
      adapter into the loaded base weights: W is never corrupted and outputs are never stale
      (loralib #190).
    * ``train()`` / ``eval()`` return the module (loralib returns None; Q16).

    A layer provides ``_adapter_active()``, ``_merge_targets()`` (state-dict names, relative to
    the layer, of the tensors a merge writes, as detached aliases of the live parameters),
    ``_merge_tensors(targets)`` (merge in place, return ``{name: (index, value)}`` records) and
    ``_unmerge_tensors(targets, records)``.
    """

    def _init_merge_state(self) -> None:
        self._merged_targets: List[str] = []
        self._merged_scale = 1.0
        self._remerge_pending = False
        self.register_state_dict_post_hook(_state_dict_unmerged_hook)
        self.register_load_state_dict_post_hook(_load_state_dict_remerge_hook)

    @staticmethod
    def _record_buffer_names(name: str):
        key = name.replace(".", "_")
        return f"_merge_index_{key}", f"_merge_value_{key}"

    def _merge_adapter(self) -> None:
        targets = self._merge_targets()
        if all(_core_merges(t) for t in targets.values()):
            records = self._merge_tensors(targets)
        else:
            originals = {name: t.clone() for name, t in targets.items()}
            work = {
                name: t.to(_autograd.core_dtype(t.dtype, t.device.type)).contiguous()
                for name, t in targets.items()
            }
            self._merge_tensors(work)
            for name, t in targets.items():
                t.copy_(work[name])
            records = {name: (None, originals[name]) for name in targets}
        for name, (index, value) in records.items():
            index_name, value_name = self._record_buffer_names(name)
            self.register_buffer(index_name, index, persistent=False)
            self.register_buffer(value_name, value, persistent=False)
        self._merged_targets = list(records)

    def _stored_records(self) -> Dict[str, tuple]:
        records = {}
        for name in self._merged_targets:
            index_name, value_name = self._record_buffer_names(name)
            records[name] = (getattr(self, index_name), getattr(self, value_name))
        return records

    def _restore(self, targets: Dict[str, torch.Tensor]) -> None:
        records = self._stored_records()
        full_copies = {name: rec for name, rec in records.items() if rec[0] is None}
        if full_copies:
            for name, (_, original) in full_copies.items():
                targets[name].copy_(original)
        elif all(_core_merges(t) for t in targets.values()):
            self._unmerge_tensors(targets, records)
        else:
            # Weights whose dtype was changed behind the layer's back (``weight.data = ...``):
            # unmerge in a dtype the core has kernels for, then round back.
            work = {
                name: t.to(_autograd.core_dtype(t.dtype, t.device.type)).contiguous()
                for name, t in targets.items()
            }
            work_records = {
                name: (index, value.to(work[name].dtype))
                for name, (index, value) in records.items()
            }
            self._unmerge_tensors(work, work_records)
            for name, t in targets.items():
                t.copy_(work[name])

    def _unmerge_adapter(self) -> None:
        self._restore(self._merge_targets())
        for name in self._merged_targets:
            for buffer_name in self._record_buffer_names(name):
                self.register_buffer(buffer_name, None, persistent=False)
        self._merged_targets = []

    def _holds_merged_weights(self) -> bool:
        return self.merged and bool(self._merged_targets)

    def train(self, mode: bool = True):
        # The weights change first and the flags only once that succeeded, so an exception
        # leaves the layer in the state it was in.
        if mode:
            if self.merge_weights and self.merged:
                if self._holds_merged_weights():
                    self._unmerge_adapter()
                self.merged = False
        else:
            if self.merge_weights and not self.merged:
                if self._adapter_active():
                    self._merge_adapter()
                self.merged = True
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()`` & co. on a merged layer: unmerge exactly in the old
        dtype and device, convert the unmerged weights, merge again in the new ones. Converting
        the merged weight and its merge record instead would restore a rounded W at the next
        ``train()`` (and a float16 record on the CPU could not be unmerged at all)."""
        if not self._holds_merged_weights():
            return super()._apply(fn, recurse)
        self._unmerge_adapter()
        # Unmerged with the flag down is a consistent state (the adapter path runs), so a
        # failing conversion leaves a working layer; eval() merges it again.
        self.merged = False
        super()._apply(fn, recurse)
        if not any(t.is_meta for t in self._merge_targets().values()):
            self._merge_adapter()
            self.merged = True
        return self

    def _write_unmerged_weights(self, state_dict, prefix: str) -> None:
        if not self._holds_merged_weights():
            return
        copies = {name: t.clone() for name, t in self._merge_targets().items()}
        self._restore(copies)
        for name, tensor in copies.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._holds_merged_weights():
            self._unmerge_adapter()
            self._remerge_pending = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _remerge_after_load(self) -> None:
        if self._remerge_pending:
            self._remerge_pending = False
            if self._adapter_active():
                self._merge_adapter()


class LoRALayer:
    """Adapter settings shared by the LoRA layers; a plain class as in loralib, so that
    ``isinstance(m, LoRALayer)`` checks keep working."""

    def __init__(self, r: int, lora_alpha: int, lora_dropout: float, merge_weights: bool):
        self.r = r
        self.lora_alpha = lora_alpha
        if lora_dropout > 0.0:
            self.lora_dropout = nn.Dropout(p=lora_dropout)
        else:
            self.lora_dropout = _identity
        self.merged = False
        self.merge_weights = merge_weights

    def _adapters(self, dtype):
        """lora_A and lora_B outside autograd, in the merge target's dtype (a no-op cast when
        they already match)."""
        return self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)

    def _lora_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={_configured_dropout_p(self.lora_dropout)}, "
            f"merge_weights={self.merge_weights}, merged={self.merged}"
        )


def _configured_dropout_p(dropout) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


# DoRA (use_dora=True on Linear and Embedding). The merged weight is (m / n) ⊙ (W + s·ΔW): the
# exact LoRA merge (record "weight") followed by the exact IA3 row/column scaling by the factor
# m / n (record _DORA_RECORD), undone in the reverse order, so unmerge restores W bit for bit.
# The factor is kept in a non-persistent buffer while merged, as unmerge needs the same values.
_DORA_RECORD = "weight.dora_factor"


def _check_dora_rank(layer, use_dora, r) -> None:
    if use_dora and r <= 0:
        raise ValueError(
            f"{type(layer).__name__}: use_dora=True needs an adapter (r > 0), got r={r}"
        )


def _init_magnitude_from_norm(self) -> None:
    """peft initializes the magnitude to the row norms of W + scaling·ΔW."""
    with torch.no_grad():
        weight = self.weight.detach()
        work = weight.to(_autograd.core_dtype(weight.dtype, weight.device.type))
        self.lora_magnitude_vector.copy_(self._dora_norm(work))


def _dora_merge_factor_of(self, weight: torch.Tensor) -> torch.Tensor:
    """m / n from the unmerged weight, in the weight's dtype, kept for the unmerge."""
    norm = self._dora_norm(weight)
    factor = self.lora_magnitude_vector.detach().to(weight.dtype) / norm
    self.register_buffer("_dora_merge_factor", factor, persistent=False)
    return factor


class Embedding(_MergeOnEval, nn.Embedding, LoRALayer):
    """loralib.Embedding: ``y = W[x] + scaling · Aᵀ[x] · Bᵀ``; lora_A (r, V) zeros, lora_B (D, r)
    N(0, 1). No dropout (as in loralib). Differences: ``max_norm``, ``sparse`` and
    ``scale_grad_by_freq`` are rejected when r > 0 (loralib renormalizes lora_A in place and
    its sparse backward fails); merge is exact and checkpoint-safe (see ``_MergeOnEval``).

    ``use_dora=True`` (an extension; peft's DoRA embedding): a trainable
    ``lora_magnitude_vector`` (D,) initialized to the norms n of W + scaling·(B·A)ᵀ taken per
    embedding dimension over the vocabulary, and ``y = (m / n) ⊙ (W[x] + scaling·Aᵀ[x]·Bᵀ)``;
    eval merges ``(m / n) ⊙ (W + scaling·(B·A)ᵀ)`` exactly (see ``_DoraMerge``)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: int = 1,
        merge_weights: bool = True,
        **kwargs,
    ):
        # Taken from kwargs so the signature stays loralib's.
        use_dora = kwargs.pop("use_dora", False)
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(
            self, r=r, lora_alpha=lora_alpha, lora_dropout=0, merge_weights=merge_weights
        )
        _check_dora_rank(self, use_dora, r)
        self.use_dora = bool(use_dora)
        if r > 0:
            _reject_embedding_options(self, "LoRA (r > 0)")
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.weight.new_empty((embedding_dim,)))
            self._dora_sq_norm = _autograd.WeightSqNormCache()
            self._init_magnitude()
        self._init_merge_state()

    def reset_parameters(self):
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        if hasattr(self, "lora_magnitude_vector"):
            self._init_magnitude()

    def _dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """n per embedding dimension, of W's (D, V) view."""
        lora_a, lora_b = self._adapters(weight.dtype)
        return functional.dora_weight_norm(
            weight,
            lora_a,
            lora_b,
            self.scaling,
            fan_in_fan_out=True,
            stream=_autograd.cuda_stream(weight.device),
        )

    _init_magnitude = _init_magnitude_from_norm

    def _adapter_active(self) -> bool:
        return self.r > 0

    def _merge_targets(self):
        return {"weight": self.weight.detach()}

    def _merge_tensors(self, targets):
        weight = targets["weight"]
        self._merged_scale = self.scaling
        factor = self._dora_factor(weight) if self.use_dora else None
        record = functional.lora_embedding_merge(
            weight,
            *self._adapters(weight.dtype),
            self._merged_scale,
            stream=_autograd.cuda_stream(weight.device),
        )
        records = {"weight": tuple(record)}
        if factor is not None:
            records[_DORA_RECORD] = tuple(
                functional.ia3_embedding_merge(
                    weight, factor, stream=_autograd.cuda_stream(weight.device)
                )
            )
        return records

    def _unmerge_tensors(self, targets, records):
        weight = targets["weight"]
        if _DORA_RECORD in records:
            functional.ia3_embedding_unmerge(
                weight,
                self._dora_merge_factor,
                functional.MergeRecord(*records[_DORA_RECORD]),
                stream=_autograd.cuda_stream(weight.device),
            )
        functional.lora_embedding_unmerge(
            weight,
            *self._adapters(weight.dtype),
            self._merged_scale,
            functional.MergeRecord(*records["weight"]),
            stream=_autograd.cuda_stream(weight.device),
        )

    _dora_factor = _dora_merge_factor_of

    def forward(self, x: torch.Tensor):
        if self.r > 0 and not self.merged:
            if self.use_dora:
                return _autograd.dora_embedding(
                    x,
                    self.weight,
                    self.lora_A,
                    self.lora_B,
                    self.lora_magnitude_vector,
                    scale=self.scaling,
                    padding_idx=self.padding_idx,
                    sq_norm_cache=self._dora_sq_norm,
                )
            return _autograd.lora_embedding(
                x,
                self.weight,
                self.lora_A,
                self.lora_B,
                scale=self.scaling,
                padding_idx=self.padding_idx,
            )
        return nn.Embedding.forward(self, x)

    def extra_repr(self) -> str:
        return f"{nn.Embedding.extra_repr(self)}, {self._lora_repr()}"


class _LoraLinearBase(_MergeOnEval, nn.Linear, LoRALayer):
    """What Linear and MergedLinear share (loralib keeps them as unrelated classes, so
    ``isinstance(m, Linear)`` stays False for a MergedLinear here too). Subclasses provide
    ``_adapter_active()`` and ``_enable_lora()`` (None for a plain adapter)."""

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _merge_targets(self):
        return {"weight": self.weight.detach()}

    def _merge_tensors(self, targets):
        weight = targets["weight"]
        self._merged_scale = self.scaling
        use_dora = getattr(self, "use_dora", False)
        factor = self._dora_factor(weight) if use_dora else None
        record = functional.lora_merge(
            weight,
            *self._adapters(weight.dtype),
            self._merged_scale,
            fan_in_fan_out=self.fan_in_fan_out,
            enable_lora=self._enable_lora(),
            stream=_autograd.cuda_stream(weight.device),
        )
        records = {"weight": tuple(record)}
        if factor is not None:
            weight_record, _ = functional.ia3_merge(
                weight,
                factor,
                fan_in_fan_out=self.fan_in_fan_out,
                stream=_autograd.cuda_stream(weight.device),
            )
            records[_DORA_RECORD] = tuple(weight_record)
        return records

    _dora_factor = _dora_merge_factor_of

    def _dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self._adapters(weight.dtype)
        return functional.dora_weight_norm(
            weight,
            lora_a,
            lora_b,
            self.scaling,
            fan_in_fan_out=self.fan_in_fan_out,
            stream=_autograd.cuda_stream(weight.device),
        )

    _init_magnitude = _init_magnitude_from_norm

    def _unmerge_tensors(self, targets, records):
        weight = targets["weight"]
        if _DORA_RECORD in records:
            functional.ia3_unmerge(
                weight,
                self._dora_merge_factor,
                (functional.MergeRecord(*records[_DORA_RECORD]), None),
                fan_in_fan_out=self.fan_in_fan_out,
                stream=_autograd.cuda_stream(weight.device),
            )
        functional.lora_unmerge(
            weight,
            *self._adapters(weight.dtype),
            self._merged_scale,
            functional.MergeRecord(*records["weight"]),
            fan_in_fan_out=self.fan_in_fan_out,
            enable_lora=self._enable_lora(),
            stream=_autograd.cuda_stream(weight.device),
        )

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _transpose_if(self.weight, self.fan_in_fan_out), self.bias)

    def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "use_dora", False):
            return _autograd.dora_linear(
                x,
                self.weight,
                self.bias,
                self.lora_A,
                self.lora_B,
                self.lora_magnitude_vector,
                scale=self.scaling,
                fan_in_fan_out=self.fan_in_fan_out,
                dropout=_active_dropout_p(self.lora_dropout),
                sq_norm_cache=self._dora_sq_norm,
                layer=type(self).__name__,
            )
        weight, bias, lora_a, lora_b = _lora_linear_parameters(self)
        return _autograd.lora_linear(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            scale=self.scaling,
            fan_in_fan_out=self.fan_in_fan_out,
            enable_lora=self._enable_lora(),
            dropout=_active_dropout_p(self.lora_dropout),
        )

    def extra_repr(self) -> str:
        return (
            f"{nn.Linear.extra_repr(self)}, {self._lora_repr()}, "
            f"fan_in_fan_out={self.fan_in_fan_out}"
        )


class Linear(_LoraLinearBase):
    """loralib.Linear: ``y = x·T(W)ᵀ + b + scaling · drop(x)·Aᵀ·Bᵀ`` with lora_A (r, in)
    kaiming-uniform(a=√5) and lora_B (out, r) zeros; ``fan_in_fan_out=True`` stores W as a
    transposed (in, out) view, as loralib does. The unmerged forward is one autograd node on the
    C core; dropout masks are regenerated in backward from a seed drawn from torch's CPU
    generator. Differences: merge is exact and checkpoint-safe, the module pickles, and dtypes
    follow the rule in cpeft._autograd (docs/loralib-differences.md).

    ``use_dora=True`` (an extension; peft's DoRA): a trainable ``lora_magnitude_vector`` (out,)
    initialized to the row norms n of W + scaling·B·A, and ``y = (m / n) ⊙ (x·Wᵀ +
    scaling·drop(x)·Aᵀ·Bᵀ) + b`` with n a constant for backward; with dropout active, peft's
    training formula ``x·Wᵀ + b + (m/n - 1) ⊙ drop(x)·Wᵀ + (m/n) ⊙ scaling·drop(x)·Aᵀ·Bᵀ``.
    ‖W‖² is cached while W is unchanged (cpeft._autograd.WeightSqNormCache). Eval merges
    ``(m / n) ⊙ (W + scaling·B·A)`` and unmerge restores W bit for bit."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ):
        # Taken from kwargs so the signature stays loralib's.
        use_dora = kwargs.pop("use_dora", False)
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(
            self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights
        )
        _check_dora_rank(self, use_dora, r)
        self.use_dora = bool(use_dora)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        if self.use_dora:
            # Created after the transpose, so n is taken on the final layout.
            self.lora_magnitude_vector = nn.Parameter(self.weight.new_empty((out_features,)))
            self._dora_sq_norm = _autograd.WeightSqNormCache()
            self._init_magnitude()
        self._init_merge_state()

    def reset_parameters(self):
        super().reset_parameters()
        if hasattr(self, "lora_magnitude_vector"):
            self._init_magnitude()

    def _adapter_active(self) -> bool:
        return self.r > 0

    def _enable_lora(self) -> Optional[List[bool]]:
        return None

    def forward(self, x: torch.Tensor):
        if self.r > 0 and not self.merged:
            return self._lora_forward(x)
        return self._base_forward(x)


class MergedLinear(_LoraLinearBase):
    """loralib.MergedLinear: one packed projection (e.g. GPT-2's qkv) cut into
    ``len(enable_lora)`` contiguous output blocks, each enabled block with its own rank-r
    adapter; lora_A (r·K, in), lora_B (out/G·K, r) for K enabled blocks. The core computes the
    per-block low-rank products (loralib builds the dense ΔW every forward). Differences: with
    no enabled block the layer acts as r = 0 (loralib's train-mode forward raises
    AttributeError; Q6); ``lora_ind`` is a non-persistent buffer that follows ``.to()`` (Q10);
    ``enable_lora`` is copied; a bad length raises ValueError instead of AssertionError."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        enable_lora: List[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ):
        enable_lora = [bool(enabled) for enabled in enable_lora]
        if not enable_lora or out_features % len(enable_lora) != 0:
            raise ValueError(
                "The length of enable_lora must divide out_features: got "
                f"len(enable_lora)={len(enable_lora)}, out_features={out_features}"
            )
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(
            self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights
        )
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            groups, enabled = len(enable_lora), sum(enable_lora)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * enabled, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features // groups * enabled, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
            lora_ind = torch.zeros(
                (groups, out_features // groups), dtype=torch.bool, device=self.weight.device
            )
            lora_ind[enable_lora, :] = True
            self.register_buffer("lora_ind", lora_ind.view(-1), persistent=False)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        self._init_merge_state()

    def _adapter_active(self) -> bool:
        return self.r > 0 and any(self.enable_lora)

    def _enable_lora(self) -> Optional[List[bool]]:
        return self.enable_lora

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:
        result = x.new_zeros((len(self.lora_ind), *x.shape[1:]))
        result[self.lora_ind] = x
        return result

    def merge_AB(self) -> torch.Tensor:
        """The dense ΔW / scaling in W's storage layout (loralib's public helper)."""
        enabled = sum(self.enable_lora)
        blocks_a = self.lora_A.view(enabled, self.r, -1)
        blocks_b = self.lora_B.view(enabled, -1, self.r)
        delta_w = torch.bmm(blocks_b, blocks_a).reshape(-1, self.lora_A.shape[1])
        return _transpose_if(self.zero_pad(delta_w), self.fan_in_fan_out)

    def forward(self, x: torch.Tensor):
        if self._adapter_active() and not self.merged:
            return self._lora_forward(x)
        return self._base_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, enable_lora={self.enable_lora}"


class ConvLoRA(_MergeOnEval, nn.Module, LoRALayer):
    """loralib.ConvLoRA (0.1.2 layout: parameters ``conv.weight``, ``conv.bias``, ``lora_A``,
    ``lora_B``). ΔW = (lora_B @ lora_A).view(conv.weight.shape) · scaling with lora_A
    (r·k, in·k) and lora_B (out/groups · k^(d-1), r·k) for a d-dimensional kernel of size k:
    for Conv2d this is loralib's layout exactly; for Conv1d and Conv3d, where loralib's shapes
    cannot be reshaped into the kernel (#115), the rows of lora_B are sized so that they can.

    The conv itself is not in the C core: the unmerged forward runs torch's conv on
    W + ΔW built in torch (as loralib does); merge and unmerge use the core's exact merge on the
    (rows of lora_B) x (cols of lora_A) view of the kernel. ``lora_dropout`` is accepted and,
    as in loralib, has no effect (a warning says so). A non-int ``kernel_size`` raises TypeError
    (loralib: AssertionError)."""

    def __init__(
        self,
        conv_module,
        in_channels,
        out_channels,
        kernel_size,
        r=0,
        lora_alpha=1,
        lora_dropout=0.0,
        merge_weights=True,
        **kwargs,
    ):
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
            raise TypeError(
                f"{type(self).__name__}: kernel_size must be an int, got {kernel_size!r}"
            )
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(
            self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=merge_weights
        )
        if lora_dropout > 0.0:
            warnings.warn(
                f"{type(self).__name__}: lora_dropout={lora_dropout} has no effect on "
                "convolutions (as in loralib)",
                UserWarning,
                stacklevel=2,
            )
        if r > 0:
            kernel_dims = self.conv.weight.dim() - 2
            self.lora_A = nn.Parameter(
                self.conv.weight.new_zeros((r * kernel_size, in_channels * kernel_size))
            )
            self.lora_B = nn.Parameter(
                self.conv.weight.new_zeros(
                    (
                        out_channels // self.conv.groups * kernel_size ** (kernel_dims - 1),
                        r * kernel_size,
                    )
                )
            )
            self.scaling = self.lora_alpha / self.r
            self.conv.weight.requires_grad = False
        self.reset_parameters()
        self.merged = False
        self._init_merge_state()

    def reset_parameters(self):
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _adapter_active(self) -> bool:
        return self.r > 0

    def _merge_targets(self):
        return {"conv.weight": self.conv.weight.detach()}

    def _matrix_view(self, kernel: torch.Tensor) -> torch.Tensor:
        return kernel.view(self.lora_B.shape[0], self.lora_A.shape[1])

    def _merge_tensors(self, targets):
        kernel = targets["conv.weight"]
        self._merged_scale = self.scaling
        record = functional.lora_merge(
            self._matrix_view(kernel),
            *self._adapters(kernel.dtype),
            self._merged_scale,
            stream=_autograd.cuda_stream(kernel.device),
        )
        return {"conv.weight": tuple(record)}

    def _unmerge_tensors(self, targets, records):
        kernel = targets["conv.weight"]
        functional.lora_unmerge(
            self._matrix_view(kernel),
            *self._adapters(kernel.dtype),
            self._merged_scale,
            functional.MergeRecord(*records["conv.weight"]),
            stream=_autograd.cuda_stream(kernel.device),
        )

    def forward(self, x):
        if self.r > 0 and not self.merged:
            weight = self.conv.weight
            delta = self.lora_B.to(weight.dtype) @ self.lora_A.to(weight.dtype)
            return self.conv._conv_forward(
                x, weight + delta.view(weight.shape) * self.scaling, self.conv.bias
            )
        return self.conv(x)

    def extra_repr(self) -> str:
        return self._lora_repr()


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)


class IA3Layer:
    """Settings shared by the IA3 layers (an extension: loralib has no IA3). The trainable
    vector is ``ia3_l``; ``mark_only_lora_as_trainable`` and ``lora_state_dict`` treat ``ia3_``
    names as they treat ``lora_`` ones."""

    def __init__(self, merge_weights: bool):
        self.merged = False
        self.merge_weights = merge_weights


class IA3Linear(_MergeOnEval, nn.Linear, IA3Layer):
    """IA3 (peft's semantics) on a linear layer, ``ia3_l`` initialized to ones:
    output scaling ``y = (x·T(W)ᵀ + b) ⊙ l`` with l of shape (out, 1), or, with
    ``is_feedforward=True``, input scaling ``y = (x ⊙ l)·T(W)ᵀ + b`` with l of shape (1, in).
    The weight is frozen at construction (the bias is not), and eval merges l into W (and into
    b for output scaling) exactly: unmerge restores the original bits even where l is 0, where
    peft's division by l + 1e-8 cannot."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        is_feedforward: bool = False,
        bias: bool = True,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, **kwargs)
        IA3Layer.__init__(self, merge_weights=merge_weights)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = fan_in_fan_out
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(self.weight.new_ones(shape))
        self.weight.requires_grad = False
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        self._init_merge_state()

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "ia3_l"):
            nn.init.ones_(self.ia3_l)

    def _adapter_active(self) -> bool:
        return True

    def _merge_targets(self):
        targets = {"weight": self.weight.detach()}
        if self.bias is not None and not self.is_feedforward:
            targets["bias"] = self.bias.detach()
        return targets

    def _merge_tensors(self, targets):
        weight = targets["weight"]
        records = functional.ia3_merge(
            weight,
            self.ia3_l.detach().to(weight.dtype),
            bias=targets.get("bias"),
            feedforward=self.is_feedforward,
            fan_in_fan_out=self.fan_in_fan_out,
            stream=_autograd.cuda_stream(weight.device),
        )
        weight_record, bias_record = records
        merged = {"weight": tuple(weight_record)}
        if "bias" in targets:
            merged["bias"] = tuple(bias_record)
        return merged

    def _unmerge_tensors(self, targets, records):
        weight = targets["weight"]
        bias_record = records.get("bias")
        functional.ia3_unmerge(
            weight,
            self.ia3_l.detach().to(weight.dtype),
            (
                functional.MergeRecord(*records["weight"]),
                None if bias_record is None else functional.MergeRecord(*bias_record),
            ),
            bias=targets.get("bias"),
            feedforward=self.is_feedforward,
            fan_in_fan_out=self.fan_in_fan_out,
            stream=_autograd.cuda_stream(weight.device),
        )

    def forward(self, x: torch.Tensor):
        if not self.merged:
            return _autograd.ia3_linear(
                x,
                self.weight,
                self.bias,
                self.ia3_l,
                feedforward=self.is_feedforward,
                fan_in_fan_out=self.fan_in_fan_out,
            )
        return F.linear(x, _transpose_if(self.weight, self.fan_in_fan_out), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{nn.Linear.extra_repr(self)}, is_feedforward={self.is_feedforward}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, merge_weights={self.merge_weights}, "
            f"merged={self.merged}"
        )


class IA3Embedding(_MergeOnEval, nn.Embedding, IA3Layer):
    """IA3 on an embedding: ``y = W[x] ⊙ l`` with ``ia3_l`` of shape (embedding_dim, 1), ones.
    peft has no IA3 embedding; this follows its Linear semantics (output scaling). The weight
    is frozen at construction; ``max_norm``, ``sparse`` and ``scale_grad_by_freq`` are rejected."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, merge_weights: bool = True, **kwargs
    ):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        IA3Layer.__init__(self, merge_weights=merge_weights)
        _reject_embedding_options(self, "IA3")
        self.ia3_l = nn.Parameter(self.weight.new_ones((embedding_dim, 1)))
        self.weight.requires_grad = False
        self._init_merge_state()

    def reset_parameters(self):
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "ia3_l"):
            nn.init.ones_(self.ia3_l)

    def _adapter_active(self) -> bool:
        return True

    def _merge_targets(self):
        return {"weight": self.weight.detach()}

    def _merge_tensors(self, targets):
        weight = targets["weight"]
        record = functional.ia3_embedding_merge(
            weight,
            self.ia3_l.detach().to(weight.dtype),
            stream=_autograd.cuda_stream(weight.device),
        )
        return {"weight": tuple(record)}

    def _unmerge_tensors(self, targets, records):
        weight = targets["weight"]
        functional.ia3_embedding_unmerge(
            weight,
            self.ia3_l.detach().to(weight.dtype),
            functional.MergeRecord(*records["weight"]),
            stream=_autograd.cuda_stream(weight.device),
        )

    def forward(self, x: torch.Tensor):
        if not self.merged:
            return _autograd.ia3_embedding(x, self.weight, self.ia3_l, padding_idx=self.padding_idx)
        return nn.Embedding.forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"{nn.Embedding.extra_repr(self)}, merge_weights={self.merge_weights}, "
            f"merged={self.merged}"
        )
