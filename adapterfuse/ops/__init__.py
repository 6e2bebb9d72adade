"""Fused backends: one file per backend, each a pair of torch.library custom ops (forward, backward)
with the shared autograd formula of ``_common`` registered on the forward op. Backends are imported lazily by
``adapterfuse.functional`` so that importing adapterfuse never needs triton, a compiler or a GPU."""
