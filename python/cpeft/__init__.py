"""cpeft: LoRA and IA3 linear and embedding layers with a C core (CPU through OpenBLAS, CUDA
through cuBLAS).

``cpeft.functional`` is the framework-free API (NumPy, torch, CuPy, anything with DLPack).
``import cpeft`` does not import torch: the torch layers (loralib's names plus the IA3 layers) are
loaded on first attribute access.
"""

import ctypes as _ctypes
import os as _os

# OpenBLAS's idle worker threads spin for about 2^28 cycles after each call by default. Beside
# torch's own thread pool that spinning takes the cores torch needs: a LoRA training step of the
# demo measured 0.74 s instead of 0.15 s on 2 cores. 2^4 cycles makes them yield at once; it is
# read when the library loads, so it is set before, and a user's own setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import scipy_openblas32 as _openblas  # noqa: E402

# _C links libscipy_openblas with an rpath into site-packages/scipy_openblas32/lib, which does not
# exist next to an in-place or editable build. Loading the library first by its path makes the
# dynamic loader reuse it (same soname) when _C is imported, wherever _C lives.
_ctypes.CDLL(
    _os.path.join(_openblas.get_lib_dir(), _openblas.get_library(fullname=True)),
    mode=_ctypes.RTLD_GLOBAL,
)

from . import _C as _C  # noqa: E402  (cpeft._C is part of the API: tests and tools call it)
from . import functional  # noqa: E402
from ._C import CudaError, build_info, has_cuda  # noqa: E402

__version__ = "0.1.0"

__all__ = ["CudaError", "build_info", "functional", "has_cuda", "__version__"]

# ---- torch layers: imported lazily so that `import cpeft` stays torch-free -------------------
# The one list of these names: cpeft/_torch_api.py takes its __all__ from here.
_TORCH_NAMES = (
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
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "LoraConfig",
    "IA3Config",
    "get_peft_model",
    "PeftModel",
    "CpeftModel",
    "PeftConfig",
    "TaskType",
    "BaseTunerLayer",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
    "PeftType",
    "inject_adapter_in_model",
    "get_base_model_state_dict",
)
_TORCH_API = frozenset(_TORCH_NAMES)


def __getattr__(name):
    if name in _TORCH_API:
        try:
            from . import _torch_api
        except ModuleNotFoundError as missing:
            if missing.name != "torch":
                raise
            raise ModuleNotFoundError(
                f"cpeft.{name} is a torch layer or API and needs PyTorch, which is not installed "
                "(pip install torch); cpeft.functional works without it",
                name="torch",
            ) from None
        return getattr(_torch_api, name)
    raise AttributeError(f"module 'cpeft' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _TORCH_API)
