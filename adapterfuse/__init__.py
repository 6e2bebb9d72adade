"""adapterfuse: fused bottleneck adapters (Houlsby, Pfeiffer, parallel, Adapter+) for PyTorch.

Public API (everything else is internal):
    fused_adapter, available_backends, backend_status   the functional op and its backends (layer_norm= and
    has_ln_dropout_kernels                               dropout= fuse the adapter's input LayerNorm and dropout)
    fused_adapter_bank, has_bank_kernels                 many adapters in one batch, in one call (adapter bank)
    fused_linear_adapter                                 a frozen Linear and an adapter on its output, one kernel
    reference.adapter_reference                         the pure-torch reference
    Adapter, AdapterConfig, LoRALinear                   drop-in modules, presets, the LoRA baseline
    AdapterBank, adapter_index                           many adapters in one module (fused_adapter_bank), and
                                                         which one each sample uses inside a model
    add_adapters, remove_adapters                        fused adapters into a transformers / timm model, and out
    AdaptedLinear, fuse_for_inference,                   the adapter inside the frozen Linear (fused_linear_adapter)
    unfuse_for_inference                                 for a module, and for every pair add_adapters made
    merge, unmerge                                       exact merges into weights for inference (adapterfuse.merge
                                                         is the module, callable as merge(model))
"""
from . import merge
from . import merge as merging  # the name 0.1 exported for the module
from . import reference
from .functional import (available_backends, backend_status, fused_adapter, fused_adapter_bank, fused_linear_adapter,
                         has_bank_kernels, has_ln_dropout_kernels)
from .inference import AdaptedLinear, fuse_for_inference, unfuse_for_inference
from .integrations.hf import add_adapters, remove_adapters
from .merge import unmerge
from .modules import Adapter, AdapterBank, AdapterConfig, LoRALinear, adapter_index

__version__ = "0.1.0"

__all__ = ["fused_adapter", "fused_adapter_bank", "fused_linear_adapter", "has_bank_kernels", "has_ln_dropout_kernels",
           "available_backends",
           "backend_status", "reference", "Adapter", "AdapterBank", "adapter_index", "AdapterConfig", "LoRALinear",
           "AdaptedLinear", "fuse_for_inference", "unfuse_for_inference", "add_adapters", "remove_adapters", "merge", "unmerge", "merging", "__version__"]
