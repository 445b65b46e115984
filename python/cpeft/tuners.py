"""Adapter layers of the peft-style API, in peft's structure: one layer holds any number of named
adapters around the untouched original module.

A targeted module ``m`` becomes a layer whose ``base_layer`` is ``m`` itself (its Parameters are
neither copied nor re-created, so tied weights stay tied) and whose adapters live in dicts keyed
by adapter name: ``lora_A.<name>.weight``, ``lora_B.<name>.weight``,
``lora_embedding_A.<name>``, ``ia3_l.<name>`` - the in-model key layout of peft, which strips
the adapter name again when it writes files.

Every layer derives from :class:`BaseTunerLayer` and exposes peft's layer attributes
(``base_layer``/``get_base_layer()``, ``active_adapters``, ``active_adapter``, ``merged``,
``merged_adapters``, ``disable_adapters``, ``in_features``/``out_features``, ``merge()``,
``unmerge()``), so code that walks a model for adapter layers works with either library.

The forward of unmerged adapters runs the C core (cpeft._autograd): the base product and every
active adapter of the layer in one autograd node. Several active adapters of one layer are
concatenated along the rank (``[A_1; A_2]``, ``[s_1 B_1, s_2 B_2]``), which is exactly their sum.
Merges go through cpeft.functional's exact merge: unmerging (in reverse merge order) restores
the base weights bit for bit.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from . import _autograd, functional
from .layers import _core_merges

__all__ = [
    "BaseTunerLayer",
    "LoraLayer",
    "Linear",
    "Embedding",
    "IA3Layer",
    "IA3Linear",
    "IA3Embedding",
]


def _active_dropout_p(dropout: nn.Module) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


class BaseTunerLayer(nn.Module):
    """What every cpeft adapter layer of the peft-style API shares (peft's ``BaseTunerLayer``).

    Subclasses name their per-adapter containers in ``adapter_layer_names`` (trainable
    ModuleDicts/ParameterDicts) and ``other_param_names`` (plain dicts of settings), and provide
    ``_merge_targets()`` (the base tensors a merge writes), ``_merge_into(adapter, targets)``
    returning ``{target: (index, value)}`` records, and ``_unmerge_from(adapter, targets,
    records)``.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # adapter -> target -> (index buffer name, value buffer name); the buffers are
        # non-persistent so records follow .to() and stay out of state dicts.
        self._merge_records: dict[str, dict[str, tuple[str, str]]] = {}
        self._record_counter = 0
        # One adapter name per sample while a mixed-adapter batch runs (PeftModel sets it around
        # the call), else None.
        self._mixed_adapter_names: Optional[list[str]] = None

    # ---- peft's layer attributes ---------------------------------------------------------------

    def get_base_layer(self) -> nn.Module:
        base = self
        while isinstance(base, BaseTunerLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> list[str]:
        # A list, as peft's layers hold it after any set_adapter call.
        return list(self._active_adapter)

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, in the order they were added."""
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    def _adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        found = []
        for container_name in self.adapter_layer_names:
            container = getattr(self, container_name)
            if adapter in container:
                entry = container[adapter]
                found.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
        return found

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Activates ``adapter_names`` (those this layer holds) and, as peft does, makes exactly
        their parameters trainable (none with ``inference_mode``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for adapter in self.adapter_names:
            trainable = adapter in names and not inference_mode
            for parameter in self._adapter_parameters(adapter):
                parameter.requires_grad_(trainable)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"adapter_name: {adapter_name!r} is merged into the base weights; "
                f"unmerge it before deleting it"
            )
        for container_name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, container_name)
            if adapter_name in container:
                del container[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = [a for a in self._active_adapter if a != adapter_name]
            if not remaining and self.adapter_names:
                remaining = [self.adapter_names[0]]
            self._active_adapter = remaining

    # ---- merge and unmerge ---------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Folds the active adapters (or ``adapter_names``) into the base weights, exactly.
        ``safe_merge=True`` first merges on a copy and raises ValueError, leaving the weights
        untouched, if a result is not finite (see ``check_merge_is_finite``)."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [name for name in names if name not in self.adapter_names]
        if adapter_names is not None and unknown:
            raise ValueError(
                f"adapter_names: {unknown} are not adapters of this layer "
                f"(it holds {self.adapter_names})"
            )
        if safe_merge:
            self.check_merge_is_finite(names)
        for adapter in names:
            if adapter in self.merged_adapters or adapter not in self.adapter_names:
                continue
            self._merge_one(adapter)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def check_merge_is_finite(
        self, adapter_names: Optional[list[str]] = None, where: str = ""
    ) -> None:
        """peft's safe_merge check: merges ``adapter_names`` (default: the active adapters) in
        order on a copy of the base tensors and raises ValueError, with peft's message, when a
        result is not finite in the base dtype. The layer itself is not touched."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.adapter_names and n not in self.merged_adapters]
        if not names:
            return
        targets = self._merge_targets()
        work = {
            name: t.to(_autograd.core_dtype(t.dtype, t.device.type), copy=True).contiguous()
            for name, t in targets.items()
        }
        for adapter in names:
            self._merge_into(adapter, work)
            for name, merged in work.items():
                if not bool(torch.isfinite(merged.to(targets[name].dtype)).all()):
                    place = f" (layer {where!r}, {name})" if where else f" ({name})"
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter} seems "
                        f"to be broken{place}; no weight was changed"
                    )

    def unmerge(self) -> None:
        """Removes every merged adapter, last merged first, restoring the base weights bit for bit."""
        while self.merged_adapters:
            adapter = self.merged_adapters[-1]
            self._unmerge_one(adapter)
            self.merged_adapters.pop()

    @torch.no_grad()
    def _merge_one(self, adapter: str) -> None:
        targets = self._merge_targets()
        if all(_core_merges(t) for t in targets.values()):
            records = self._merge_into(adapter, targets)
        else:
            # Dtypes or layouts the core cannot merge in place keep a full copy of the original.
            originals = {name: t.clone() for name, t in targets.items()}
            work = {
                name: t.to(_autograd.core_dtype(t.dtype, t.device.type)).contiguous()
                for name, t in targets.items()
            }
            self._merge_into(adapter, work)
            for name, t in targets.items():
                t.copy_(work[name])
            records = {name: (None, originals[name]) for name in targets}
        names = {}
        for target, (index, value) in records.items():
            self._record_counter += 1
            index_name = f"_merge_index_{self._record_counter}"
            value_name = f"_merge_value_{self._record_counter}"
            self.register_buffer(index_name, index, persistent=False)
            self.register_buffer(value_name, value, persistent=False)
            names[target] = (index_name, value_name)
        self._merge_records[adapter] = names

    @torch.no_grad()
    def _unmerge_one(self, adapter: str) -> None:
        targets = self._merge_targets()
        names = self._merge_records.pop(adapter)
        records = {target: (getattr(self, i), getattr(self, v)) for target, (i, v) in names.items()}
        if any(index is None for index, _ in records.values()):
            for target, (_, original) in records.items():
                targets[target].copy_(original)
        else:
            self._unmerge_from(adapter, targets, records)
        for index_name, value_name in names.values():
            delattr(self, index_name)
            delattr(self, value_name)

    def _base_forward(self, x):
        if self.merged and self.disable_adapters:
            self.unmerge()
        return self.base_layer(x)

    def _mixed_batch_adapters(self) -> list[str]:
        """The adapters of this layer that the running mixed-adapter batch uses (none when no
        such batch runs or the adapters are disabled)."""
        names = self._mixed_adapter_names
        if names is None or self.disable_adapters:
            return []
        wanted = set(names)
        used = [a for a in self.adapter_names if a in wanted]
        if used and self.merged:
            raise ValueError(
                f"adapter_names: cannot run a mixed-adapter batch while adapters "
                f"{self.merged_adapters} are merged; call unmerge_adapter() first"
            )
        return used

    def _adapters_to_run(self) -> list[str]:
        if self.disable_adapters or self.merged:
            return []
        held = self.adapter_names
        return [a for a in self._active_adapter if a in held]

    def _adapters_outside_mixed_batches(self) -> list[str]:
        """The adapters to run on a layer kind that mixed-adapter batches do not cover: none
        while such a batch runs (its samples see the base layer), and an error if the batch
        names one of this layer's adapters."""
        if self._mixed_batch_adapters():
            raise ValueError(
                f"adapter_names: mixed-adapter batches run LoRA adapters of linear "
                f"layers only; this {type(self).__name__} holds {self.adapter_names}"
            )
        return [] if self._mixed_adapter_names is not None else self._adapters_to_run()


def _stream(tensor: torch.Tensor):
    return _autograd.cuda_stream(tensor.device)


def _merge_lora_bias(lora_bias: torch.Tensor, scaling: float, bias: Optional[torch.Tensor]):
    """bias += scaling · lora_B.bias through the core's exact merge (bias as an (OUT, 1) matrix,
    lora_B.bias as a rank-1 B against A = [[1]]); returns the merge record."""
    if bias is None:
        raise RuntimeError(
            "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."
        )
    column = bias.view(-1, 1)
    return functional.lora_merge(
        column,
        column.new_ones((1, 1)),
        lora_bias.detach().to(bias.dtype).view(-1, 1),
        scaling,
        stream=_stream(bias),
    )


def _unmerge_lora_bias(lora_bias: torch.Tensor, scaling: float, bias: torch.Tensor, record) -> None:
    column = bias.view(-1, 1)
    functional.lora_unmerge(
        column,
        column.new_ones((1, 1)),
        lora_bias.detach().to(bias.dtype).view(-1, 1),
        scaling,
        functional.MergeRecord(*record),
        stream=_stream(bias),
    )


class DoraMagnitude(nn.Module):
    """One adapter's DoRA magnitude, held as ``.weight`` (out,) so the in-model key is peft's
    ``lora_magnitude_vector.<adapter>.weight``; files store it as ``lora_magnitude_vector``."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


# The DoRA merge writes (m / n) ⊙ (W + s·ΔW): the exact LoRA merge (record "weight"), then the exact
# IA3 scaling of W's output rows (embedding: columns) by m / n (record _DORA_RECORD). Unmerge undoes
# them in the reverse order with the same factor, kept in a non-persistent buffer while merged.
_DORA_RECORD = "weight.dora_factor"


class _DoraMixin:
    """DoRA for the LoRA layers (peft's ``use_dora``): per-adapter ``lora_magnitude_vector``,
    the C core's DoRA forward (one DoRA adapter active per layer), and the exact merge."""

    def _init_dora(self) -> None:
        self.lora_magnitude_vector = nn.ModuleDict()
        self._dora_sq_norm = _autograd.WeightSqNormCache()

    def _is_dora(self, adapter: str) -> bool:
        return adapter in self.lora_magnitude_vector

    def _dora_weight_norm(self, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self._adapter_pair(adapter, weight.dtype)
        return functional.dora_weight_norm(
            weight,
            lora_a,
            lora_b,
            self.scaling[adapter],
            fan_in_fan_out=self._dora_fan_in_fan_out,
            stream=_stream(weight),
        )

    @torch.no_grad()
    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight without the adapters merged into it (a copy; the live one if none
        is merged): DoRA's norm is always taken on the pretrained weight, as in peft."""
        weight = self.get_base_layer().weight.detach()
        weight = weight.to(_autograd.core_dtype(weight.dtype, weight.device.type))
        if not self.merged_adapters:
            return weight
        weight = weight.clone()
        for adapter in reversed(self.merged_adapters):
            names = self._merge_records[adapter]
            records = {t: (getattr(self, i), getattr(self, v)) for t, (i, v) in names.items()}
            if any(index is None for index, _ in records.values()):
                weight.copy_(records["weight"][1])
            else:
                self._unmerge_from(adapter, {"weight": weight}, records)
        return weight

    @torch.no_grad()
    def add_dora_magnitude(self, adapter: str) -> None:
        weight = self._unmerged_weight()
        norm = self._dora_weight_norm(adapter, weight)
        self.lora_magnitude_vector[adapter] = DoraMagnitude(
            norm.to(self.get_base_layer().weight.dtype)
        )

    def _dora_factor_name(self, adapter: str) -> str:
        return f"_dora_factor_{adapter}"

    def _dora_merge_factor(self, adapter: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """m / n for merging ``adapter`` (None for plain LoRA), taken before anything of it is
        merged and kept for the unmerge."""
        if not self._is_dora(adapter):
            return None
        norm = self._dora_weight_norm(adapter, self._unmerged_weight().to(dtype))
        factor = self.lora_magnitude_vector[adapter].weight.detach().to(dtype) / norm
        self.register_buffer(self._dora_factor_name(adapter), factor, persistent=False)
        return factor

    def _unmerge_dora(self, adapter: str, weight: torch.Tensor, records: dict) -> None:
        factor = getattr(self, self._dora_factor_name(adapter))
        self._scale_unmerge(weight, factor, functional.MergeRecord(*records[_DORA_RECORD]))

    def _single_dora(self, adapters: list[str]) -> Optional[str]:
        """The DoRA adapter to run, or None when every active adapter is plain LoRA."""
        dora = [a for a in adapters if self._is_dora(a)]
        if not dora:
            return None
        if len(adapters) > 1:
            raise ValueError(
                f"active adapters {adapters} of one layer include DoRA adapters {dora}; "
                f"cpeft runs a DoRA adapter only as the one active adapter of a layer"
            )
        return dora[0]


class LoraLayer(BaseTunerLayer):
    """peft's ``LoraLayer`` settings: per-adapter ``r``, ``lora_alpha``, ``scaling`` dicts."""

    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int):
        super().__init__(base_layer, in_features, out_features)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def _set_settings(self, adapter: str, r: int, lora_alpha: float, use_rslora: bool) -> None:
        self.r[adapter] = r
        self.lora_alpha[adapter] = lora_alpha
        self.scaling[adapter] = lora_alpha / (r**0.5 if use_rslora else r)


class Linear(_DoraMixin, LoraLayer):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out``: the base
    weight is stored (in, out)). ``lora_A[name]`` is ``nn.Linear(in, r, bias=False)``,
    ``lora_B[name]`` ``nn.Linear(r, out, bias=lora_bias)``, as in peft; a DoRA adapter also has
    ``lora_magnitude_vector[name].weight`` (out,). With ``lora_bias`` the adapter adds
    ``scaling * lora_B.bias``: it is folded into the bias the core adds (one vector op per call),
    and a merge adds it to the base bias, as peft does."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_bias")

    def __init__(
        self, base_layer: nn.Module, in_features: int, out_features: int, fan_in_fan_out: bool
    ):
        super().__init__(base_layer, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_bias: dict[str, bool] = {}
        self._init_dora()

    @property
    def _dora_fan_in_fan_out(self) -> bool:
        return self.fan_in_fan_out

    def _scale_merge(self, weight, factor):
        record, _ = functional.ia3_merge(
            weight, factor, fan_in_fan_out=self.fan_in_fan_out, stream=_stream(weight)
        )
        return record

    def _scale_unmerge(self, weight, factor, record):
        functional.ia3_unmerge(
            weight,
            factor,
            (record, None),
            fan_in_fan_out=self.fan_in_fan_out,
            stream=_stream(weight),
        )

    def update_layer(
        self,
        adapter: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        lora_bias: bool = False,
    ) -> None:
        weight = self.get_base_layer().weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=lora_bias, **factory)
        self.lora_dropout[adapter] = (
            nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        )
        self.lora_bias[adapter] = lora_bias
        self._set_settings(adapter, r, lora_alpha, use_rslora)

    def adapter_tensors(self, adapter: str) -> dict[str, str]:
        """peft file key suffix -> this layer's state-dict key, for ``adapter``."""
        tensors = {
            "lora_A.weight": f"lora_A.{adapter}.weight",
            "lora_B.weight": f"lora_B.{adapter}.weight",
        }
        if self.lora_bias.get(adapter):
            tensors["lora_B.bias"] = f"lora_B.{adapter}.bias"
        if self._is_dora(adapter):
            tensors["lora_magnitude_vector"] = f"lora_magnitude_vector.{adapter}.weight"
        return tensors

    def _merge_targets(self) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        targets = {"weight": base.weight.detach()}
        if base.bias is not None:
            targets["bias"] = base.bias.detach()
        return targets

    def _adapter_pair(self, adapter: str, dtype: torch.dtype):
        return (
            self.lora_A[adapter].weight.detach().to(dtype),
            self.lora_B[adapter].weight.detach().to(dtype),
        )

    def _merge_into(self, adapter, targets):
        weight = targets["weight"]
        factor = self._dora_merge_factor(adapter, weight.dtype)
        record = functional.lora_merge(
            weight,
            *self._adapter_pair(adapter, weight.dtype),
            self.scaling[adapter],
            fan_in_fan_out=self.fan_in_fan_out,
            stream=_stream(weight),
        )
        records = {"weight": tuple(record)}
        if self.lora_bias.get(adapter):
            records["bias"] = tuple(
                _merge_lora_bias(
                    self.lora_B[adapter].bias, self.scaling[adapter], targets.get("bias")
                )
            )
        if factor is not None:
            records[_DORA_RECORD] = tuple(self._scale_merge(weight, factor))
        return records

    def _unmerge_from(self, adapter, targets, records):
        weight = targets["weight"]
        if _DORA_RECORD in records:
            self._unmerge_dora(adapter, weight, records)
        functional.lora_unmerge(
            weight,
            *self._adapter_pair(adapter, weight.dtype),
            self.scaling[adapter],
            functional.MergeRecord(*records["weight"]),
            fan_in_fan_out=self.fan_in_fan_out,
            stream=_stream(weight),
        )
        if "bias" in records and "bias" in targets:  # DoRA's norm of the bare weight passes no bias
            _unmerge_lora_bias(
                self.lora_B[adapter].bias, self.scaling[adapter], targets["bias"], records["bias"]
            )

    def _lora_bias_term(self, adapters: list[str]) -> Optional[torch.Tensor]:
        """Σ scaling · lora_B.bias over the active adapters that have one (None if none do)."""
        term = None
        for a in adapters:
            if self.lora_bias.get(a):
                part = self.lora_B[a].bias * self.scaling[a]
                term = part if term is None else term + part
        return term

    def _stacked(self, adapters: list[str]):
        """(A, B, scale, dropout p) of one adapter, or of several concatenated along the rank."""
        dropouts = {_active_dropout_p(self.lora_dropout[a]) for a in adapters}
        if len(adapters) == 1:
            a = adapters[0]
            return (self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], dropouts.pop())
        if len(dropouts) > 1:
            raise ValueError(
                f"active adapters {adapters} of one layer have different lora_dropout "
                f"values {sorted(dropouts)}; cpeft runs several active adapters of a "
                f"layer as one product and needs one dropout probability"
            )
        lora_a = torch.cat([self.lora_A[a].weight for a in adapters], dim=0)
        lora_b = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in adapters], dim=1)
        return lora_a, lora_b, 1.0, dropouts.pop()

    def _mixed_forward(self, x: torch.Tensor, used: list[str]) -> torch.Tensor:
        """Every sample through its own adapter, all adapters in one grouped call: the rows of
        x are tagged with their adapter's position in the packed [A_1; A_2; ...] and the op
        groups them; gradients reach every adapter used."""
        names = self._mixed_adapter_names
        with_bias = [a for a in used if self.lora_bias.get(a)]
        if with_bias:
            raise ValueError(
                f"adapter_names: adapters {with_bias} have lora_bias=True, which mixed-adapter "
                f"batches do not support"
            )
        dora = [a for a in used if self._is_dora(a)]
        if dora:
            raise ValueError(
                f"adapter_names: mixed-adapter batches run plain LoRA adapters; "
                f"{dora} of this layer use DoRA (as in peft, which refuses "
                f"adapter_names with DoRA)"
            )
        if x.dim() < 2 or x.shape[0] != len(names):
            raise ValueError(
                f"adapter_names: expected one name per sample, i.e. {x.shape[0] if x.dim() > 1 else 1} "
                f"names for an input of shape {tuple(x.shape)}, got {len(names)}"
            )
        dropouts = {_active_dropout_p(self.lora_dropout[a]) for a in used}
        if len(dropouts) > 1:
            raise ValueError(
                f"adapter_names: adapters {used} of one layer have different lora_dropout "
                f"values; a mixed-adapter batch needs one dropout probability per layer"
            )
        position = {a: i for i, a in enumerate(used)}
        per_sample = torch.tensor(
            [position.get(n, -1) for n in names], dtype=torch.int64, device=x.device
        )
        index = per_sample.repeat_interleave(x[0].numel() // x.shape[-1])
        base = self.get_base_layer()
        lora_a = torch.cat([self.lora_A[a].weight for a in used], dim=0)
        lora_b = torch.cat([self.lora_B[a].weight for a in used], dim=1)
        return _autograd.lora_grouped(
            x,
            base.weight,
            base.bias,
            lora_a,
            lora_b,
            index,
            ranks=[self.r[a] for a in used],
            scales=[self.scaling[a] for a in used],
            fan_in_fan_out=self.fan_in_fan_out,
            dropout=dropouts.pop(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        used = self._mixed_batch_adapters()
        if used:
            return self._mixed_forward(x, used)
        adapters = [] if self._mixed_adapter_names is not None else self._adapters_to_run()
        if not adapters:
            return self._base_forward(x)
        base = self.get_base_layer()
        dora = self._single_dora(adapters)
        if dora is not None:
            return _autograd.dora_linear(
                x,
                base.weight,
                base.bias,
                self.lora_A[dora].weight,
                self.lora_B[dora].weight,
                self.lora_magnitude_vector[dora].weight,
                scale=self.scaling[dora],
                fan_in_fan_out=self.fan_in_fan_out,
                dropout=_active_dropout_p(self.lora_dropout[dora]),
                sq_norm_cache=self._dora_sq_norm,
                layer=type(self).__name__,
            )
        lora_a, lora_b, scale, dropout = self._stacked(adapters)
        bias = base.bias
        lora_bias = self._lora_bias_term(adapters)
        if lora_bias is not None:
            bias = lora_bias if bias is None else bias + lora_bias
        return _autograd.lora_linear(
            x,
            base.weight,
            bias,
            lora_a,
            lora_b,
            scale=scale,
            fan_in_fan_out=self.fan_in_fan_out,
            enable_lora=None,
            dropout=dropout,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fan_in_fan_out={self.fan_in_fan_out}"


class Embedding(_DoraMixin, LoraLayer):
    """LoRA around ``nn.Embedding``: ``lora_embedding_A[name]`` (r, V) and
    ``lora_embedding_B[name]`` (D, r) raw Parameters, as in peft (no dropout); a DoRA adapter
    also has ``lora_magnitude_vector[name].weight`` (D,), normed over the vocabulary."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Embedding, in_features: int, out_features: int):
        super().__init__(base_layer, in_features, out_features)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self._init_dora()

    # The norm runs over the (D, V) view of the (V, D) weight.
    _dora_fan_in_fan_out = True

    def _scale_merge(self, weight, factor):
        return functional.ia3_embedding_merge(weight, factor, stream=_stream(weight))

    def _scale_unmerge(self, weight, factor, record):
        functional.ia3_embedding_unmerge(weight, factor, record, stream=_stream(weight))

    def update_layer(
        self, adapter: str, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool
    ) -> None:
        weight = self.get_base_layer().weight
        self.lora_embedding_A[adapter] = nn.Parameter(weight.new_zeros((r, self.in_features)))
        self.lora_embedding_B[adapter] = nn.Parameter(weight.new_zeros((self.out_features, r)))
        self._set_settings(adapter, r, lora_alpha, use_rslora)

    def adapter_tensors(self, adapter: str) -> dict[str, str]:
        keys = {
            "lora_embedding_A": f"lora_embedding_A.{adapter}",
            "lora_embedding_B": f"lora_embedding_B.{adapter}",
        }
        if self._is_dora(adapter):
            keys["lora_magnitude_vector"] = f"lora_magnitude_vector.{adapter}.weight"
        return keys

    def _merge_targets(self):
        return {"weight": self.get_base_layer().weight.detach()}

    def _adapter_pair(self, adapter, dtype):
        return (
            self.lora_embedding_A[adapter].detach().to(dtype),
            self.lora_embedding_B[adapter].detach().to(dtype),
        )

    def _merge_into(self, adapter, targets):
        weight = targets["weight"]
        factor = self._dora_merge_factor(adapter, weight.dtype)
        record = functional.lora_embedding_merge(
            weight,
            *self._adapter_pair(adapter, weight.dtype),
            self.scaling[adapter],
            stream=_stream(weight),
        )
        records = {"weight": tuple(record)}
        if factor is not None:
            records[_DORA_RECORD] = tuple(self._scale_merge(weight, factor))
        return records

    def _unmerge_from(self, adapter, targets, records):
        weight = targets["weight"]
        if _DORA_RECORD in records:
            self._unmerge_dora(adapter, weight, records)
        functional.lora_embedding_unmerge(
            weight,
            *self._adapter_pair(adapter, weight.dtype),
            self.scaling[adapter],
            functional.MergeRecord(*records["weight"]),
            stream=_stream(weight),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self._adapters_outside_mixed_batches()
        if not adapters:
            return self._base_forward(x)
        base = self.get_base_layer()
        dora = self._single_dora(adapters)
        if dora is not None:
            return _autograd.dora_embedding(
                x,
                base.weight,
                self.lora_embedding_A[dora],
                self.lora_embedding_B[dora],
                self.lora_magnitude_vector[dora].weight,
                scale=self.scaling[dora],
                padding_idx=base.padding_idx,
                sq_norm_cache=self._dora_sq_norm,
            )
        if len(adapters) == 1:
            a = adapters[0]
            lora_a, lora_b, scale = (
                self.lora_embedding_A[a],
                self.lora_embedding_B[a],
                self.scaling[a],
            )
        else:
            lora_a = torch.cat([self.lora_embedding_A[a] for a in adapters], dim=0)
            lora_b = torch.cat(
                [self.lora_embedding_B[a] * self.scaling[a] for a in adapters], dim=1
            )
            scale = 1.0
        return _autograd.lora_embedding(
            x, base.weight, lora_a, lora_b, scale=scale, padding_idx=base.padding_idx
        )

    def extra_repr(self) -> str:
        return f"num_embeddings={self.in_features}, embedding_dim={self.out_features}"


class IA3Layer(BaseTunerLayer):
    """peft's ``IA3Layer``: ``ia3_l[name]`` of shape (out, 1), or (1, in) when the layer is a
    feed-forward one (input scaling). Several active adapters multiply, as in peft."""

    adapter_layer_names = ("ia3_l",)

    def __init__(
        self, base_layer: nn.Module, in_features: int, out_features: int, is_feedforward: bool
    ):
        super().__init__(base_layer, in_features, out_features)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()

    def update_layer(self, adapter: str, init_ia3_weights: bool) -> None:
        weight = self.get_base_layer().weight
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vector = weight.new_empty(shape)
        with torch.no_grad():
            if init_ia3_weights:
                nn.init.ones_(vector)
            else:
                nn.init.normal_(vector)
        self.ia3_l[adapter] = nn.Parameter(vector)

    def adapter_tensors(self, adapter: str) -> dict[str, str]:
        return {"ia3_l": f"ia3_l.{adapter}"}

    def _vector(self, adapters: list[str]) -> torch.Tensor:
        vector = self.ia3_l[adapters[0]]
        for a in adapters[1:]:
            vector = vector * self.ia3_l[a]
        return vector


class IA3Linear(IA3Layer):
    """IA3 around ``nn.Linear`` or transformers' ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        is_feedforward: bool,
        fan_in_fan_out: bool,
    ):
        super().__init__(base_layer, in_features, out_features, is_feedforward)
        self.fan_in_fan_out = fan_in_fan_out

    def _merge_targets(self):
        base = self.get_base_layer()
        targets = {"weight": base.weight.detach()}
        if base.bias is not None and not self.is_feedforward:
            targets["bias"] = base.bias.detach()
        return targets

    def _merge_into(self, adapter, targets):
        weight = targets["weight"]
        weight_record, bias_record = functional.ia3_merge(
            weight,
            self.ia3_l[adapter].detach().to(weight.dtype),
            bias=targets.get("bias"),
            feedforward=self.is_feedforward,
            fan_in_fan_out=self.fan_in_fan_out,
            stream=_stream(weight),
        )
        records = {"weight": tuple(weight_record)}
        if "bias" in targets:
            records["bias"] = tuple(bias_record)
        return records

    def _unmerge_from(self, adapter, targets, records):
        weight = targets["weight"]
        bias_record = records.get("bias")
        functional.ia3_unmerge(
            weight,
            self.ia3_l[adapter].detach().to(weight.dtype),
            (
                functional.MergeRecord(*records["weight"]),
                None if bias_record is None else functional.MergeRecord(*bias_record),
            ),
            bias=targets.get("bias"),
            feedforward=self.is_feedforward,
            fan_in_fan_out=self.fan_in_fan_out,
            stream=_stream(weight),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self._adapters_outside_mixed_batches()
        if not adapters:
            return self._base_forward(x)
        base = self.get_base_layer()
        return _autograd.ia3_linear(
            x,
            base.weight,
            base.bias,
            self._vector(adapters),
            feedforward=self.is_feedforward,
            fan_in_fan_out=self.fan_in_fan_out,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"is_feedforward={self.is_feedforward}, fan_in_fan_out={self.fan_in_fan_out}"
        )


class IA3Embedding(IA3Layer):
    """IA3 around ``nn.Embedding`` (output scaling, ``ia3_l`` (D, 1)); peft has no IA3 embedding."""

    def __init__(self, base_layer: nn.Embedding, in_features: int, out_features: int):
        super().__init__(base_layer, in_features, out_features, is_feedforward=False)

    def _merge_targets(self):
        return {"weight": self.get_base_layer().weight.detach()}

    def _merge_into(self, adapter, targets):
        weight = targets["weight"]
        record = functional.ia3_embedding_merge(
            weight, self.ia3_l[adapter].detach().to(weight.dtype), stream=_stream(weight)
        )
        return {"weight": tuple(record)}

    def _unmerge_from(self, adapter, targets, records):
        weight = targets["weight"]
        functional.ia3_embedding_unmerge(
            weight,
            self.ia3_l[adapter].detach().to(weight.dtype),
            functional.MergeRecord(*records["weight"]),
            stream=_stream(weight),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self._adapters_outside_mixed_batches()
        if not adapters:
            return self._base_forward(x)
        base = self.get_base_layer()
        return _autograd.ia3_embedding(
            x, base.weight, self._vector(adapters), padding_idx=base.padding_idx
        )

    def extra_repr(self) -> str:
        return f"num_embeddings={self.in_features}, embedding_dim={self.out_features}"
