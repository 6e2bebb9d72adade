"""Test-session set-up. Without a GPU the Triton kernels run under the interpreter on CPU tensors:
TRITON_INTERPRET must be set before triton compiles anything, so it is set here, before any test
module imports adapterfuse. Every kernel output is poisoned with NaN before launch
(ADAPTERFUSE_POISON=1) so an element a kernel forgets to write fails the comparison."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the CUDA backend's kernels and glue run on CPU tensors through the CPU emulation (not a performance
    # path; adapterfuse/ops/_emulation.py), so every backend-parametrised test covers the CUDA code too
    os.environ.setdefault("ADAPTERFUSE_CUDA_EMULATION", "1")
os.environ["ADAPTERFUSE_POISON"] = "1"
