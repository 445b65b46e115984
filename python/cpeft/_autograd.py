"""The layers' ops: each one a forward and a backward kernel calling the C core, reached
through a ``torch.autograd.Function`` in eager mode and through a ``torch.library`` custom op
under ``torch.compile``.

The pattern (every op here follows it; a new op copies it):

  1. ``_<op>_fwd(...)`` and ``_<op>_bwd(..., needs)``: plain functions of tensors and Python
     scalars (float, int, bool, bool lists) that allocate their results with torch
     (``new_empty``: torch's caching allocator owns every byte, "callers own memory" holds) and
     make exactly one ``_C`` call each, with pre-resolved arguments: the tensors themselves,
     which the boundary exports through torch's DLPack C exchange API (no Python call and no
     capsule, about 0.1 µs per tensor where ``to_dlpack`` costs about 0.4 µs and ``__dlpack__``
     about 5 µs), the raw handle of torch's current stream (None on the CPU), no validation that
     C repeats.
     The backward computes only the gradients in ``needs`` and returns None for the others.
  2. ``<Op>Function`` (``torch.autograd.Function``): the eager path, the cheapest per call,
     entered through ``_<op>_apply = _eager_apply(<Op>Function)`` (the C apply without
     ``Function.apply``'s Python wrapper, whose functorch handling it keeps). LoRA linear, the
     hottest path, has the same apply written out for its six arguments
     (``_lora_linear_eager_apply``), and on the CPU is first offered to the C++ autograd node of
     ``cpeft._torch_node`` (csrc/torch/lora_linear_node.cpp; the same kernels, no Python in the
     node), which takes calls whose operands the core reads as they are and returns None for
     the rest.
  3. ``cpeft::<op>`` and ``cpeft::<op>_backward`` (``torch.library.custom_op``) over the same
     kernels, with ``register_fake`` (output shapes only) and ``register_autograd`` (the
     backward calls the backward op, so AOTAutograd traces it too). Schemas take Tensor, float,
     int, bool and ``bool[]?``; a dropout seed is a CPU int64 scalar tensor drawn outside the
     op, so a compiled graph draws a fresh one per step; a backward op returns only the
     requested gradients (a list), as schemas have no optional outputs.
  4. ``<op>(...)``: the helper the layers call. It applies the dtype rule below, then takes the
     custom op when ``torch.compiler.is_compiling()`` (Dynamo constant-folds the test, so the
     graph holds one opaque node per layer and never breaks) and the Function otherwise.

Strides: the CPU boundary copies an input that has no BLAS-able 2-D view itself. On CUDA it
never copies (device memory is the caller's), so ``_cuda_view`` makes the one copy cuBLAS needs
before the call, with torch's allocator: an expanded gradient (stride 0, what ``y.sum()`` or
``y.mean()`` hands the backward) or a strided slice becomes contiguous; contiguous tensors and
transposed matrices (``fan_in_fan_out`` weights) pass as views. CUDA work is queued on torch's
current stream of the tensors' device, the stream every operand was produced on, so no
producer/consumer synchronization is needed; nothing here synchronizes or allocates outside
torch, so the ops can be captured in a CUDA graph. Each backward computes only the gradients
autograd asks for (``ctx.needs_input_grad``).

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

import functools
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _C, functional
from .functional import _out_features

if not hasattr(torch.Tensor, "__dlpack_c_exchange_api__"):
    # Without it every tensor would cross through Tensor.__dlpack__, about 5 µs each, which also
    # refuses tensors that require grad.
    raise ImportError(
        f"cpeft's torch layers need torch >= 2.10 (the DLPack C exchange API, "
        f"torch.Tensor.__dlpack_c_exchange_api__); this is torch {torch.__version__}"
    )

# The float dtypes the core's kernels take, per device type, as the C boundary checks them.
_CORE_DTYPES = {
    device_type: frozenset(getattr(torch, name) for name in names)
    for device_type, names in _C.supported_dtypes().items()
}
_ANY_CORE_DTYPE = frozenset().union(*_CORE_DTYPES.values())
# Compute dtypes with which the CUDA core takes float32 LoRA adapters as they are, as the C
# boundary checks them.
_FP32_ADAPTER_DTYPES = tuple(getattr(torch, name) for name in _C.fp32_adapter_compute_dtypes())

# Seeds are drawn from torch's CPU generator so torch.manual_seed reproduces dropout masks and
# activation checkpointing (which restores the CPU RNG state) recomputes the same mask.
_SEED_BOUND = 2**62

# torch's C getter of the current stream's raw handle (CUDA builds of torch only): about 0.2 µs,
# where torch.cuda.current_stream(device).cuda_stream builds a Python Stream object per call.
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def cuda_stream(device: torch.device) -> Optional[int]:
    """The raw handle of torch's current stream on ``device``; None on the CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _current_raw_stream is not None:
        return _current_raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def _stream_of(t: Tensor) -> Optional[int]:
    """cuda_stream of t's device; ``is_cuda`` first spares the CPU path a torch.device object."""
    return cuda_stream(t.device) if t.is_cuda else None


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
        raise RuntimeError(
            f"mat1 and mat2 must have the same dtype, but got "
            f"{_torch_type_name(x_dtype)} and {_torch_type_name(weight_dtype)}"
        )
    return x_dtype


def core_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the C core computes in for ``dtype`` on this device type: float32 for a dtype
    the core has kernels for on another device only (float16 and bfloat16 on the CPU), else
    ``dtype`` itself (anything the core has no kernels for at all is left for C to refuse)."""
    if dtype in _CORE_DTYPES.get(device_type, _ANY_CORE_DTYPE) or dtype not in _ANY_CORE_DTYPE:
        return dtype
    return torch.float32


def draw_dropout_seed() -> int:
    return int(_draw_seed_tensor())


def _draw_seed_tensor() -> torch.Tensor:
    """The seed as a CPU int64 scalar: what a compiled graph passes to an op (``int()`` of a
    tensor would break the graph)."""
    return torch.randint(0, _SEED_BOUND, (), dtype=torch.int64)


def _out_or_false(t: Optional[Tensor]):
    """A gradient output for the C call: the tensor to write into, or False (not requested)."""
    return False if t is None else t


def _cuda_view(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` as the CUDA boundary can take it: contiguous tensors and transposed matrices pass as
    views; anything else (stride 0 of an expanded gradient, a strided slice, leading dims that do
    not collapse) is the one copy cuBLAS needs, made here because the CUDA boundary never
    copies device memory itself."""
    if t is None or t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous()):
        return t
    return t.contiguous()


def _first_order(backward):
    """``once_differentiable`` only where it matters: its ``no_grad`` block and input scan cost
    about 10 µs per backward, and grad mode is already off in a backward unless the caller
    asked for ``create_graph=True``, where its delayed error on double backward is kept."""
    delayed = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return delayed(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


# The torch internals behind Function.apply; a torch without them gets Function.apply itself.
_function_apply = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)


def _eager_apply(function):
    """``function.apply`` without its Python wrapper where that wrapper changes nothing. The
    wrapper binds default arguments (these Functions have none and no setup_context), routes to
    functorch when a transform is active (kept: the full ``apply`` then) and unwraps tensors left
    over from a finished transform (kept: ``unwrap_if_dead`` on each tensor). What it costs
    besides, about 4 µs per call, is a large part of the Python time of a small layer step."""
    if None in (_function_apply, _functorch_transforms_active, _unwrap_if_dead):
        return function.apply
    apply_node = _function_apply.__get__(None, function)

    def apply(*args):
        if _functorch_transforms_active():
            return function.apply(*args)
        return apply_node(*[_unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])

    return apply


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Differentiable cast; the dtype test first keeps the common no-cast path free of a
    dispatcher round trip (this runs five times per layer call)."""
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _empty(shape, like: Tensor) -> Tensor:
    """Uninitialized, contiguous, like's dtype and device. Sizes go to ``new_empty`` as separate
    ints, its cheapest form: a tuple is first tried as one int and a TypeError is built and
    dropped, about 1 µs per allocation. A 0-d shape has no ints to pass."""
    return like.new_empty(*shape) if len(shape) else like.new_empty(())


def _new(like: Tensor, needed: bool, shape) -> Optional[Tensor]:
    """``_empty`` where needed, else None."""
    return _empty(shape, like) if needed else None


def _grad_buffer(needed: bool, like: Tensor) -> Optional[Tensor]:
    return _empty(like.shape, like) if needed else None


def _seed_value(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


def _requested(grads, needs) -> List[Tensor]:
    """A backward op's result: the requested gradients only, in order."""
    return [g for g, need in zip(grads, needs) if need]


def _spread(grads: List[Tensor], needs) -> list:
    """The inverse of ``_requested``: None in the places not requested."""
    it = iter(grads)
    return [next(it) if need else None for need in needs]


def _bool_list(values: Optional[Sequence[bool]]) -> Optional[List[bool]]:
    return None if values is None else [bool(v) for v in values]


# ---- LoRA linear -----------------------------------------------------------------------------


def _lora_linear_fwd(
    x, weight, bias, lora_a, lora_b, scale, fan_in_fan_out, enable_lora, dropout, seed
):
    """(y, xa) with xa = drop(x)·Aᵀ kept for backward."""
    # This and _lora_linear_bwd are the per-call path of every LoRA linear layer: the helpers
    # (_stream_of, _new, _out_or_false) are written out inline, each call of them costing
    # more than the work it wraps.
    stream = cuda_stream(x.device) if x.is_cuda else None
    if stream is not None:
        x, weight, bias = _cuda_view(x), _cuda_view(weight), _cuda_view(bias)
        lora_a, lora_b = _cuda_view(lora_a), _cuda_view(lora_b)
    out_features = _out_features(weight, fan_in_fan_out)
    if x.dim() == 2:
        # Sized from ints: slicing x.shape and unpacking it costs about 0.5 µs per output.
        rows = x.shape[0]
        y = x.new_empty(rows, out_features)
        xa = x.new_empty(rows, lora_a.shape[0])
    else:
        lead = x.shape[:-1]
        y = x.new_empty(*lead, out_features)
        xa = x.new_empty(*lead, lora_a.shape[0])
    _C.lora_linear_forward(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        enable_lora=enable_lora,
        dropout=dropout,
        seed=seed,
        out=y,
        out_xa=xa,
        stream=stream,
    )
    return y, xa


def _lora_linear_bwd(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    xa,
    scale,
    fan_in_fan_out,
    enable_lora,
    dropout,
    seed,
    needs,
):
    """(grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b), None where not in needs."""
    need_x, need_weight, need_bias, need_a, need_b = needs
    stream = cuda_stream(grad_out.device) if grad_out.is_cuda else None
    if stream is not None:
        grad_out, x, weight, xa = (
            _cuda_view(grad_out),
            _cuda_view(x),
            _cuda_view(weight),
            _cuda_view(xa),
        )
        lora_a, lora_b = _cuda_view(lora_a), _cuda_view(lora_b)
    grad_x = x.new_empty(*x.shape) if need_x else None
    grad_weight = x.new_empty(*weight.shape) if need_weight else None
    grad_bias = x.new_empty(grad_out.shape[-1]) if need_bias else None
    # Adapter gradients in the adapters' dtype: float32 adapters beside a 16-bit x on CUDA.
    grad_a = lora_a.new_empty(*lora_a.shape) if need_a else None
    grad_b = lora_b.new_empty(*lora_b.shape) if need_b else None
    _C.lora_linear_backward(
        grad_out,
        x,
        weight,
        lora_a,
        lora_b,
        xa,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        enable_lora=enable_lora,
        dropout=dropout,
        seed=seed,
        grad_x=False if grad_x is None else grad_x,
        grad_lora_a=False if grad_a is None else grad_a,
        grad_lora_b=False if grad_b is None else grad_b,
        grad_bias=False if grad_bias is None else grad_bias,
        grad_weight=False if grad_weight is None else grad_weight,
        stream=stream,
    )
    return grad_x, grad_weight, grad_bias, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ (grouped for MergedLinear); keeps x and xa = drop(x)·Aᵀ.
    ``settings`` is the plain tuple (scale, fan_in_fan_out, enable_lora, dropout, seed): a
    NamedTuple's constructor is a Python call, about 0.4 µs on the per-call path."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, settings):
        y, xa = _lora_linear_fwd(x, weight, bias, lora_a, lora_b, *settings)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grads = _lora_linear_bwd(
            grad_out,
            x,
            weight,
            lora_a,
            lora_b,
            xa,
            *ctx.settings,
            (need_x, need_weight, need_bias and ctx.has_bias, need_a, need_b),
        )
        return (*grads, None)


def _lora_linear_eager_apply():
    """``_eager_apply(LoraLinearFunction)`` with its six arguments written out: the generic
    version's list of unwrapped arguments costs about 1 µs more per call, on the path every
    LoRA linear layer takes. Same semantics: each tensor unwrapped, functorch transforms routed
    to the full ``apply``."""
    if None in (_function_apply, _functorch_transforms_active, _unwrap_if_dead):
        return LoraLinearFunction.apply
    apply_node = _function_apply.__get__(None, LoraLinearFunction)

    def apply(x, weight, bias, lora_a, lora_b, settings):
        if _functorch_transforms_active():
            return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, settings)
        return apply_node(
            _unwrap_if_dead(x),
            _unwrap_if_dead(weight),
            None if bias is None else _unwrap_if_dead(bias),
            _unwrap_if_dead(lora_a),
            _unwrap_if_dead(lora_b),
            settings,
        )

    return apply


_lora_linear_apply = _lora_linear_eager_apply()


def _load_torch_node():
    """(cpeft._torch_node's lora_linear, None), or (None, why not). The node module links the
    torch it was built against, so it is used only with that very torch; CPEFT_TORCH_NODE=0 turns
    it off (every call then takes LoraLinearFunction, which gives the same results)."""
    if os.environ.get("CPEFT_TORCH_NODE", "1").strip() == "0":
        return None, "disabled by CPEFT_TORCH_NODE=0"
    if _functorch_transforms_active is None:
        return None, "this torch has no torch._C._are_functorch_transforms_active"
    try:
        from . import _torch_node
    except ImportError as error:
        return None, f"cpeft._torch_node cannot be imported ({error})"
    if _torch_node.torch_version != torch.__version__:
        return None, (
            f"cpeft._torch_node was built against torch {_torch_node.torch_version}, this is "
            f"torch {torch.__version__}; rebuild cpeft to use it"
        )
    return _torch_node.lora_linear, None


# The C++ autograd node for LoRA linear on the CPU (csrc/torch/lora_linear_node.cpp): it takes a
# call whose operands the CPU core can read as they are and returns None otherwise.
_lora_linear_node, TORCH_NODE_UNAVAILABLE = _load_torch_node()


@torch.library.custom_op("cpeft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    fan_in_fan_out: bool,
    enable_lora: Optional[List[bool]],
    dropout: float,
    seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    return _lora_linear_fwd(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scale,
        fan_in_fan_out,
        enable_lora,
        dropout,
        _seed_value(seed),
    )


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, fan_in_fan_out, enable_lora, dropout, seed):
    lead = x.shape[:-1]
    out_features = _out_features(weight, fan_in_fan_out)
    return x.new_empty(lead + (out_features,)), x.new_empty(lead + (lora_a.shape[0],))


@torch.library.custom_op("cpeft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    xa: Tensor,
    scale: float,
    fan_in_fan_out: bool,
    enable_lora: Optional[List[bool]],
    dropout: float,
    seed: Optional[Tensor],
    needs: List[bool],
) -> List[Tensor]:
    return _requested(
        _lora_linear_bwd(
            grad_out,
            x,
            weight,
            lora_a,
            lora_b,
            xa,
            scale,
            fan_in_fan_out,
            enable_lora,
            dropout,
            _seed_value(seed),
            needs,
        ),
        needs,
    )


@_lora_linear_backward_op.register_fake
def _(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    xa,
    scale,
    fan_in_fan_out,
    enable_lora,
    dropout,
    seed,
    needs,
):
    likes = (x, weight, grad_out, lora_a, lora_b)
    shapes = (x.shape, weight.shape, grad_out.shape[-1:], lora_a.shape, lora_b.shape)
    return [like.new_empty(shape) for like, shape, need in zip(likes, shapes, needs) if need]


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, fan_in_fan_out, enable_lora, dropout, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.settings = (scale, fan_in_fan_out, enable_lora, dropout)
    ctx.has_bias = bias is not None


def _lora_linear_op_backward(ctx, grad_y, grad_xa):
    x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
    need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    needs = [need_x, need_weight, need_bias and ctx.has_bias, need_a, need_b]
    grads = _lora_linear_backward_op(
        grad_y, x, weight, lora_a, lora_b, xa, *ctx.settings, seed, needs
    )
    return (*_spread(grads, needs), None, None, None, None, None)


_lora_linear_op.register_autograd(_lora_linear_op_backward, setup_context=_lora_linear_setup)


def lora_linear(x, weight, bias, lora_a, lora_b, *, scale, fan_in_fan_out, enable_lora, dropout):
    """LoRA linear under the module-wide dtype rule; returns the compute dtype."""
    device_type = "cpu" if x.is_cpu else x.device.type  # is_cpu spares a torch.device object
    dtype = x.dtype
    # The common case first, in one test: every operand already in a dtype the core computes in
    # on this device, and no autocast, so nothing is cast (the general rule below costs about
    # 2 µs in calls that would change nothing).
    if not (
        weight.dtype is dtype
        and lora_a.dtype is dtype
        and lora_b.dtype is dtype
        and (bias is None or bias.dtype is dtype)
        and dtype in _CORE_DTYPES.get(device_type, ())
        and not torch.is_autocast_enabled(device_type)
    ):
        dtype = compute_dtype(x.dtype, weight.dtype, device_type)
        kernel_dtype = core_dtype(dtype, device_type)
        adapter_dtype = (
            torch.float32
            if kernel_dtype in _FP32_ADAPTER_DTYPES
            and lora_a.dtype == torch.float32
            and lora_b.dtype == torch.float32
            else kernel_dtype
        )
        x, weight = _cast(x, kernel_dtype), _cast(weight, kernel_dtype)
        lora_a, lora_b = _cast(lora_a, adapter_dtype), _cast(lora_b, adapter_dtype)
        bias = _cast(bias, kernel_dtype)
    if torch.compiler.is_compiling():
        seed = _draw_seed_tensor() if dropout > 0.0 else None
        y = _lora_linear_op(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            float(scale),
            bool(fan_in_fan_out),
            _bool_list(enable_lora),
            float(dropout),
            seed,
        )[0]
    else:
        seed = draw_dropout_seed() if dropout > 0.0 else 0
        if (
            _lora_linear_node is not None
            and device_type == "cpu"
            and enable_lora is None
            and not _functorch_transforms_active()
        ):
            y = _lora_linear_node(
                x,
                weight,
                bias,
                lora_a,
                lora_b,
                float(scale),
                bool(fan_in_fan_out),
                float(dropout),
                seed,
            )
            if y is not None:
                return y if y.dtype is dtype else y.to(dtype)
        y = _lora_linear_apply(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            (float(scale), bool(fan_in_fan_out), enable_lora, float(dropout), seed),
        )
    return y if y.dtype is dtype else y.to(dtype)


# ---- LoRA embedding --------------------------------------------------------------------------


def _lora_embedding_fwd(indices, weight, lora_a, lora_b, scale, padding_idx):
    stream = _stream_of(weight)
    if stream is not None:
        indices, weight = _cuda_view(indices), _cuda_view(weight)
        lora_a, lora_b = _cuda_view(lora_a), _cuda_view(lora_b)
    y = weight.new_empty(*indices.shape, weight.shape[1])
    _C.lora_embedding_forward(
        indices,
        weight,
        lora_a,
        lora_b,
        scale,
        padding_idx=padding_idx,
        out=y,
        stream=stream,
    )
    return y


def _lora_embedding_bwd(grad_out, indices, lora_a, lora_b, scale, padding_idx, needs):
    """(grad_weight, grad_lora_a, grad_lora_b), None where not in needs."""
    need_weight, need_a, need_b = needs
    stream = _stream_of(grad_out)
    if stream is not None:
        grad_out, indices = _cuda_view(grad_out), _cuda_view(indices)
        lora_a, lora_b = _cuda_view(lora_a), _cuda_view(lora_b)
    grad_weight = _new(lora_a, need_weight, (lora_a.shape[1], lora_b.shape[0]))
    grad_a, grad_b = _new(lora_a, need_a, lora_a.shape), _new(lora_a, need_b, lora_b.shape)
    _C.lora_embedding_backward(
        grad_out,
        indices,
        lora_a,
        lora_b,
        scale,
        padding_idx=padding_idx,
        grad_lora_a=_out_or_false(grad_a),
        grad_lora_b=_out_or_false(grad_b),
        grad_weight=_out_or_false(grad_weight),
        stream=stream,
    )
    return grad_weight, grad_a, grad_b


class LoraEmbeddingSettings(NamedTuple):
    scale: float
    padding_idx: Optional[int]


class LoraEmbeddingFunction(torch.autograd.Function):
    """y[n] = W[idx[n]] + s·Aᵀ[idx[n]]·Bᵀ, gathering rows; nothing of vocabulary size per call."""

    @staticmethod
    def forward(ctx, indices, weight, lora_a, lora_b, settings: LoraEmbeddingSettings):
        y = _lora_embedding_fwd(indices, weight, lora_a, lora_b, *settings)
        ctx.save_for_backward(indices, lora_a, lora_b)
        ctx.settings = settings
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        indices, lora_a, lora_b = ctx.saved_tensors
        grads = _lora_embedding_bwd(
            grad_out, indices, lora_a, lora_b, *ctx.settings, ctx.needs_input_grad[1:4]
        )
        return (None, *grads, None)


_lora_embedding_apply = _eager_apply(LoraEmbeddingFunction)


@torch.library.custom_op("cpeft::lora_embedding", mutates_args=())
def _lora_embedding_op(
    indices: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    padding_idx: Optional[int],
) -> Tensor:
    return _lora_embedding_fwd(indices, weight, lora_a, lora_b, scale, padding_idx)


@_lora_embedding_op.register_fake
def _(indices, weight, lora_a, lora_b, scale, padding_idx):
    return weight.new_empty(indices.shape + (weight.shape[1],))


@torch.library.custom_op("cpeft::lora_embedding_backward", mutates_args=())
def _lora_embedding_backward_op(
    grad_out: Tensor,
    indices: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    padding_idx: Optional[int],
    needs: List[bool],
) -> List[Tensor]:
    return _requested(
        _lora_embedding_bwd(grad_out, indices, lora_a, lora_b, scale, padding_idx, needs), needs
    )


@_lora_embedding_backward_op.register_fake
def _(grad_out, indices, lora_a, lora_b, scale, padding_idx, needs):
    shapes = ((lora_a.shape[1], lora_b.shape[0]), lora_a.shape, lora_b.shape)
    return [lora_a.new_empty(shape) for shape, need in zip(shapes, needs) if need]


def _lora_embedding_setup(ctx, inputs, output):
    indices, _, lora_a, lora_b, scale, padding_idx = inputs
    ctx.save_for_backward(indices, lora_a, lora_b)
    ctx.settings = (scale, padding_idx)


def _lora_embedding_op_backward(ctx, grad_y):
    indices, lora_a, lora_b = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[1:4])
    grads = _lora_embedding_backward_op(grad_y, indices, lora_a, lora_b, *ctx.settings, needs)
    return (None, *_spread(grads, needs), None, None)


_lora_embedding_op.register_autograd(
    _lora_embedding_op_backward, setup_context=_lora_embedding_setup
)


def _check_indices(indices: Tensor) -> Tensor:
    """torch's rule for embedding indices: int64 or int32, never a cast (1.7 is not row 1)."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(
            "Expected tensor for argument #1 'indices' to have one of the following "
            f"scalar types: Long, Int; but got {indices.type()} instead (while "
            "checking arguments for embedding)"
        )
    return indices


def lora_embedding(indices, weight, lora_a, lora_b, *, scale, padding_idx):
    """Embedding lookups follow torch: the output has the weight's dtype (autocast leaves
    embeddings alone), adapters are cast to it."""
    dtype = weight.dtype
    kernel_dtype = core_dtype(dtype, weight.device.type)
    indices, weight = _check_indices(indices), _cast(weight, kernel_dtype)
    lora_a, lora_b = _cast(lora_a, kernel_dtype), _cast(lora_b, kernel_dtype)
    if torch.compiler.is_compiling():
        y = _lora_embedding_op(indices, weight, lora_a, lora_b, float(scale), padding_idx)
    else:
        y = _lora_embedding_apply(
            indices, weight, lora_a, lora_b, LoraEmbeddingSettings(float(scale), padding_idx)
        )
    return _cast(y, dtype)


# ---- IA3 linear ------------------------------------------------------------------------------


def _ia3_linear_fwd(x, weight, bias, ia3_l, feedforward, fan_in_fan_out, keep_base):
    """(y, base), base = x·Wᵀ + b only when keep_base (else None)."""
    stream = _stream_of(x)
    if stream is not None:
        x, weight, bias, ia3_l = (
            _cuda_view(x),
            _cuda_view(weight),
            _cuda_view(bias),
            _cuda_view(ia3_l),
        )
    out_features = _out_features(weight, fan_in_fan_out)
    y = x.new_empty(*x.shape[:-1], out_features)
    base = _new(y, keep_base, y.shape)
    _C.ia3_linear_forward(
        x,
        weight,
        bias,
        ia3_l,
        feedforward=feedforward,
        fan_in_fan_out=fan_in_fan_out,
        keep_base=keep_base,
        out=y,
        out_base=base,
        stream=stream,
    )
    return y, base


def _ia3_linear_bwd(grad_out, x, weight, ia3_l, base, feedforward, fan_in_fan_out, needs):
    """(grad_x, grad_weight, grad_bias, grad_ia3_l), None where not in needs."""
    need_x, need_weight, need_bias, need_l = needs
    stream = _stream_of(grad_out)
    if stream is not None:
        grad_out, x, weight = _cuda_view(grad_out), _cuda_view(x), _cuda_view(weight)
        ia3_l, base = _cuda_view(ia3_l), _cuda_view(base)
    grad_x, grad_weight = _new(x, need_x, x.shape), _new(x, need_weight, weight.shape)
    grad_bias = _new(x, need_bias, grad_out.shape[-1:])
    grad_l = _new(x, need_l, ia3_l.shape)
    _C.ia3_linear_backward(
        grad_out,
        x,
        weight,
        ia3_l,
        base,
        feedforward=feedforward,
        fan_in_fan_out=fan_in_fan_out,
        grad_x=_out_or_false(grad_x),
        grad_ia3_l=_out_or_false(grad_l),
        grad_bias=_out_or_false(grad_bias),
        grad_weight=_out_or_false(grad_weight),
        stream=stream,
    )
    return grad_x, grad_weight, grad_bias, grad_l


class IA3LinearSettings(NamedTuple):
    feedforward: bool
    fan_in_fan_out: bool


class IA3LinearFunction(torch.autograd.Function):
    """Output scaling y = (x·Wᵀ + b) ⊙ l, or input scaling y = (x ⊙ l)·Wᵀ + b (feedforward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ia3_l, settings: IA3LinearSettings):
        # base = x·Wᵀ + b is kept only when l needs a gradient with output scaling: recomputing
        # it in backward would cost a full GEMM.
        keep_base = ctx.needs_input_grad[3] and not settings.feedforward
        y, base = _ia3_linear_fwd(x, weight, bias, ia3_l, *settings, keep_base)
        ctx.save_for_backward(x, weight, ia3_l, base)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        x, weight, ia3_l, base = ctx.saved_tensors
        need_x, need_weight, need_bias, need_l = ctx.needs_input_grad[:4]
        grads = _ia3_linear_bwd(
            grad_out,
            x,
            weight,
            ia3_l,
            base,
            *ctx.settings,
            (need_x, need_weight, need_bias and ctx.has_bias, need_l),
        )
        return (*grads, None)


_ia3_linear_apply = _eager_apply(IA3LinearFunction)


@torch.library.custom_op("cpeft::ia3_linear", mutates_args=())
def _ia3_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ia3_l: Tensor,
    feedforward: bool,
    fan_in_fan_out: bool,
    keep_base: bool,
) -> Tuple[Tensor, Tensor]:
    """(y, base); base is empty when not kept (schemas have no optional outputs)."""
    y, base = _ia3_linear_fwd(x, weight, bias, ia3_l, feedforward, fan_in_fan_out, keep_base)
    return y, (y.new_empty((0,)) if base is None else base)


@_ia3_linear_op.register_fake
def _(x, weight, bias, ia3_l, feedforward, fan_in_fan_out, keep_base):
    y = x.new_empty(x.shape[:-1] + (_out_features(weight, fan_in_fan_out),))
    return y, (y.new_empty(y.shape) if keep_base else y.new_empty((0,)))


@torch.library.custom_op("cpeft::ia3_linear_backward", mutates_args=())
def _ia3_linear_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    ia3_l: Tensor,
    base: Optional[Tensor],
    feedforward: bool,
    fan_in_fan_out: bool,
    needs: List[bool],
) -> List[Tensor]:
    return _requested(
        _ia3_linear_bwd(grad_out, x, weight, ia3_l, base, feedforward, fan_in_fan_out, needs), needs
    )


@_ia3_linear_backward_op.register_fake
def _(grad_out, x, weight, ia3_l, base, feedforward, fan_in_fan_out, needs):
    shapes = (x.shape, weight.shape, grad_out.shape[-1:], ia3_l.shape)
    return [x.new_empty(shape) for shape, need in zip(shapes, needs) if need]


def _ia3_linear_setup(ctx, inputs, output):
    x, weight, bias, ia3_l, feedforward, fan_in_fan_out, keep_base = inputs
    ctx.save_for_backward(x, weight, ia3_l, output[1] if keep_base else None)
    ctx.settings = (feedforward, fan_in_fan_out)
    ctx.has_bias = bias is not None


def _ia3_linear_op_backward(ctx, grad_y, grad_base):
    x, weight, ia3_l, base = ctx.saved_tensors
    need_x, need_weight, need_bias, need_l = ctx.needs_input_grad[:4]
    needs = [need_x, need_weight, need_bias and ctx.has_bias, need_l]
    grads = _ia3_linear_backward_op(grad_y, x, weight, ia3_l, base, *ctx.settings, needs)
    return (*_spread(grads, needs), None, None, None)


_ia3_linear_op.register_autograd(_ia3_linear_op_backward, setup_context=_ia3_linear_setup)


def ia3_linear(x, weight, bias, ia3_l, *, feedforward, fan_in_fan_out):
    device_type = x.device.type
    dtype = compute_dtype(x.dtype, weight.dtype, device_type)
    kernel_dtype = core_dtype(dtype, device_type)
    x, weight, bias = _cast(x, kernel_dtype), _cast(weight, kernel_dtype), _cast(bias, kernel_dtype)
    ia3_l = _cast(ia3_l, kernel_dtype)
    if torch.compiler.is_compiling():
        keep_base = torch.is_grad_enabled() and ia3_l.requires_grad and not feedforward
        y = _ia3_linear_op(
            x, weight, bias, ia3_l, bool(feedforward), bool(fan_in_fan_out), keep_base
        )[0]
    else:
        y = _ia3_linear_apply(
            x, weight, bias, ia3_l, IA3LinearSettings(bool(feedforward), bool(fan_in_fan_out))
        )
    return _cast(y, dtype)


# ---- IA3 embedding ---------------------------------------------------------------------------


def _ia3_embedding_fwd(indices, weight, ia3_l):
    stream = _stream_of(weight)
    if stream is not None:
        indices, weight, ia3_l = _cuda_view(indices), _cuda_view(weight), _cuda_view(ia3_l)
    y = weight.new_empty(*indices.shape, weight.shape[1])
    _C.ia3_embedding_forward(indices, weight, ia3_l, out=y, stream=stream)
    return y


def _ia3_embedding_bwd(grad_out, indices, weight, ia3_l, padding_idx, needs):
    """(grad_weight, grad_ia3_l), None where not in needs."""
    need_weight, need_l = needs
    stream = _stream_of(grad_out)
    if stream is not None:
        grad_out, indices = _cuda_view(grad_out), _cuda_view(indices)
        weight, ia3_l = _cuda_view(weight), _cuda_view(ia3_l)
    grad_weight, grad_l = _new(weight, need_weight, weight.shape), _new(weight, need_l, ia3_l.shape)
    _C.ia3_embedding_backward(
        grad_out,
        indices,
        weight,
        ia3_l,
        padding_idx=padding_idx,
        grad_ia3_l=_out_or_false(grad_l),
        grad_weight=_out_or_false(grad_weight),
        stream=stream,
    )
    return grad_weight, grad_l


class IA3EmbeddingFunction(torch.autograd.Function):
    """y[n] = W[idx[n]] ⊙ l."""

    @staticmethod
    def forward(ctx, indices, weight, ia3_l, padding_idx: Optional[int]):
        y = _ia3_embedding_fwd(indices, weight, ia3_l)
        ctx.save_for_backward(indices, weight, ia3_l)
        ctx.padding_idx = padding_idx
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        indices, weight, ia3_l = ctx.saved_tensors
        grads = _ia3_embedding_bwd(
            grad_out, indices, weight, ia3_l, ctx.padding_idx, ctx.needs_input_grad[1:3]
        )
        return (None, *grads, None)


_ia3_embedding_apply = _eager_apply(IA3EmbeddingFunction)


@torch.library.custom_op("cpeft::ia3_embedding", mutates_args=())
def _ia3_embedding_op(
    indices: Tensor, weight: Tensor, ia3_l: Tensor, padding_idx: Optional[int]
) -> Tensor:
    """padding_idx only affects the backward; it is an argument so autograd's context has it."""
    return _ia3_embedding_fwd(indices, weight, ia3_l)


@_ia3_embedding_op.register_fake
def _(indices, weight, ia3_l, padding_idx):
    return weight.new_empty(indices.shape + (weight.shape[1],))


@torch.library.custom_op("cpeft::ia3_embedding_backward", mutates_args=())
def _ia3_embedding_backward_op(
    grad_out: Tensor,
    indices: Tensor,
    weight: Tensor,
    ia3_l: Tensor,
    padding_idx: Optional[int],
    needs: List[bool],
) -> List[Tensor]:
    return _requested(
        _ia3_embedding_bwd(grad_out, indices, weight, ia3_l, padding_idx, needs), needs
    )


@_ia3_embedding_backward_op.register_fake
def _(grad_out, indices, weight, ia3_l, padding_idx, needs):
    shapes = (weight.shape, ia3_l.shape)
    return [weight.new_empty(shape) for shape, need in zip(shapes, needs) if need]


def _ia3_embedding_setup(ctx, inputs, output):
    indices, weight, ia3_l, padding_idx = inputs
    ctx.save_for_backward(indices, weight, ia3_l)
    ctx.padding_idx = padding_idx


def _ia3_embedding_op_backward(ctx, grad_y):
    indices, weight, ia3_l = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[1:3])
    grads = _ia3_embedding_backward_op(grad_y, indices, weight, ia3_l, ctx.padding_idx, needs)
    return (None, *_spread(grads, needs), None)


_ia3_embedding_op.register_autograd(_ia3_embedding_op_backward, setup_context=_ia3_embedding_setup)


def ia3_embedding(indices, weight, ia3_l, *, padding_idx):
    dtype = weight.dtype
    kernel_dtype = core_dtype(dtype, weight.device.type)
    indices, weight = _check_indices(indices), _cast(weight, kernel_dtype)
    ia3_l = _cast(ia3_l, kernel_dtype)
    if torch.compiler.is_compiling():
        y = _ia3_embedding_op(indices, weight, ia3_l, padding_idx)
    else:
        y = _ia3_embedding_apply(indices, weight, ia3_l, padding_idx)
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
        key = (
            weight._version,
            weight.data_ptr(),
            weight.device,
            kernel_weight.dtype,
            tuple(weight.shape),
            weight.stride(),
            bool(fan_in_fan_out),
        )
        if key != self._key:
            value = kernel_weight.new_empty((_out_features(kernel_weight, fan_in_fan_out),))
            functional.dora_weight_sq_norm(
                kernel_weight.detach(),
                fan_in_fan_out=fan_in_fan_out,
                out=value,
                stream=cuda_stream(weight.device),
            )
            self._key, self._value = key, value
        return self._value


# ---- DoRA linear -----------------------------------------------------------------------------


def _refuse_weight_grad(weight: torch.Tensor, layer: str) -> None:
    if weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{layer} with DoRA keeps the base weight frozen (peft trains lora_A, lora_B and "
            "lora_magnitude_vector); got a weight with requires_grad=True"
        )


def _dora_linear_fwd(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    magnitude,
    weight_sq_norm,
    scale,
    fan_in_fan_out,
    dropout,
    seed,
    keep_base,
):
    """(y, xa, base, norm) with xa = drop(x)·Aᵀ and the norm (OUT,) kept for backward, and
    base = drop(x)·Wᵀ + s·xa·Bᵀ only when keep_base (the magnitude's gradient needs it; else
    None). weight_sq_norm None: the core computes ‖W‖² itself."""
    stream = _stream_of(x)
    if stream is not None:
        x = _cuda_view(x)  # the one copy the CUDA boundary needs
    out_features = _out_features(weight, fan_in_fan_out)
    lead = tuple(x.shape)[:-1]
    y = x.new_empty(lead + (out_features,))
    xa = x.new_empty(lead + (lora_a.shape[0],))
    norm = x.new_empty((out_features,))
    base = _new(y, keep_base, y.shape)
    _C.dora_linear_forward(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        magnitude,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        dropout=dropout,
        seed=seed,
        weight_sq_norm=weight_sq_norm,
        out=y,
        out_xa=xa,
        out_base=base,
        out_norm=norm,
        stream=stream,
    )
    return y, xa, base, norm


def _dora_linear_bwd(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    magnitude,
    norm,
    xa,
    base,
    scale,
    fan_in_fan_out,
    dropout,
    seed,
    needs,
):
    """(grad_x, grad_bias, grad_lora_a, grad_lora_b, grad_magnitude), None where not in needs;
    the weight is frozen, so it has none."""
    need_x, need_bias, need_a, need_b, need_m = needs
    stream = _stream_of(grad_out)
    if stream is not None:
        grad_out = _cuda_view(grad_out)  # stride 0 of .sum()
    grad_x, grad_bias = _new(x, need_x, x.shape), _new(grad_out, need_bias, grad_out.shape[-1:])
    grad_a, grad_b = _new(lora_a, need_a, lora_a.shape), _new(lora_b, need_b, lora_b.shape)
    grad_m = _new(magnitude, need_m, magnitude.shape)
    _C.dora_linear_backward(
        grad_out,
        x,
        weight,
        lora_a,
        lora_b,
        magnitude,
        norm,
        xa,
        base,
        scale,
        fan_in_fan_out=fan_in_fan_out,
        dropout=dropout,
        seed=seed,
        grad_x=_out_or_false(grad_x),
        grad_lora_a=_out_or_false(grad_a),
        grad_lora_b=_out_or_false(grad_b),
        grad_magnitude=_out_or_false(grad_m),
        grad_bias=_out_or_false(grad_bias),
        stream=stream,
    )
    return grad_x, grad_bias, grad_a, grad_b, grad_m


class DoraLinearSettings(NamedTuple):
    scale: float
    fan_in_fan_out: bool
    dropout: float
    seed: int


class DoraLinearFunction(torch.autograd.Function):
    """peft's DoRA linear (cpeft/dora.h): y = c ⊙ (x·Wᵀ + s·xa·Bᵀ) + b, c = m / ‖W + s·B·A‖
    (the norm a constant for backward), or with dropout peft's training formula. Keeps x, xa,
    the norm (OUT,) and, when the magnitude needs a gradient, base = drop(x)·Wᵀ + s·xa·Bᵀ, the
    one output-sized tensor DoRA adds to LoRA's."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        magnitude,
        weight_sq_norm,
        settings: DoraLinearSettings,
    ):
        y, xa, base, norm = _dora_linear_fwd(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            magnitude,
            weight_sq_norm,
            *settings,
            ctx.needs_input_grad[5],
        )
        ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, norm, xa, base)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, magnitude, norm, xa, base = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        grad_x, grad_bias, grad_a, grad_b, grad_m = _dora_linear_bwd(
            grad_out,
            x,
            weight,
            lora_a,
            lora_b,
            magnitude,
            norm,
            xa,
            base,
            *ctx.settings,
            (need_x, need_bias and ctx.has_bias, need_a, need_b, need_m),
        )
        return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None, None


_dora_linear_apply = _eager_apply(DoraLinearFunction)


@torch.library.custom_op("cpeft::dora_linear", mutates_args=())
def _dora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    scale: float,
    fan_in_fan_out: bool,
    dropout: float,
    seed: Optional[Tensor],
    keep_base: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, xa, base, norm); base is empty when not kept. No ‖W‖² argument: see dora_linear."""
    y, xa, base, norm = _dora_linear_fwd(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        magnitude,
        None,
        scale,
        fan_in_fan_out,
        dropout,
        _seed_value(seed),
        keep_base,
    )
    return y, xa, (y.new_empty((0,)) if base is None else base), norm


@_dora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, magnitude, scale, fan_in_fan_out, dropout, seed, keep_base):
    out_features = _out_features(weight, fan_in_fan_out)
    y = x.new_empty(x.shape[:-1] + (out_features,))
    base = y.new_empty(y.shape) if keep_base else y.new_empty((0,))
    return y, x.new_empty(x.shape[:-1] + (lora_a.shape[0],)), base, x.new_empty((out_features,))


@torch.library.custom_op("cpeft::dora_linear_backward", mutates_args=())
def _dora_linear_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    xa: Tensor,
    base: Optional[Tensor],
    scale: float,
    fan_in_fan_out: bool,
    dropout: float,
    seed: Optional[Tensor],
    needs: List[bool],
) -> List[Tensor]:
    return _requested(
        _dora_linear_bwd(
            grad_out,
            x,
            weight,
            lora_a,
            lora_b,
            magnitude,
            norm,
            xa,
            base,
            scale,
            fan_in_fan_out,
            dropout,
            _seed_value(seed),
            needs,
        ),
        needs,
    )


@_dora_linear_backward_op.register_fake
def _(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    magnitude,
    norm,
    xa,
    base,
    scale,
    fan_in_fan_out,
    dropout,
    seed,
    needs,
):
    likes = (x, grad_out, lora_a, lora_b, magnitude)
    shapes = (x.shape, grad_out.shape[-1:], lora_a.shape, lora_b.shape, magnitude.shape)
    return [like.new_empty(shape) for like, shape, need in zip(likes, shapes, needs) if need]


def _dora_linear_setup(ctx, inputs, output):
    (
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        magnitude,
        scale,
        fan_in_fan_out,
        dropout,
        seed,
        keep_base,
    ) = inputs
    _, xa, base, norm = output
    ctx.save_for_backward(
        x, weight, lora_a, lora_b, magnitude, norm, xa, base if keep_base else None, seed
    )
    ctx.settings = (scale, fan_in_fan_out, dropout)
    ctx.has_bias = bias is not None


def _dora_linear_op_backward(ctx, grad_y, grad_xa, grad_base, grad_norm):
    x, weight, lora_a, lora_b, magnitude, norm, xa, base, seed = ctx.saved_tensors
    need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
    needs = [need_x, need_bias and ctx.has_bias, need_a, need_b, need_m]
    grads = _dora_linear_backward_op(
        grad_y, x, weight, lora_a, lora_b, magnitude, norm, xa, base, *ctx.settings, seed, needs
    )
    grad_x, grad_bias, grad_a, grad_b, grad_m = _spread(grads, needs)
    return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None


_dora_linear_op.register_autograd(_dora_linear_op_backward, setup_context=_dora_linear_setup)


def dora_linear(
    x,
    weight,
    bias,
    lora_a,
    lora_b,
    magnitude,
    *,
    scale,
    fan_in_fan_out,
    dropout,
    sq_norm_cache: Optional[WeightSqNormCache] = None,
    layer: str = "Linear",
):
    """DoRA linear under the module-wide dtype rule; returns the compute dtype."""
    _refuse_weight_grad(weight, layer)
    device_type = x.device.type
    dtype = compute_dtype(x.dtype, weight.dtype, device_type)
    kernel_dtype = core_dtype(dtype, device_type)
    kernel_weight = _cast(weight, kernel_dtype)
    x, bias = _cast(x, kernel_dtype), _cast(bias, kernel_dtype)
    lora_a, lora_b = _cast(lora_a, kernel_dtype), _cast(lora_b, kernel_dtype)
    magnitude = _cast(magnitude, kernel_dtype)
    if torch.compiler.is_compiling():
        # No ‖W‖² cache here: its key (version counter, storage pointer) is Python-side state
        # that Dynamo cannot trace (it would break the graph or guard on a counter every
        # optimizer step bumps), and a graph is pure, so it cannot keep a value between calls.
        # The op lets the core compute ‖W‖² per call: one pass over W, cheaper than the base
        # GEMM over it, and it sees every change of W, with no key to miss one. The core keeps
        # that sum in double where the cache rounds it to W's dtype, so float64 results equal
        # eager's and float32 ones differ from them by that rounding only.
        seed = _draw_seed_tensor() if dropout > 0.0 else None
        keep_base = torch.is_grad_enabled() and magnitude.requires_grad
        y = _dora_linear_op(
            x,
            kernel_weight,
            bias,
            lora_a,
            lora_b,
            magnitude,
            float(scale),
            bool(fan_in_fan_out),
            float(dropout),
            seed,
            keep_base,
        )[0]
    else:
        seed = draw_dropout_seed() if dropout > 0.0 else 0
        sq_norm = (
            sq_norm_cache.get(weight, kernel_weight, fan_in_fan_out)
            if sq_norm_cache is not None
            else None
        )
        y = _dora_linear_apply(
            x,
            kernel_weight,
            bias,
            lora_a,
            lora_b,
            magnitude,
            sq_norm,
            DoraLinearSettings(float(scale), bool(fan_in_fan_out), float(dropout), seed),
        )
    return _cast(y, dtype)


# ---- DoRA embedding --------------------------------------------------------------------------


def _dora_embedding_fwd(indices, weight, lora_a, lora_b, magnitude, weight_sq_norm, scale):
    """(y, norm), the norm (D,) kept for backward; weight_sq_norm as in _dora_linear_fwd."""
    stream = _stream_of(weight)
    if stream is not None:
        indices = _cuda_view(indices)
    y = weight.new_empty(*indices.shape, weight.shape[1])
    norm = weight.new_empty((weight.shape[1],))
    _C.dora_embedding_forward(
        indices,
        weight,
        lora_a,
        lora_b,
        magnitude,
        scale,
        weight_sq_norm=weight_sq_norm,
        out=y,
        out_norm=norm,
        stream=stream,
    )
    return y, norm


def _dora_embedding_bwd(
    grad_out, indices, weight, lora_a, lora_b, magnitude, norm, scale, padding_idx, needs
):
    """(grad_lora_a, grad_lora_b, grad_magnitude), None where not in needs."""
    need_a, need_b, need_m = needs
    stream = _stream_of(grad_out)
    if stream is not None:
        grad_out = _cuda_view(grad_out)  # stride 0 of .sum()
    grad_a, grad_b = _new(lora_a, need_a, lora_a.shape), _new(lora_b, need_b, lora_b.shape)
    grad_m = _new(magnitude, need_m, magnitude.shape)
    _C.dora_embedding_backward(
        grad_out,
        indices,
        weight,
        lora_a,
        lora_b,
        magnitude,
        norm,
        scale,
        padding_idx=padding_idx,
        grad_lora_a=_out_or_false(grad_a),
        grad_lora_b=_out_or_false(grad_b),
        grad_magnitude=_out_or_false(grad_m),
        stream=stream,
    )
    return grad_a, grad_b, grad_m


class DoraEmbeddingFunction(torch.autograd.Function):
    """peft's DoRA embedding: y[n] = c ⊙ (W[idx[n]] + s·Aᵀ[idx[n]]·Bᵀ), c = m / n with n normed
    over the vocabulary; keeps the indices and the norm (D,), nothing output-sized."""

    @staticmethod
    def forward(
        ctx,
        indices,
        weight,
        lora_a,
        lora_b,
        magnitude,
        weight_sq_norm,
        settings: LoraEmbeddingSettings,
    ):
        y, norm = _dora_embedding_fwd(
            indices, weight, lora_a, lora_b, magnitude, weight_sq_norm, settings.scale
        )
        ctx.save_for_backward(indices, weight, lora_a, lora_b, magnitude, norm)
        ctx.settings = settings
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        indices, weight, lora_a, lora_b, magnitude, norm = ctx.saved_tensors
        grads = _dora_embedding_bwd(
            grad_out,
            indices,
            weight,
            lora_a,
            lora_b,
            magnitude,
            norm,
            *ctx.settings,
            ctx.needs_input_grad[2:5],
        )
        return (None, None, *grads, None, None)


_dora_embedding_apply = _eager_apply(DoraEmbeddingFunction)


@torch.library.custom_op("cpeft::dora_embedding", mutates_args=())
def _dora_embedding_op(
    indices: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    scale: float,
    padding_idx: Optional[int],
) -> Tuple[Tensor, Tensor]:
    """(y, norm); padding_idx only affects the backward, as in cpeft::ia3_embedding. No ‖W‖²
    argument: see dora_linear."""
    return _dora_embedding_fwd(indices, weight, lora_a, lora_b, magnitude, None, scale)


@_dora_embedding_op.register_fake
def _(indices, weight, lora_a, lora_b, magnitude, scale, padding_idx):
    return weight.new_empty(indices.shape + (weight.shape[1],)), weight.new_empty(
        (weight.shape[1],)
    )


@torch.library.custom_op("cpeft::dora_embedding_backward", mutates_args=())
def _dora_embedding_backward_op(
    grad_out: Tensor,
    indices: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scale: float,
    padding_idx: Optional[int],
    needs: List[bool],
) -> List[Tensor]:
    return _requested(
        _dora_embedding_bwd(
            grad_out, indices, weight, lora_a, lora_b, magnitude, norm, scale, padding_idx, needs
        ),
        needs,
    )


@_dora_embedding_backward_op.register_fake
def _(grad_out, indices, weight, lora_a, lora_b, magnitude, norm, scale, padding_idx, needs):
    likes = (lora_a, lora_b, magnitude)
    return [like.new_empty(like.shape) for like, need in zip(likes, needs) if need]


def _dora_embedding_setup(ctx, inputs, output):
    indices, weight, lora_a, lora_b, magnitude, scale, padding_idx = inputs
    ctx.save_for_backward(indices, weight, lora_a, lora_b, magnitude, output[1])
    ctx.settings = (scale, padding_idx)


def _dora_embedding_op_backward(ctx, grad_y, grad_norm):
    indices, weight, lora_a, lora_b, magnitude, norm = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[2:5])
    grads = _dora_embedding_backward_op(
        grad_y, indices, weight, lora_a, lora_b, magnitude, norm, *ctx.settings, needs
    )
    return (None, None, *_spread(grads, needs), None, None)


_dora_embedding_op.register_autograd(
    _dora_embedding_op_backward, setup_context=_dora_embedding_setup
)


def dora_embedding(
    indices,
    weight,
    lora_a,
    lora_b,
    magnitude,
    *,
    scale,
    padding_idx,
    sq_norm_cache: Optional[WeightSqNormCache] = None,
):
    """As lora_embedding: the output has the weight's dtype, the adapters are cast to it."""
    _refuse_weight_grad(weight, "Embedding")
    dtype = weight.dtype
    kernel_dtype = core_dtype(dtype, weight.device.type)
    kernel_weight = _cast(weight, kernel_dtype)
    indices = _check_indices(indices)
    lora_a, lora_b = _cast(lora_a, kernel_dtype), _cast(lora_b, kernel_dtype)
    magnitude = _cast(magnitude, kernel_dtype)
    if torch.compiler.is_compiling():
        # ‖W‖² computed inside the op, for the reasons given in dora_linear.
        y = _dora_embedding_op(
            indices, kernel_weight, lora_a, lora_b, magnitude, float(scale), padding_idx
        )[0]
    else:
        sq_norm = (
            sq_norm_cache.get(weight, kernel_weight, True) if sq_norm_cache is not None else None
        )
        y = _dora_embedding_apply(
            indices,
            kernel_weight,
            lora_a,
            lora_b,
            magnitude,
            sq_norm,
            LoraEmbeddingSettings(float(scale), padding_idx),
        )
    return _cast(y, dtype)


# ---- LoRA grouped (mixed-adapter batches) ----------------------------------------------------


def _lora_grouped_fwd(
    x, weight, bias, lora_a, lora_b, index, ranks, scales, fan_in_fan_out, dropout, seed
):
    """(y, xa) with xa (..., max rank) kept for backward."""
    stream = _stream_of(x)
    if stream is not None:
        x = _cuda_view(x)  # the one copy the CUDA boundary needs
    out_features = _out_features(weight, fan_in_fan_out)
    lead = tuple(x.shape)[:-1]
    y = x.new_empty(lead + (out_features,))
    xa = x.new_empty(lead + (max(ranks),))
    _C.lora_grouped_forward(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        index,
        ranks,
        scales,
        fan_in_fan_out=fan_in_fan_out,
        dropout=dropout,
        seed=seed,
        offset=0,
        out=y,
        out_xa=xa,
        stream=stream,
    )
    return y, xa


def _lora_grouped_bwd(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    xa,
    index,
    ranks,
    scales,
    fan_in_fan_out,
    dropout,
    seed,
    needs,
):
    """(grad_x, grad_weight, grad_bias, grad_lora_a, grad_lora_b), None where not in needs."""
    need_x, need_weight, need_bias, need_a, need_b = needs
    stream = _stream_of(grad_out)
    grad_out = grad_out.contiguous()  # stride 0 of .sum(); the grouped core takes rows as they lie
    grad_x, grad_weight = _new(x, need_x, x.shape), _new(weight, need_weight, weight.shape)
    grad_a, grad_b = _new(lora_a, need_a, lora_a.shape), _new(lora_b, need_b, lora_b.shape)
    grad_bias = _new(grad_out, need_bias, grad_out.shape[-1:])
    _C.lora_grouped_backward(
        grad_out,
        x,
        weight,
        lora_a,
        lora_b,
        xa,
        index,
        ranks,
        scales,
        fan_in_fan_out=fan_in_fan_out,
        dropout=dropout,
        seed=seed,
        offset=0,
        grad_x=_out_or_false(grad_x),
        grad_lora_a=_out_or_false(grad_a),
        grad_lora_b=_out_or_false(grad_b),
        grad_bias=_out_or_false(grad_bias),
        grad_weight=_out_or_false(grad_weight),
        stream=stream,
    )
    return grad_x, grad_weight, grad_bias, grad_a, grad_b


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
        y, xa = _lora_grouped_fwd(x, weight, bias, lora_a, lora_b, index, *settings)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, index)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, xa, index = ctx.saved_tensors
        need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grads = _lora_grouped_bwd(
            grad_out,
            x,
            weight,
            lora_a,
            lora_b,
            xa,
            index,
            *ctx.settings,
            (need_x, need_weight, need_bias and ctx.has_bias, need_a, need_b),
        )
        return (*grads, None, None)


_lora_grouped_apply = _eager_apply(LoraGroupedFunction)


@torch.library.custom_op("cpeft::lora_grouped", mutates_args=())
def _lora_grouped_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    index: Tensor,
    ranks: List[int],
    scales: List[float],
    fan_in_fan_out: bool,
    dropout: float,
    seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    return _lora_grouped_fwd(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        index,
        ranks,
        scales,
        fan_in_fan_out,
        dropout,
        _seed_value(seed),
    )


@_lora_grouped_op.register_fake
def _(x, weight, bias, lora_a, lora_b, index, ranks, scales, fan_in_fan_out, dropout, seed):
    lead = x.shape[:-1]
    out_features = _out_features(weight, fan_in_fan_out)
    return x.new_empty(lead + (out_features,)), x.new_empty(lead + (max(ranks),))


@torch.library.custom_op("cpeft::lora_grouped_backward", mutates_args=())
def _lora_grouped_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    xa: Tensor,
    index: Tensor,
    ranks: List[int],
    scales: List[float],
    fan_in_fan_out: bool,
    dropout: float,
    seed: Optional[Tensor],
    needs: List[bool],
) -> List[Tensor]:
    return _requested(
        _lora_grouped_bwd(
            grad_out,
            x,
            weight,
            lora_a,
            lora_b,
            xa,
            index,
            ranks,
            scales,
            fan_in_fan_out,
            dropout,
            _seed_value(seed),
            needs,
        ),
        needs,
    )


@_lora_grouped_backward_op.register_fake
def _(
    grad_out,
    x,
    weight,
    lora_a,
    lora_b,
    xa,
    index,
    ranks,
    scales,
    fan_in_fan_out,
    dropout,
    seed,
    needs,
):
    likes = (x, weight, grad_out, lora_a, lora_b)
    shapes = (x.shape, weight.shape, grad_out.shape[-1:], lora_a.shape, lora_b.shape)
    return [like.new_empty(shape) for like, shape, need in zip(likes, shapes, needs) if need]


def _lora_grouped_setup(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, index, ranks, scales, fan_in_fan_out, dropout, seed) = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], index, seed)
    ctx.settings = (ranks, scales, fan_in_fan_out, dropout)
    ctx.has_bias = bias is not None


def _lora_grouped_op_backward(ctx, grad_y, grad_xa):
    x, weight, lora_a, lora_b, xa, index, seed = ctx.saved_tensors
    need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    needs = [need_x, need_weight, need_bias and ctx.has_bias, need_a, need_b]
    grads = _lora_grouped_backward_op(
        grad_y, x, weight, lora_a, lora_b, xa, index, *ctx.settings, seed, needs
    )
    return (*_spread(grads, needs), None, None, None, None, None, None)


_lora_grouped_op.register_autograd(_lora_grouped_op_backward, setup_context=_lora_grouped_setup)


def lora_grouped(x, weight, bias, lora_a, lora_b, index, *, ranks, scales, fan_in_fan_out, dropout):
    """Mixed-adapter LoRA linear under the module-wide dtype rule. lora_a (ΣR, IN) and lora_b
    (OUT, ΣR) are the adapters packed (torch.cat keeps each adapter's gradient path); index is
    an int64 tensor with one entry per row of x."""
    device_type = x.device.type
    dtype = compute_dtype(x.dtype, weight.dtype, device_type)
    kernel_dtype = core_dtype(dtype, device_type)
    ranks, scales = [int(r) for r in ranks], [float(s) for s in scales]
    x, weight, bias = _cast(x, kernel_dtype), _cast(weight, kernel_dtype), _cast(bias, kernel_dtype)
    lora_a, lora_b = _cast(lora_a, kernel_dtype), _cast(lora_b, kernel_dtype)
    if torch.compiler.is_compiling():
        seed = _draw_seed_tensor() if dropout > 0.0 else None
        y = _lora_grouped_op(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            index,
            ranks,
            scales,
            bool(fan_in_fan_out),
            float(dropout),
            seed,
        )[0]
    else:
        seed = draw_dropout_seed() if dropout > 0.0 else 0
        y = _lora_grouped_apply(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            index,
            LoraGroupedSettings(
                tuple(ranks), tuple(scales), bool(fan_in_fan_out), float(dropout), seed
            ),
        )
    return _cast(y, dtype)
