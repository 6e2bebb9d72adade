"""adapterfuse: fused bottleneck adapters (Houlsby, Pfeiffer, parallel, Adapter+) for PyTorch.

Public API (everything else is internal):
    fused_adapter, available_backends, backend_status   the functional op and its backends
    reference.adapter_reference                         the pure-torch reference
    Adapter, AdapterConfig                               drop-in modules and presets
"""
from . import reference
from .functional import available_backends, backend_status, fused_adapter
from .modules import Adapter, AdapterConfig

__version__ = "0.1.0"

__all__ = ["fused_adapter", "available_backends", "backend_status", "reference", "Adapter", "AdapterConfig",
           "__version__"]
