"""The package surface without torch: the functional API works and the torch names fail with a
message that says what to install."""

import subprocess
import sys
import textwrap

import pytest


def test_torch_names_without_torch_say_what_is_missing():
    # None in sys.modules makes `import torch` fail as if torch were not installed.
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        import cpeft
        from cpeft import functional as F
        y, _ = F.lora_linear_forward(np.ones((2, 3)), np.ones((4, 3)), None, np.ones((1, 3)),
                                     np.ones((4, 1)), 0.5)
        assert y.shape == (2, 4) and float(y[0, 0]) == 4.5, y
        for name in ("Linear", "LoraConfig", "get_peft_model"):
            try:
                getattr(cpeft, name)
            except ModuleNotFoundError as error:
                assert "needs PyTorch" in str(error) and error.name == "torch", error
            else:
                raise AssertionError(name + " resolved without torch")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_torch_without_the_dlpack_exchange_api_is_refused_by_version_and_numpy_still_works():
    """torch < 2.10 (simulated by removing the table) gets an ImportError that names the version
    needed; the NumPy API, which never imports the layers, is untouched."""
    pytest.importorskip("torch")
    script = textwrap.dedent("""
        import torch
        del torch.Tensor.__dlpack_c_exchange_api__
        import numpy as np
        import cpeft
        from cpeft import functional as F
        y, _ = F.lora_linear_forward(np.ones((2, 3)), np.ones((4, 3)), None, np.ones((1, 3)),
                                     np.ones((4, 1)), 0.5)
        assert float(y[0, 0]) == 4.5, y
        try:
            cpeft.Linear
        except ImportError as error:
            assert "torch >= 2.10" in str(error) and torch.__version__ in str(error), error
        else:
            raise AssertionError("cpeft.Linear resolved")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_supported_dtypes_is_what_the_cpu_boundary_accepts():
    """cpeft._C.supported_dtypes() is the table Python reads (cpeft._autograd.core_dtype); each
    float dtype torch has is accepted by the CPU boundary exactly when the table lists it, and
    the refusal names the listed dtypes."""
    import pytest
    import torch

    from cpeft import _C
    from cpeft import functional as F

    table = _C.supported_dtypes()
    assert set(table) == {"cpu", "cuda"} and set(table["cpu"]) < set(table["cuda"])
    for name in ("float16", "bfloat16", "float32", "float64"):
        dtype = getattr(torch, name)
        args = (
            torch.ones(2, 3, dtype=dtype),
            torch.ones(4, 3, dtype=dtype),
            None,
            torch.ones(1, 3, dtype=dtype),
            torch.ones(4, 1, dtype=dtype),
            0.5,
        )
        if name in table["cpu"]:
            y, _ = F.lora_linear_forward(*args)
            assert y.dtype == dtype and float(y[0, 0]) == 4.5
        else:
            listed = " or ".join(table["cpu"])
            expected = f"x must have dtype {listed} on the CPU, got {name}"
            with pytest.raises(ValueError, match=expected):
                F.lora_linear_forward(*args)


def test_accumulation_dtypes_is_what_the_merge_boundary_takes_as_delta():
    """cpeft._C.accumulation_dtypes() names, for every float dtype the kernels take, the dtype of
    a LoRA merge's ΔW scratch (cpeft.functional allocates it from the table): on the CPU the
    boundary takes exactly that dtype as `delta` and refuses the other float dtype, naming it."""
    import numpy as np
    import pytest

    from cpeft import _C

    table = _C.accumulation_dtypes()
    assert set(table) == set(_C.supported_dtypes()["cuda"])
    assert set(table.values()) <= set(_C.supported_dtypes()["cpu"])
    for name in _C.supported_dtypes()["cpu"]:
        weight = np.ones((4, 3), name)
        a, b = np.ones((1, 3), name), np.ones((4, 1), name)
        want = table[name]
        delta = np.empty(12, want)
        assert _C.lora_merge(weight, a, b, 0.5, count_only=True, delta=delta) >= 0
        other = "float64" if want == "float32" else "float32"
        with pytest.raises(ValueError, match=f"delta must have dtype {want}"):
            _C.lora_merge(weight, a, b, 0.5, count_only=True, delta=np.empty(12, other))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64"])
def test_fp32_adapter_compute_dtypes_is_what_the_boundary_takes(device, name):
    """cpeft._C.fp32_adapter_compute_dtypes() is the table Python reads
    (cpeft._autograd._FP32_ADAPTER_DTYPES); with x and weight of dtype `name`, the LoRA linear
    forward and backward take float32 lora_a and lora_b exactly when the table lists `name` (or it
    is float32 itself) and the device's kernels take `name`. On the CPU, whose kernels take
    neither listed dtype, a listed x is refused for its own dtype, and float64 for the adapters'."""
    import torch

    from cpeft import _C, _autograd
    from cpeft import functional as F

    table = _C.fp32_adapter_compute_dtypes()
    assert _autograd._FP32_ADAPTER_DTYPES == tuple(getattr(torch, t) for t in table)
    supported = _C.supported_dtypes()
    assert set(table) <= set(supported["cuda"]) - {"float32"}
    dtype = getattr(torch, name)
    x, weight = torch.ones(2, 3, dtype=dtype), torch.ones(4, 3, dtype=dtype)
    lora_a, lora_b = torch.ones(1, 3), torch.ones(4, 1)
    grad_out, xa = torch.ones(2, 4, dtype=dtype), torch.ones(2, 1, dtype=dtype)
    x, weight, lora_a, lora_b, grad_out, xa = (
        t.to(device) for t in (x, weight, lora_a, lora_b, grad_out, xa)
    )

    def forward():
        return F.lora_linear_forward(x, weight, None, lora_a, lora_b, 0.5)

    def backward():
        return F.lora_linear_backward(grad_out, x, weight, lora_a, lora_b, xa, 0.5)

    if name not in supported[device]:
        listed = " or ".join(supported[device])
        expected = f"x must have dtype {listed} on the CPU, got {name}"
    elif name in table or name == "float32":
        y, _ = forward()
        assert y.dtype == dtype and float(y[0, 0]) == 4.5
        grads = backward()
        assert grads.lora_a.dtype == grads.lora_b.dtype == torch.float32
        assert float(grads.lora_a[0, 0]) == 4.0 and float(grads.lora_b[0, 0]) == 1.0
        return
    else:
        expected = f"lora_a must have the same dtype as weight \\({name}\\), got float32"
    for call in (forward, backward):
        with pytest.raises(ValueError, match=expected):
            call()
