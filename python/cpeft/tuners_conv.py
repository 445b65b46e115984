"""Adapter layers of the peft-style API for ``nn.Conv1d/2d/3d`` (LoRA and IA3) and
``nn.MultiheadAttention`` (LoRA), in peft 0.21's layout, on cpeft.tuners' BaseTunerLayer.

LoRA on a convolution (peft's ``lora.Conv2d`` and siblings): ``lora_A[name]`` is a conv of the
base layer's type from ``in_channels`` to ``r`` channels with the base kernel size, stride and
padding (no bias); ``lora_B[name]`` a 1x1 conv from ``r`` to ``out_channels`` with the base's
``groups`` (and a bias with ``lora_bias``). ``y = base(x) + scaling · B(A(dropout(x)))``.

* A pointwise base (1x1 kernel, no padding, one group; any stride, which only subsamples x) is a
  matrix product over the channels: the whole layer runs as one cpeft LoRA-linear call (base
  product, adapter and bias in the C core) on the channels-last view of x, with no im2col.
* Otherwise the base conv and lora_A are convolutions (torch's), and the 1x1 lora_B is applied as
  a matrix product over the channels of A's output (one group) or as torch's grouped 1x1 conv.
* Merging adds ``scaling · B·A`` to the kernel viewed as an (out, in·k) matrix through the core's
  exact merge, so unmerge restores it bit for bit. As in peft, merging is refused for groups > 1.
* peft's lora_A ignores the base layer's dilation (a dilated base then fails in peft's forward or
  means something else after a merge), so a dilated base is refused at injection time.

IA3 on ``nn.Conv2d``/``nn.Conv3d`` (as peft; peft has none for ``nn.Conv1d``): ``ia3_l[name]`` of
shape (1, C, 1, ...) scales the output channels, or the input channels for feed-forward modules.
Merges multiply the kernel (and bias) and keep a copy of the originals, so unmerge is exact (peft
divides by l + 1e-8).

LoRA on ``nn.MultiheadAttention`` (peft's ``lora.MultiheadAttention``, packed q/k/v only):
``lora_A``/``lora_B`` adapt ``in_proj_weight`` (3E x E) and the module's ``out_proj`` is itself
wrapped in a cpeft LoRA ``Linear`` (file keys ``<path>.base_layer.out_proj.lora_A.weight``...).
Unmerged, unmasked self-attention without attention weights (``attn(x, x, x,
need_weights=False)``) runs both projections as cpeft LoRA-linear calls on the C core around
torch's ``scaled_dot_product_attention``; every other call runs torch's
``multi_head_attention_forward`` with ``W + scaling · B·A`` for both projections (the parameters
themselves are never reassigned, unlike peft's merge-per-call).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _autograd, functional
from .tuners import BaseTunerLayer, IA3Layer, Linear, LoraLayer, _active_dropout_p, _stream

__all__ = ["Conv", "IA3Conv", "MultiheadAttention", "conv_refusal"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return _autograd.compute_dtype(x.dtype, weight.dtype, x.device.type)


def _adapters_outside_mixed_batches(layer: BaseTunerLayer) -> list[str]:
    """The adapters to run; mixed-adapter batches (adapter_names=) run linear layers only."""
    if layer._mixed_batch_adapters():
        raise ValueError(
            f"adapter_names: mixed-adapter batches run LoRA adapters of linear layers only; "
            f"this {type(layer).__name__} holds {layer.adapter_names}"
        )
    return [] if layer._mixed_adapter_names is not None else layer._adapters_to_run()


def conv_refusal(base: nn.Module, method: str, r: int = 0) -> Optional[str]:
    """Why ``base`` cannot carry this adapter (None when it can); decided before injection."""
    if method == "ia3":
        if not isinstance(base, (nn.Conv2d, nn.Conv3d)):
            return "IA3 adapts nn.Conv2d and nn.Conv3d (as peft); nn.Conv1d is not supported"
        return None
    if any(d != 1 for d in base.dilation):
        return (
            f"dilation={base.dilation}: peft's lora_A ignores the base layer's dilation, so a dilated "
            f"convolution has no peft-compatible LoRA"
        )
    if r % base.groups != 0:
        return (
            f"groups={base.groups} and rank {r}: the rank must be divisible by groups (peft's rule)"
        )
    return None


class Conv(LoraLayer):
    """LoRA around ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` in peft's layout (see the module
    docstring)."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_bias")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_bias: dict[str, bool] = {}
        self._kernel_dim = base_layer.weight.dim()

    def update_layer(
        self,
        adapter: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        lora_bias: bool = False,
    ) -> None:
        base = self.get_base_layer()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        conv = type(base)
        ones = (1,) * (self._kernel_dim - 2)
        self.lora_A[adapter] = conv(
            self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, **factory
        )
        self.lora_B[adapter] = conv(
            r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias, **factory
        )
        self.lora_dropout[adapter] = (
            nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        )
        self.lora_bias[adapter] = lora_bias
        self._set_settings(adapter, r, lora_alpha, use_rslora)

    def adapter_tensors(self, adapter: str) -> dict[str, str]:
        tensors = {
            "lora_A.weight": f"lora_A.{adapter}.weight",
            "lora_B.weight": f"lora_B.{adapter}.weight",
        }
        if self.lora_bias.get(adapter):
            tensors["lora_B.bias"] = f"lora_B.{adapter}.bias"
        return tensors

    # ---- merge --------------------------------------------------------------------------------

    def _merge_targets(self) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        targets = {"weight": base.weight.detach()}
        if base.bias is not None:
            targets["bias"] = base.bias.detach()
        return targets

    def _matrices(self, adapter: str, kernel: torch.Tensor):
        """The kernel as an (out, in·k) matrix and A, B as the (r, in·k), (out, r) factors of ΔW."""
        if self.get_base_layer().groups > 1:
            raise NotImplementedError(
                "Merging is not supported for _ConvNd layers with groups > 1!"
            )
        lora_a = self.lora_A[adapter].weight.detach().to(kernel.dtype)
        lora_b = self.lora_B[adapter].weight.detach().to(kernel.dtype)
        return (
            kernel.view(kernel.shape[0], -1),
            lora_a.reshape(lora_a.shape[0], -1),
            lora_b.reshape(lora_b.shape[0], -1),
        )

    def _merge_into(self, adapter, targets):
        from .tuners import _merge_lora_bias

        kernel = targets["weight"]
        record = functional.lora_merge(
            *self._matrices(adapter, kernel), self.scaling[adapter], stream=_stream(kernel)
        )
        records = {"weight": tuple(record)}
        if self.lora_bias.get(adapter):
            records["bias"] = tuple(
                _merge_lora_bias(
                    self.lora_B[adapter].bias, self.scaling[adapter], targets.get("bias")
                )
            )
        return records

    def _unmerge_from(self, adapter, targets, records):
        from .tuners import _unmerge_lora_bias

        kernel = targets["weight"]
        functional.lora_unmerge(
            *self._matrices(adapter, kernel),
            self.scaling[adapter],
            functional.MergeRecord(*records["weight"]),
            stream=_stream(kernel),
        )
        if "bias" in records:
            _unmerge_lora_bias(
                self.lora_B[adapter].bias, self.scaling[adapter], targets["bias"], records["bias"]
            )

    # ---- forward ------------------------------------------------------------------------------

    def _is_pointwise(self) -> bool:
        """1x1 kernel, no padding, one group: a matrix product over the channels of x (of every
        stride-th position when strided, e.g. ResNet's shortcut convolutions)."""
        base = self.get_base_layer()
        return (
            all(k == 1 for k in base.kernel_size)
            and base.groups == 1
            and (base.padding in ("valid", "same") or all(p == 0 for p in base.padding))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = _adapters_outside_mixed_batches(self)
        if not adapters:
            return self._base_forward(x)
        if self._is_pointwise():
            return self._pointwise_forward(x, adapters)
        return self._conv_forward(x, adapters)

    def _bias_term(self, adapters: list[str]) -> Optional[torch.Tensor]:
        term = None
        for a in adapters:
            if self.lora_bias.get(a):
                part = self.lora_B[a].bias * self.scaling[a]
                term = part if term is None else term + part
        return term

    def _pointwise_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        dropouts = {_active_dropout_p(self.lora_dropout[a]) for a in adapters}
        if len(dropouts) > 1:
            raise ValueError(
                f"active adapters {adapters} of one layer have different lora_dropout values "
                f"{sorted(dropouts)}; cpeft runs them as one product and needs one probability"
            )
        if len(adapters) == 1:
            a = adapters[0]
            lora_a = self.lora_A[a].weight.flatten(1)
            lora_b = self.lora_B[a].weight.flatten(1)
            scale = self.scaling[a]
        else:
            lora_a = torch.cat([self.lora_A[a].weight.flatten(1) for a in adapters], dim=0)
            lora_b = torch.cat(
                [self.lora_B[a].weight.flatten(1) * self.scaling[a] for a in adapters], dim=1
            )
            scale = 1.0
        bias = base.bias
        lora_bias = self._bias_term(adapters)
        if lora_bias is not None:
            bias = lora_bias if bias is None else bias + lora_bias
        batched = x.dim() == self._kernel_dim
        if not batched:
            x = x.unsqueeze(0)
        if any(s != 1 for s in base.stride):
            x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in base.stride)]
        # A zero-copy view for channels-last inputs; a contiguous NC... input is transposed once.
        channels_last = x.movedim(1, -1).contiguous()
        y = _autograd.lora_linear(
            channels_last,
            base.weight.flatten(1),
            bias,
            lora_a,
            lora_b,
            scale=scale,
            fan_in_fan_out=False,
            enable_lora=None,
            dropout=dropouts.pop(),
        )
        y = y.movedim(-1, 1)
        return y if batched else y.squeeze(0)

    def _conv_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        result = base(x)
        dtype = result.dtype
        groups = base.groups
        for a in adapters:
            lora_a, lora_b = self.lora_A[a], self.lora_B[a]
            a_weight = lora_a.weight.to(dtype)
            z = lora_a._conv_forward(self.lora_dropout[a](x.to(dtype)), a_weight, None)
            b_weight = lora_b.weight.to(dtype)
            if groups == 1:
                # The 1x1 B is a matrix product over the channels, accumulated straight into the
                # base result per sample: y_n (out x S) += s · B (out x r) · z_n (r x S), one
                # batched GEMM with beta = 1 (no delta tensor, no elementwise passes).
                batched = result.dim() == self._kernel_dim
                y, zs = (result, z) if batched else (result.unsqueeze(0), z.unsqueeze(0))
                matrix_b = b_weight.flatten(1).expand(y.shape[0], -1, -1)
                result = torch.baddbmm(
                    y.flatten(2), matrix_b, zs.flatten(2), alpha=self.scaling[a]
                ).view(y.shape)
                if not batched:
                    result = result.squeeze(0)
            else:
                result = result + lora_b._conv_forward(z, b_weight, None) * self.scaling[a]
        lora_bias = self._bias_term(adapters)
        if lora_bias is not None:
            shape = (-1,) + (1,) * (self._kernel_dim - 2)
            result = result + lora_bias.to(dtype).view(shape)
        return result

    def extra_repr(self) -> str:
        return f"in_channels={self.in_features}, out_channels={self.out_features}"


class IA3Conv(IA3Layer):
    """IA3 around ``nn.Conv2d``/``nn.Conv3d`` in peft's layout (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__(
            base_layer, base_layer.in_channels, base_layer.out_channels, is_feedforward
        )
        self._kernel_dim = base_layer.weight.dim()

    def update_layer(self, adapter: str, init_ia3_weights: bool) -> None:
        weight = self.get_base_layer().weight
        channels = self.in_features if self.is_feedforward else self.out_features
        vector = weight.new_empty((1, channels) + (1,) * (self._kernel_dim - 2))
        with torch.no_grad():
            if init_ia3_weights:
                nn.init.ones_(vector)
            else:
                nn.init.normal_(vector)
        self.ia3_l[adapter] = nn.Parameter(vector)

    def _merge_targets(self):
        base = self.get_base_layer()
        targets = {"weight": base.weight.detach()}
        if base.bias is not None and not self.is_feedforward:
            targets["bias"] = base.bias.detach()
        return targets

    def _kernel_scaling(self, vector: torch.Tensor) -> torch.Tensor:
        """l broadcast against the kernel (out, in/groups, k...), as peft's merge."""
        base = self.get_base_layer()
        if not self.is_feedforward:
            return vector.transpose(0, 1)
        if base.groups == 1:
            return vector
        per_group_in = base.in_channels // base.groups
        per_group_out = base.out_channels // base.groups
        grouped = vector.reshape(base.groups, 1, per_group_in, *vector.shape[2:])
        grouped = grouped.expand(base.groups, per_group_out, per_group_in, *vector.shape[2:])
        return grouped.reshape(base.out_channels, per_group_in, *vector.shape[2:])

    def _merge_into(self, adapter, targets):
        # An elementwise scaling, not a matrix product: done by torch, with the originals kept so
        # that unmerge restores them exactly.
        originals = {name: t.clone() for name, t in targets.items()}
        vector = self.ia3_l[adapter].detach()
        weight = targets["weight"]
        weight.copy_(weight * self._kernel_scaling(vector).to(weight.dtype))
        if "bias" in targets:
            targets["bias"].copy_(targets["bias"] * vector.reshape(-1).to(targets["bias"].dtype))
        return {name: (None, original) for name, original in originals.items()}

    def _unmerge_from(self, adapter, targets, records):
        for name, (_, original) in records.items():
            targets[name].copy_(original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = _adapters_outside_mixed_batches(self)
        if not adapters:
            return self._base_forward(x)
        base = self.get_base_layer()
        dtype = _compute_dtype(x, base.weight)
        vector = self._vector(adapters).to(dtype)
        if self.is_feedforward:
            return base(x * (vector if x.dim() == self._kernel_dim else vector.squeeze(0)))
        result = base(x)
        return result * (vector if result.dim() == self._kernel_dim else vector.squeeze(0)).to(
            result.dtype
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_features}, out_channels={self.out_features}, "
            f"is_feedforward={self.is_feedforward}"
        )


class MultiheadAttention(LoraLayer):
    """LoRA around ``nn.MultiheadAttention`` with packed q/k/v, in peft's layout (see the module
    docstring). ``in_features``/``out_features`` are the embedding size and 3x it."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.MultiheadAttention):
        embed_dim = base_layer.embed_dim
        super().__init__(base_layer, embed_dim, 3 * embed_dim)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        out_proj = base_layer.out_proj
        base_layer.out_proj = Linear(
            out_proj, out_proj.in_features, out_proj.out_features, fan_in_fan_out=False
        )

    @property
    def _out_proj(self) -> Linear:
        return self.base_layer.out_proj

    def update_layer(
        self,
        adapter: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        lora_bias: bool = False,
    ) -> None:
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for MultiheadAttention")
        weight = self.get_base_layer().in_proj_weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False, **factory)
        # peft's MultiheadAttention merges its adapters into the weights for each call, so its
        # lora_dropout never applies; the module is kept for the layout.
        self.lora_dropout[adapter] = (
            nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        )
        self._set_settings(adapter, r, lora_alpha, use_rslora)
        self._out_proj.update_layer(adapter, r, lora_alpha, lora_dropout, use_rslora)

    def adapter_tensors(self, adapter: str) -> dict[str, str]:
        tensors = {
            "lora_A.weight": f"lora_A.{adapter}.weight",
            "lora_B.weight": f"lora_B.{adapter}.weight",
        }
        for suffix, local in self._out_proj.adapter_tensors(adapter).items():
            tensors[f"base_layer.out_proj.{suffix}"] = f"base_layer.out_proj.{local}"
        return tensors

    def _adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return super()._adapter_parameters(adapter) + self._out_proj._adapter_parameters(adapter)

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)
        self._out_proj.set_adapter(adapter_names, inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self._out_proj.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._out_proj.delete_adapter(adapter_name)

    def restore_base(self) -> nn.MultiheadAttention:
        """The wrapped module with its original ``out_proj`` back (for unload)."""
        base = self.get_base_layer()
        if isinstance(base.out_proj, BaseTunerLayer):
            base.out_proj = base.out_proj.get_base_layer()
        return base

    # ---- merge: in_proj here, out_proj through its own layer ------------------------------------

    def _merge_targets(self):
        return {"in_proj_weight": self.get_base_layer().in_proj_weight.detach()}

    def _adapter_pair(self, adapter: str, dtype: torch.dtype):
        return (
            self.lora_A[adapter].weight.detach().to(dtype),
            self.lora_B[adapter].weight.detach().to(dtype),
        )

    def _merge_into(self, adapter, targets):
        weight = targets["in_proj_weight"]
        record = functional.lora_merge(
            weight,
            *self._adapter_pair(adapter, weight.dtype),
            self.scaling[adapter],
            stream=_stream(weight),
        )
        return {"in_proj_weight": tuple(record)}

    def _unmerge_from(self, adapter, targets, records):
        weight = targets["in_proj_weight"]
        functional.lora_unmerge(
            weight,
            *self._adapter_pair(adapter, weight.dtype),
            self.scaling[adapter],
            functional.MergeRecord(*records["in_proj_weight"]),
            stream=_stream(weight),
        )

    def check_merge_is_finite(
        self, adapter_names: Optional[list[str]] = None, where: str = ""
    ) -> None:
        super().check_merge_is_finite(adapter_names, where)
        self._out_proj.check_merge_is_finite(
            adapter_names, where + ".out_proj" if where else "out_proj"
        )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if safe_merge:
            self.check_merge_is_finite(adapter_names)
        super().merge(adapter_names=adapter_names)
        self._out_proj.merge(adapter_names=adapter_names)

    def unmerge(self) -> None:
        super().unmerge()
        self._out_proj.unmerge()

    # ---- forward ------------------------------------------------------------------------------

    def _delta(
        self, layer: LoraLayer, adapters: list[str], dtype: torch.dtype
    ) -> Optional[torch.Tensor]:
        delta = None
        for a in adapters:
            if a not in layer.lora_A:
                continue
            part = (
                layer.lora_B[a].weight.to(dtype) @ layer.lora_A[a].weight.to(dtype)
            ) * layer.scaling[a]
            delta = part if delta is None else delta + part
        return delta

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        adapters = _adapters_outside_mixed_batches(self)
        base = self.get_base_layer()
        options = dict(
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if not adapters:
            if self.merged and self.disable_adapters:
                self.unmerge()
            return base(query, key, value, **options)
        if (
            query is key
            and key is value
            and key_padding_mask is None
            and attn_mask is None
            and not need_weights
            and not is_causal
            and base.bias_k is None
            and not base.add_zero_attn
            and query.dim() in (2, 3)
        ):
            return self._self_attention_on_core(query, adapters), None
        out_base = self._out_proj.get_base_layer()
        dtype = base.in_proj_weight.dtype
        in_weight = base.in_proj_weight + self._delta(self, adapters, dtype)
        out_delta = self._delta(self._out_proj, adapters, dtype)
        out_weight = out_base.weight if out_delta is None else out_base.weight + out_delta
        batched = query.dim() == 3
        if base.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            base.embed_dim,
            base.num_heads,
            in_weight,
            base.in_proj_bias,
            base.bias_k,
            base.bias_v,
            base.add_zero_attn,
            base.dropout,
            out_weight,
            out_base.bias,
            training=self.training,
            **options,
        )
        if base.batch_first and batched:
            output = output.transpose(1, 0)
        return output, weights

    def _self_attention_on_core(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """Unmasked self-attention without attention weights (the common case): the packed q/k/v
        projection and out_proj, adapters included, are each one cpeft LoRA-linear call (no dense
        ΔW per call), and the attention itself is torch's scaled_dot_product_attention. peft's
        lora_dropout does not apply to attention layers, so none is applied here either."""
        base = self.get_base_layer()
        out_base = self._out_proj.get_base_layer()
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1 if not base.batch_first else 0)
        if not base.batch_first:
            x = x.transpose(0, 1)
        batch, length, embed = x.shape
        heads = base.num_heads
        qkv = _lora_projection(self, adapters, x, base.in_proj_weight, base.in_proj_bias)
        q, k, v = (
            t.reshape(batch, length, heads, embed // heads).transpose(1, 2)
            for t in qkv.chunk(3, dim=-1)
        )
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=base.dropout if self.training else 0.0
        )
        attended = attended.transpose(1, 2).reshape(batch, length, embed)
        out_adapters = [a for a in adapters if a in self._out_proj.lora_A]
        if out_adapters:
            out = _lora_projection(
                self._out_proj, out_adapters, attended, out_base.weight, out_base.bias
            )
        else:
            out = F.linear(attended, out_base.weight, out_base.bias)
        if not base.batch_first:
            out = out.transpose(0, 1)
        return out if batched else out.squeeze(1 if not base.batch_first else 0)

    def extra_repr(self) -> str:
        return f"embed_dim={self.in_features}"


def _lora_projection(
    layer: LoraLayer,
    adapters: list[str],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """x·Wᵀ + b + Σ scaling·(x·Aᵀ)·Bᵀ over ``adapters`` as one core call (several adapters are
    stacked along the rank, each B pre-scaled)."""
    if len(adapters) == 1:
        a = adapters[0]
        lora_a, lora_b, scale = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
    else:
        lora_a = torch.cat([layer.lora_A[a].weight for a in adapters], dim=0)
        lora_b = torch.cat([layer.lora_B[a].weight * layer.scaling[a] for a in adapters], dim=1)
        scale = 1.0
    return _autograd.lora_linear(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scale=scale,
        fan_in_fan_out=False,
        enable_lora=None,
        dropout=0.0,
    )
