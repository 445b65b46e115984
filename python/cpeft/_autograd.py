"""One torch.autograd.Function per layer kind, each calling the C core through cpeft.functional.

Tensors cross into C as DLPack capsules made by torch's C exporter (``to_dlpack``: no copy).
Handing the tensors themselves would make the boundary call torch's Python-level
``__dlpack__`` and ``__dlpack_device__``, about 8 µs per tensor, which at M=16 was more than the
arithmetic of the whole call. Outputs and gradients are allocated by torch (``torch.empty``) and
handed over as ``out=`` / ``grad_*=``, so torch's caching allocator owns every byte. CUDA work is
queued on torch's current stream of the input's device, the stream every operand was produced
on, so no producer/consumer synchronization is needed. Each backward computes only the
gradients listed in ``ctx.needs_input_grad``.

Dtype rule (shared by every layer, see docs/loralib-differences.md): torch's own.
  * a linear layer's input must have the dtype of its frozen weight, as for ``F.linear``; under
    autocast both first become the autocast dtype where autocast would cast them (floating
    point, not float64). Anything else raises torch's RuntimeError ("mat1 and mat2 must have the
    same dtype ..."): nothing is cast silently. The output has that compute dtype;
  * embedding indices must be int64 or int32 (torch's RuntimeError otherwise); the output has
    the weight's dtype (autocast leaves embeddings alone);
  * adapters and bias, the layer's own parameters, are cast to the compute dtype with
    differentiable ``.to`` (a no-op when they already match), so each gradient comes back in its
    parameter's own dtype;
  * the CPU core only has float32/float64 kernels, so on the CPU float16/bfloat16 operands are
    upcast to float32 for the call and the result is rounded back to the compute dtype. This
    costs a float32 copy of the weight per call: correct, but not the fast path.
  * one exception for LoRA linear on CUDA: float32 adapters (peft's autocast_adapter_dtype) with
    a float16/bfloat16 compute dtype are handed to the core as they are. The core runs the
    rank-r products on 16-bit copies of A and B with fp32 accumulation and writes their
    gradients in float32; x is never widened (peft casts x to float32). On the CPU the float32
    adapters need no cast either, since the call already computes in float32 there.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.utils.dlpack import to_dlpack

from . import functional

_CPU_CORE_DTYPES = (torch.float32, torch.float64)
# Compute dtypes with which the CUDA core takes float32 LoRA adapters as they are.
_FP32_ADAPTER_DTYPES = (torch.float16, torch.bfloat16)

# Seeds are drawn from torch's CPU generator so torch.manual_seed reproduces dropout masks and
# activation checkpointing (which restores the CPU RNG state) recomputes the same mask.
_SEED_BOUND = 2**62


def cuda_stream(device: torch.device) -> Optional[int]:
    """The raw handle of torch's current stream on ``device``; None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return None


def _torch_type_name(dtype: torch.dtype) -> str:
    """The scalar type name torch's own messages use ("Float", "Long", "BFloat16")."""
    return torch.empty((), dtype=dtype).type().rpartition(".")[2].removesuffix("Tensor")


def _autocast_casts(dtype: torch.dtype) -> bool:
    """Whether autocast casts an operand of ``dtype`` for a lower-precision op such as
    ``F.linear``: floating point other than float64."""
    return dtype.is_floating_point and dtype != torch.float64


def compute_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype ``F.linear(x, weight)`` computes in, or torch's RuntimeError where it raises."""
    if torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        x_dtype = autocast_dtype if _autocast_casts(x_dtype) else x_dtype
        weight_dtype = autocast_dtype if _autocast_casts(weight_dtype) else weight_dtype
    if x_dtype != weight_dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got "
                           f"{_torch_type_name(x_dtype)} and {_torch_type_name(weight_dtype)}")
    return x_dtype


def core_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the C core computes in for ``dtype`` on this device type."""
    if device_type == "cpu" and dtype not in _CPU_CORE_DTYPES:
        return torch.float32
    return dtype


def draw_dropout_seed() -> int:
    return int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64))


def _dl(t: Optional[torch.Tensor]):
    """A DLPack capsule aliasing ``t`` (consumed by exactly one C call), or None."""
    return None if t is None else to_dlpack(t)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Differentiable cast; the dtype test first keeps the common no-cast path free of a
    dispatcher round trip (this runs five times per layer call)."""
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    """Uninitialized, contiguous, like's dtype and device. (new_empty with a plain tuple is
    torch's cheapest allocation call; these run up to six times per layer step.)"""
    return like.new_empty(tuple(shape))


def _grad_buffer(needed: bool, like: torch.Tensor) -> Optional[torch.Tensor]:
    if not needed:
        return None
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _dl_or_false(t: Optional[torch.Tensor]):
    """A gradient output for the C call: a capsule to write into, or False (not requested)."""
    return False if t is None else to_dlpack(t)


class LoraLinearSettings(NamedTuple):
    scale: float
    fan_in_fan_out: bool
    enable_lora: Optional[Sequence[bool]]
    dropout: float
    seed: int


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ (grouped for MergedLinear); keeps x and xa = drop(x)·Aᵀ."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, settings: LoraLinearSettings):
        out_features = weight.shape[1] if settings.fan_in_fan_out else weight.shape[0]
        y = _empty(x.shape[:-1] + (out_features,), x)
        xa = _empty(x.shape[:-1] + (lora_a.shape[0],), x)
        functional.lora_linear_forward(
            _dl(x), _dl(weight), _dl(bias), _dl(lora_a), _dl(lora_b), settings.scale,
            fan_in_fan_out=settings.fan_in_fan_out, enable_lora=settings.enable_lora,
            dropout=settings.dropout, seed=settings.seed, offset=0, out=_dl(y),
            out_xa=_dl(xa), stream=cuda_stream(x.device))
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        settings = ctx.settings
        need_bias = need_bias and ctx.has_bias
        grad_x, grad_weight = _grad_buffer(need_x, x), _grad_buffer(need_weight, weight)
        grad_a, grad_b = _grad_buffer(need_a, lora_a), _grad_buffer(need_b, lora_b)
        grad_bias = _empty(grad_out.shape[-1:], grad_out) if need_bias else None
        functional.lora_linear_backward(
            _dl(grad_out), _dl(x), _dl(weight), _dl(lora_a), _dl(lora_b), _dl(xa),
            settings.scale, fan_in_fan_out=settings.fan_in_fan_out,
            enable_lora=settings.enable_lora, dropout=settings.dropout, seed=settings.seed,
            offset=0, grad_x=_dl_or_false(grad_x), grad_lora_a=_dl_or_false(grad_a),
            grad_lora_b=_dl_or_false(grad_b), grad_bias=_dl_or_false(grad_bias),
            grad_weight=_dl_or_false(grad_weight), stream=cuda_stream(grad_out.device))
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_a, lora_b, *, scale, fan_in_fan_out, enable_lora,
                dropout):
    """Applies LoraLinearFunction under the module-wide dtype rule; returns the compute dtype."""
    device_type = x.device.type
    dtype = compute_dtype(x.dtype, weight.dtype, device_type)
    kernel_dtype = core_dtype(dtype, device_type)
    adapter_dtype = (torch.float32 if kernel_dtype in _FP32_ADAPTER_DTYPES
                     and lora_a.dtype == torch.float32 and lora_b.dtype == torch.float32
                     else kernel_dtype)
    seed = draw_dropout_seed() if dropout > 0.0 else 0
    settings = LoraLinearSettings(float(scale), bool(fan_in_fan_out), enable_lora,
                                  float(dropout), seed)
    y = LoraLinearFunction.apply(
        _cast(x, kernel_dtype), _cast(weight, kernel_dtype), _cast(bias, kernel_dtype),
        _cast(lora_a, adapter_dtype), _cast(lora_b, adapter_dtype), settings)
    return _cast(y, dtype)


class LoraEmbeddingSettings(NamedTuple):
    scale: float
    padding_idx: Optional[int]


class LoraEmbeddingFunction(torch.autograd.Function):
    """y[n] = W[idx[n]] + s·Aᵀ[idx[n]]·Bᵀ, gathering rows; nothing of vocabulary size per call."""

    @staticmethod
    def forward(ctx, indices, weight, lora_a, lora_b, settings: LoraEmbeddingSettings):
        y = _empty(indices.shape + (weight.shape[1],), weight)
        functional.lora_embedding_forward(
            _dl(indices), _dl(weight), _dl(lora_a), _dl(lora_b), settings.scale,
            padding_idx=settings.padding_idx, out=_dl(y), stream=cuda_stream(weight.device))
        ctx.save_for_backward(indices, lora_a, lora_b)
        ctx.settings = settings
        ctx.weight_meta = (weight.shape, weight.dtype, weight.device)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        indices, lora_a, lora_b = ctx.saved_tensors
        _, need_weight, need_a, need_b = ctx.needs_input_grad[:4]
        weight_shape, weight_dtype, weight_device = ctx.weight_meta
        grad_weight = (torch.empty(weight_shape, dtype=weight_dtype, device=weight_device)
                       if need_weight else None)
        grad_a, grad_b = _grad_buffer(need_a, lora_a), _grad_buffer(need_b, lora_b)
        functional.lora_embedding_backward(
            _dl(grad_out), _dl(indices), _dl(lora_a), _dl(lora_b), ctx.settings.scale,
            padding_idx=ctx.settings.padding_idx, grad_lora_a=_dl_or_false(grad_a),
            grad_lora_b=_dl_or_false(grad_b), grad_weight=_dl_or_false(grad_weight),
            stream=cuda_stream(grad_out.device))
        return None, grad_weight, grad_a, grad_b, None


def _check_indices(indices: torch.Tensor) -> torch.Tensor:
    """torch's rule for embedding indices: int64 or int32, never a cast (1.7 is not row 1)."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise RuntimeError("Expected tensor for argument #1 'indices' to have one of the following "
                           f"scalar types: Long, Int; but got {indices.type()} instead (while "
                           "checking arguments for embedding)")
    return indices


def lora_embedding(indices, weight, lora_a, lora_b, *, scale, padding_idx):
    """Embedding lookups follow torch: the output has the weight's dtype (autocast leaves
    embeddings alone), adapters are cast to it."""
    dtype = weight.dtype
    kernel_dtype = core_dtype(dtype, weight.device.type)
    y = LoraEmbeddingFunction.apply(
        _check_indices(indices), _cast(weight, kernel_dtype), _cast(lora_a, kernel_dtype),
        _cast(lora_b, kernel_dtype), LoraEmbeddingSettings(float(scale), padding_idx))
    return _cast(y, dtype)


class IA3LinearSettings(NamedTuple):
    feedforward: bool
    fan_in_fan_out: bool


class IA3LinearFunction(torch.autograd.Function):
    """Output scaling y = (x·Wᵀ + b) ⊙ l, or input scaling y = (x ⊙ l)·Wᵀ + b (feedforward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ia3_l, settings: IA3LinearSettings):
        out_features = weight.shape[1] if settings.fan_in_fan_out else weight.shape[0]
        y = _empty(x.shape[:-1] + (out_features,), x)
        # base = x·Wᵀ + b is kept only when l needs a gradient with output scaling: recomputing
        # it in backward would cost a full GEMM.
        keep_base = ctx.needs_input_grad[3] and not settings.feedforward
        base = _empty(y.shape, y) if keep_base else None
        functional.ia3_linear_forward(
            _dl(x), _dl(weight), _dl(bias), _dl(ia3_l), feedforward=settings.feedforward,
            fan_in_fan_out=settings.fan_in_fan_out, keep_base=keep_base, out=_dl(y),
            out_base=_dl(base), stream=cuda_stream(x.device))
        ctx.save_for_backward(x, weight, ia3_l, base)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, ia3_l, base = ctx.saved_tensors
        need_x, need_weight, need_bias, need_l = ctx.needs_input_grad[:4]
        settings = ctx.settings
        need_bias = need_bias and ctx.has_bias
        grad_x, grad_weight = _grad_buffer(need_x, x), _grad_buffer(need_weight, weight)
        grad_l = _grad_buffer(need_l, ia3_l)
        grad_bias = _empty(grad_out.shape[-1:], grad_out) if need_bias else None
        functional.ia3_linear_backward(
            _dl(grad_out), _dl(x), _dl(weight), _dl(ia3_l), _dl(base),
            feedforward=settings.feedforward, fan_in_fan_out=settings.fan_in_fan_out,
            grad_x=_dl_or_false(grad_x), grad_ia3_l=_dl_or_false(grad_l),
            grad_bias=_dl_or_false(grad_bias), grad_weight=_dl_or_false(grad_weight),
            stream=cuda_stream(grad_out.device))
        return grad_x, grad_weight, grad_bias, grad_l, None


def ia3_linear(x, weight, bias, ia3_l, *, feedforward, fan_in_fan_out):
    device_type = x.device.type
    dtype = compute_dtype(x.dtype, weight.dtype, device_type)
    kernel_dtype = core_dtype(dtype, device_type)
    y = IA3LinearFunction.apply(
        _cast(x, kernel_dtype), _cast(weight, kernel_dtype), _cast(bias, kernel_dtype),
        _cast(ia3_l, kernel_dtype), IA3LinearSettings(bool(feedforward), bool(fan_in_fan_out)))
    return _cast(y, dtype)


class IA3EmbeddingFunction(torch.autograd.Function):
    """y[n] = W[idx[n]] ⊙ l."""

    @staticmethod
    def forward(ctx, indices, weight, ia3_l, padding_idx: Optional[int]):
        y = _empty(indices.shape + (weight.shape[1],), weight)
        functional.ia3_embedding_forward(_dl(indices), _dl(weight), _dl(ia3_l), out=_dl(y),
                                         stream=cuda_stream(weight.device))
        ctx.save_for_backward(indices, weight, ia3_l)
        ctx.padding_idx = padding_idx
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        indices, weight, ia3_l = ctx.saved_tensors
        _, need_weight, need_l = ctx.needs_input_grad[:3]
        grad_weight, grad_l = _grad_buffer(need_weight, weight), _grad_buffer(need_l, ia3_l)
        functional.ia3_embedding_backward(
            _dl(grad_out), _dl(indices), _dl(weight), _dl(ia3_l), padding_idx=ctx.padding_idx,
            grad_ia3_l=_dl_or_false(grad_l), grad_weight=_dl_or_false(grad_weight),
            stream=cuda_stream(grad_out.device))
        return None, grad_weight, grad_l, None


def ia3_embedding(indices, weight, ia3_l, *, padding_idx):
    dtype = weight.dtype
    kernel_dtype = core_dtype(dtype, weight.device.type)
    y = IA3EmbeddingFunction.apply(_check_indices(indices), _cast(weight, kernel_dtype),
                                   _cast(ia3_l, kernel_dtype), padding_idx)
    return _cast(y, dtype)


class WeightSqNormCache:
    """‖w_j‖² of a frozen weight, the part of DoRA's row norms that only changes with W.

    Keyed on the weight's version counter (bumped by every in-place write through autograd's
    view of the tensor: optimizers, ``torch.no_grad()`` updates, ``load_state_dict``, cpeft's
    merges), its storage pointer (``weight.data = ...`` replaces it), and the dtype and layout
    the core sees. Writes through ``weight.data.<op>_()`` bypass the version counter and are
    not seen; call ``clear()`` after such a write."""

    def __init__(self):
        self._key = None
        self._value: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self._key = self._value = None

    def get(self, weight: torch.Tensor, kernel_weight: torch.Tensor, fan_in_fan_out: bool):
        key = (weight._version, weight.data_ptr(), weight.device, kernel_weight.dtype,
               tuple(weight.shape), weight.stride(), bool(fan_in_fan_out))
        if key != self._key:
            value = kernel_weight.new_empty(
                (kernel_weight.shape[1] if fan_in_fan_out else kernel_weight.shape[0],))
            functional.dora_weight_sq_norm(_dl(kernel_weight.detach()),
                                           fan_in_fan_out=fan_in_fan_out, out=_dl(value),
                                           stream=cuda_stream(weight.device))
            self._key, self._value = key, value
        return self._value


class DoraLinearSettings(NamedTuple):
    scale: float
    fan_in_fan_out: bool
    dropout: float
    seed: int


def _refuse_weight_grad(weight: torch.Tensor, layer: str) -> None:
    if weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{layer} with DoRA keeps the base weight frozen (peft trains lora_A, lora_B and "
            "lora_magnitude_vector); got a weight with requires_grad=True")


class DoraLinearFunction(torch.autograd.Function):
    """peft's DoRA linear (cpeft/dora.h): y = c ⊙ (x·Wᵀ + s·xa·Bᵀ) + b, c = m / ‖W + s·B·A‖
    (the norm a constant for backward), or with dropout peft's training formula. Keeps x, xa,
    the norm (OUT,) and, when the magnitude needs a gradient, base = drop(x)·Wᵀ + s·xa·Bᵀ, the
    one output-sized tensor DoRA adds to LoRA's."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, weight_sq_norm,
                settings: DoraLinearSettings):
        out_features = weight.shape[1] if settings.fan_in_fan_out else weight.shape[0]
        y = _empty(x.shape[:-1] + (out_features,), x)
        xa = _empty(x.shape[:-1] + (lora_a.shape[0],), x)
        norm = _empty((out_features,), x)
        base = _empty(y.shape, y) if ctx.needs_input_grad[5] else None
        functional.dora_linear_forward(
            _dl(x), _dl(weight), _dl(bias), _dl(lora_a), _dl(lora_b), _dl(magnitude),
            settings.scale, fan_in_fan_out=settings.fan_in_fan_out, dropout=settings.dropout,
            seed=settings.seed, weight_sq_norm=_dl(weight_sq_norm), out=_dl(y), out_xa=_dl(xa),
            out_base=_dl(base), out_norm=_dl(norm), stream=cuda_stream(x.device))
        ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, norm, xa, base)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, magnitude, norm, xa, base = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        settings = ctx.settings
        need_bias = need_bias and ctx.has_bias
        grad_x, grad_a = _grad_buffer(need_x, x), _grad_buffer(need_a, lora_a)
        grad_b, grad_m = _grad_buffer(need_b, lora_b), _grad_buffer(need_m, magnitude)
        grad_bias = _empty(grad_out.shape[-1:], grad_out) if need_bias else None
        functional.dora_linear_backward(
            _dl(grad_out), _dl(x), _dl(weight), _dl(lora_a), _dl(lora_b), _dl(magnitude),
            _dl(norm), _dl(xa), _dl(base), settings.scale,
            fan_in_fan_out=settings.fan_in_fan_out, dropout=settings.dropout,
            seed=settings.seed, grad_x=_dl_or_false(grad_x), grad_lora_a=_dl_or_false(grad_a),
            grad_lora_b=_dl_or_false(grad_b), grad_magnitude=_dl_or_false(grad_m),
            grad_bias=_dl_or_false(grad_bias), stream=cuda_stream(grad_out.device))
        return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None, None


def dora_linear(x, weight, bias, lora_a, lora_b, magnitude, *, scale, fan_in_fan_out, dropout,
                sq_norm_cache: Optional[WeightSqNormCache] = None, layer: str = "Linear"):
    """Applies DoraLinearFunction under the module-wide dtype rule; returns the compute dtype."""
    _refuse_weight_grad(weight, layer)
    device_type = x.device.type
    dtype = compute_dtype(x.dtype, weight.dtype, device_type)
    kernel_dtype = core_dtype(dtype, device_type)
    seed = draw_dropout_seed() if dropout > 0.0 else 0
    kernel_weight = _cast(weight, kernel_dtype)
    sq_norm = (sq_norm_cache.get(weight, kernel_weight, fan_in_fan_out)
               if sq_norm_cache is not None else None)
    settings = DoraLinearSettings(float(scale), bool(fan_in_fan_out), float(dropout), seed)
    y = DoraLinearFunction.apply(
        _cast(x, kernel_dtype), kernel_weight, _cast(bias, kernel_dtype),
        _cast(lora_a, kernel_dtype), _cast(lora_b, kernel_dtype),
        _cast(magnitude, kernel_dtype), sq_norm, settings)
    return _cast(y, dtype)


class DoraEmbeddingFunction(torch.autograd.Function):
    """peft's DoRA embedding: y[n] = c ⊙ (W[idx[n]] + s·Aᵀ[idx[n]]·Bᵀ), c = m / n with n normed
    over the vocabulary; keeps the indices and the norm (D,), nothing output-sized."""

    @staticmethod
    def forward(ctx, indices, weight, lora_a, lora_b, magnitude, weight_sq_norm,
                settings: LoraEmbeddingSettings):
        y = _empty(indices.shape + (weight.shape[1],), weight)
        norm = _empty((weight.shape[1],), weight)
        functional.dora_embedding_forward(
            _dl(indices), _dl(weight), _dl(lora_a), _dl(lora_b), _dl(magnitude), settings.scale,
            weight_sq_norm=_dl(weight_sq_norm), out=_dl(y), out_norm=_dl(norm),
            stream=cuda_stream(weight.device))
        ctx.save_for_backward(indices, weight, lora_a, lora_b, magnitude, norm)
        ctx.settings = settings
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        indices, weight, lora_a, lora_b, magnitude, norm = ctx.saved_tensors
        need_a, need_b, need_m = ctx.needs_input_grad[2:5]
        grad_a, grad_b = _grad_buffer(need_a, lora_a), _grad_buffer(need_b, lora_b)
        grad_m = _grad_buffer(need_m, magnitude)
        functional.dora_embedding_backward(
            _dl(grad_out), _dl(indices), _dl(weight), _dl(lora_a), _dl(lora_b), _dl(magnitude),
            _dl(norm), ctx.settings.scale, padding_idx=ctx.settings.padding_idx,
            grad_lora_a=_dl_or_false(grad_a), grad_lora_b=_dl_or_false(grad_b),
            grad_magnitude=_dl_or_false(grad_m), stream=cuda_stream(grad_out.device))
        return None, None, grad_a, grad_b, grad_m, None, None


def dora_embedding(indices, weight, lora_a, lora_b, magnitude, *, scale, padding_idx,
                   sq_norm_cache: Optional[WeightSqNormCache] = None):
    """As lora_embedding: the output has the weight's dtype, the adapters are cast to it."""
    _refuse_weight_grad(weight, "Embedding")
    dtype = weight.dtype
    kernel_dtype = core_dtype(dtype, weight.device.type)
    kernel_weight = _cast(weight, kernel_dtype)
    sq_norm = (sq_norm_cache.get(weight, kernel_weight, True)
               if sq_norm_cache is not None else None)
    y = DoraEmbeddingFunction.apply(
        _check_indices(indices), kernel_weight, _cast(lora_a, kernel_dtype),
        _cast(lora_b, kernel_dtype), _cast(magnitude, kernel_dtype), sq_norm,
        LoraEmbeddingSettings(float(scale), padding_idx))
    return _cast(y, dtype)


class LoraGroupedSettings(NamedTuple):
    ranks: tuple
    scales: tuple
    fan_in_fan_out: bool
    dropout: float
    seed: int


class LoraGroupedFunction(torch.autograd.Function):
    """Mixed-adapter LoRA linear: row m uses adapter index[m] (-1: none) of the packed
    adapters; keeps x and xa (M x max rank), so several adapters train in one batch."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, index, settings: LoraGroupedSettings):
        out_features = weight.shape[1] if settings.fan_in_fan_out else weight.shape[0]
        y = _empty(x.shape[:-1] + (out_features,), x)
        xa = _empty(x.shape[:-1] + (max(settings.ranks),), x)
        functional.lora_grouped_forward(
            _dl(x), _dl(weight), _dl(bias), _dl(lora_a), _dl(lora_b), _dl(index),
            settings.ranks, settings.scales, fan_in_fan_out=settings.fan_in_fan_out,
            dropout=settings.dropout, seed=settings.seed, offset=0, out=_dl(y), out_xa=_dl(xa),
            stream=cuda_stream(x.device))
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, index)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, xa, index = ctx.saved_tensors
        need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        settings = ctx.settings
        need_bias = need_bias and ctx.has_bias
        grad_x, grad_weight = _grad_buffer(need_x, x), _grad_buffer(need_weight, weight)
        grad_a, grad_b = _grad_buffer(need_a, lora_a), _grad_buffer(need_b, lora_b)
        grad_bias = _empty(grad_out.shape[-1:], grad_out) if need_bias else None
        functional.lora_grouped_backward(
            _dl(grad_out.contiguous()), _dl(x), _dl(weight), _dl(lora_a), _dl(lora_b), _dl(xa),
            _dl(index), settings.ranks, settings.scales, fan_in_fan_out=settings.fan_in_fan_out,
            dropout=settings.dropout, seed=settings.seed, offset=0,
            grad_x=_dl_or_false(grad_x), grad_lora_a=_dl_or_false(grad_a),
            grad_lora_b=_dl_or_false(grad_b), grad_bias=_dl_or_false(grad_bias),
            grad_weight=_dl_or_false(grad_weight), stream=cuda_stream(grad_out.device))
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None


def lora_grouped(x, weight, bias, lora_a, lora_b, index, *, ranks, scales, fan_in_fan_out,
                 dropout):
    """Applies LoraGroupedFunction under the module-wide dtype rule. lora_a (ΣR, IN) and lora_b
    (OUT, ΣR) are the adapters packed (torch.cat keeps each adapter's gradient path); index is
    an int64 tensor with one entry per row of x."""
    device_type = x.device.type
    dtype = compute_dtype(x.dtype, weight.dtype, device_type)
    kernel_dtype = core_dtype(dtype, device_type)
    seed = draw_dropout_seed() if dropout > 0.0 else 0
    settings = LoraGroupedSettings(tuple(int(r) for r in ranks), tuple(float(s) for s in scales),
                                   bool(fan_in_fan_out), float(dropout), seed)
    y = LoraGroupedFunction.apply(
        _cast(x, kernel_dtype), _cast(weight, kernel_dtype), _cast(bias, kernel_dtype),
        _cast(lora_a, kernel_dtype), _cast(lora_b, kernel_dtype), index, settings)
    return _cast(y, dtype)
