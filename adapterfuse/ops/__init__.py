"""Fused backends: one file per backend, each a pair of torch.library custom ops (forward, backward)
wrapped by the shared autograd.Function of ``_common``. Backends are imported lazily by
``adapterfuse.functional`` so that importing adapterfuse never needs triton, a compiler or a GPU."""
