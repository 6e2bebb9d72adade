"""`python -m adapterfuse.info`: versions, the backends usable on this machine, and why the others are not."""
import platform
import sys

import torch

import adapterfuse
from adapterfuse.functional import backend_status


def collect() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "adapterfuse": adapterfuse.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": backend_status(),
    }
    from adapterfuse.ops import _extension, registry

    # which ops each fused backend has kernels for (the others run the reference under "auto", raise when forced)
    ops = (("adapter_ln_dropout", "ln_dropout"), ("adapter_bank", "bank"), ("linear_adapter", "linear"))
    info["ops"] = {name: ["adapter"] + [op for op, attr in ops if getattr(registry.get(name), attr, None) is not None]
                   for name in registry.MODULES}

    status = info["backends"].get("cpu")
    mod = _extension._load_cached()[0] if status is None else None  # built: loading it compiles nothing
    info["extension_build"] = dict(mod.build_info()) if mod is not None else (status or "unavailable")
    return info


def main() -> None:
    info = collect()
    for key, value in info.items():
        if key in ("backends", "ops"):
            continue
        print(f"{key:16s} {value}")
    print("backends:")
    for name, why in info["backends"].items():
        from adapterfuse.ops._extension import NOT_BUILT

        state = "available" if why is None else ("available (" + why + ")" if why == NOT_BUILT else "unavailable: " + why)
        ops = info["ops"].get(name)
        print(f"  {name:8s} {state}" + (f"; kernels for: {', '.join(ops)}" if ops else ""))
    from adapterfuse.ops import _emulation

    if _emulation.enabled():
        print(f"note: {_emulation.ENV}=1: backend 'cuda' runs the CUDA kernels on CPU tensors through the CPU "
              "emulation (csrc/emulation/), which exists to test their correctness without a GPU; it is not a "
              "performance path")


if __name__ == "__main__":
    main()
