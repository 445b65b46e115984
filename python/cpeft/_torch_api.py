"""What ``import cpeft as lora`` exposes when torch is installed: loralib's public names plus
the IA3 layers, and the peft-style API. cpeft/__init__.py re-exports these lazily so that ``import cpeft`` alone does
not import torch."""

from . import _TORCH_NAMES
from .layers import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvLoRA,
    Embedding,
    IA3Embedding,
    IA3Layer,
    IA3Linear,
    Linear,
    LoRALayer,
    MergedLinear,
)
from .peft import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    CpeftModel,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    PeftType,
    TaskType,
    get_base_model_state_dict,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from .tuners import BaseTunerLayer
from .utils import lora_state_dict, mark_only_lora_as_trainable

__all__ = list(_TORCH_NAMES)
