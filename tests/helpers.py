"""Shared test helpers: building cases, the float64 reference comparison, tolerances (docs/design.md, Tolerances and testing)."""
from __future__ import annotations

import torch

import adapterfuse
from adapterfuse.reference import adapter_reference

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "identity")
SCALE_KINDS = ("float", "scalar", "channel")
SKIP_KINDS = ("none", "x", "other")
GRAD_ARGS = ("x", "w_down", "b_down", "w_up", "b_up", "scale", "skip", "sample_scale")

#: relative error ||out - ref|| / ||ref|| against float64 (docs/design.md, Tolerances and testing)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def fused_backends() -> list:
    return [b for b in ("triton", "cpu", "cuda") if b in adapterfuse.available_backends()]


def device_for(backend: str) -> str:
    if backend in ("cuda", "triton") and torch.cuda.is_available():
        return "cuda"
    # triton under the interpreter; cuda under the CUDA emulation (ADAPTERFUSE_CUDA_EMULATION=1)
    return "cpu"


def dtypes_for(backend: str) -> list:
    dts = [torch.float32, torch.float16]
    if not (backend == "triton" and device_for(backend) == "cpu"):  # the interpreter has no bf16
        dts.append(torch.bfloat16)
    return dts


def tol_for(backend: str, dtype: torch.dtype) -> float:
    if dtype == torch.float32 and backend in ("triton", "cuda") and torch.get_float32_matmul_precision() != "highest":
        return 5e-4  # tf32 dots
    return TOL[dtype]


#: in fp16 / bf16 the fused result may also be this many times as far from float64 as eager PyTorch is in the
#: same precision (tiny cases, where a single rounding dominates the relative error)
EAGER_FACTOR = 4.0


def bound(tol: float, dtype: torch.dtype, eager_err: float = 0.0) -> float:
    """The error allowed against float64: tol, or EAGER_FACTOR x eager's own error in fp16 / bf16."""
    return tol if dtype in (torch.float32, torch.float64) else max(tol, EAGER_FACTOR * eager_err)


def max_err_vs_eager(out: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str,
                     dtype: torch.dtype) -> None:
    """The extra fp16 / bf16 bound (docs/design.md, Tolerances): the fused result's largest elementwise error
    against float64 is at most EAGER_FACTOR x eager PyTorch's largest error in the same precision, plus one
    rounding step at the largest magnitude (where eager happens to be exact) and two at magnitude 1 (the
    inputs of make_case are O(1); a reduction that cancels to far below its terms, e.g. the sample-scale
    gradient of one row, carries the rounding of the terms, which eager may dodge by luck)."""
    ulp = torch.finfo(dtype).eps  # one rounding step of the computation's dtype (x's), relative
    out, eager, ref64 = (t.detach().double().cpu() for t in (out, eager, ref64))
    if ref64.numel() == 0:
        return
    fused_err = (out - ref64).abs().max().item()
    eager_err = (eager - ref64).abs().max().item()
    floor = ulp * ref64.abs().max().item() + 2 * ulp
    lim = EAGER_FACTOR * eager_err + floor
    assert fused_err <= lim, (f"{what}: max abs err {fused_err:.3e} > {EAGER_FACTOR} x eager's {eager_err:.3e} "
                              f"+ {floor:.1e}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    num = (out - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def make_case(shape, d, r, *, dtype=torch.float32, device="cpu", activation="gelu", bias=True,
              scale_kind="channel", skip_kind="x", sample=True, grads=GRAD_ARGS, seed=0):
    """Random inputs (never zeros) for one call. Returns (tensors: dict, kwargs: dict)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, std=1.0, dt=dtype):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dt).to(device)

    t = {"x": rnd(*shape, d),
         "w_down": rnd(r, d, std=1.0 / max(d, 1) ** 0.5),
         "w_up": rnd(d, r, std=1.0 / max(r, 1) ** 0.5),
         "b_down": rnd(r, std=0.5) if bias else None,
         "b_up": rnd(d, std=0.5) if bias else None}
    if scale_kind == "float":
        scale = 0.75
    elif scale_kind == "scalar":
        t["scale"] = rnd(1) + 1.0
    else:
        t["scale"] = rnd(d) + 1.0
    if skip_kind == "other":
        t["skip"] = rnd(*shape, d)
    if sample and len(shape) >= 1:
        b = shape[0]
        g = torch.rand(b, generator=gen, dtype=torch.float64) * 2 + 0.25
        if b > 1:
            g[0] = 0.0  # a dropped sample, as drop-path makes
        t["sample_scale"] = g.float().to(device)
    for name, v in t.items():
        if v is not None and name in grads:
            v.requires_grad_(True)
    kwargs = {"scale": t.get("scale", 0.75) if scale_kind != "float" else scale, "activation": activation,
              "sample_scale": t.get("sample_scale")}
    kwargs["skip"] = {"none": None, "x": t["x"], "other": t.get("skip")}[skip_kind]
    return t, kwargs


def _call(fn, t, kwargs, **extra):
    return fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **kwargs, **extra)


def copy_case(t: dict, kwargs: dict, convert=lambda v: v):
    """Leaf copies (converted, same requires_grad) of a case, keeping skip-is-x and the kwargs' identities."""
    tc = {k: (convert(v.detach().clone()).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
          for k, v in t.items()}
    kc = dict(kwargs)
    for k, v in kwargs.items():  # tensor kwargs that are entries of t (scale, skip, ...): their copies instead
        if isinstance(v, torch.Tensor):  # (others, e.g. an adapter index, pass as they are)
            name = next((n for n, tv in t.items() if tv is v), None)
            if name is not None:
                kc[k] = tc[name]
    return tc, kc


def to_double(t: dict, kwargs: dict):
    """Upcast copies (leaves, same requires_grad) of a case, keeping skip-is-x identity."""
    return copy_case(t, kwargs, lambda v: v.double())


def _grads(y, inputs, dy):
    """autograd.grad, with zeros for inputs the graph does not use (a bank whose rows all have id -1; the
    reference's y is then a constant when there is no skip and no sample_scale)."""
    if not y.requires_grad:
        return [torch.zeros_like(i) for i in inputs]
    gs = torch.autograd.grad(y, inputs, dy, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


def check_against_reference(backend: str, t: dict, kwargs: dict, tol: float, dy=None, fn=None, ref=None):
    """Forward and every gradient of fused_adapter(backend) (or of fn, called like it: e.g. a torch.compile'd
    wrapper, or fused_adapter_bank with ref=adapter_bank_reference) against the reference in float64."""
    ref = ref or adapter_reference
    y = _call(fn or adapterfuse.fused_adapter, t, kwargs, backend=backend)
    t64, k64 = to_double(t, kwargs)
    y64 = _call(ref, t64, k64)
    assert y.shape == y64.shape and y.dtype == t["x"].dtype
    assert rel_err(y, y64) < tol, f"forward: rel err {rel_err(y, y64):.2e} >= {tol}"
    names = [n for n, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    low = t["x"].dtype in (torch.float16, torch.bfloat16)
    if low:  # eager PyTorch in the same precision: the yardstick of the extra bound
        te, ke = copy_case(t, kwargs)
        ye = _call(ref, te, ke)
        max_err_vs_eager(y, ye, y64, "forward", t["x"].dtype)
    if not names:
        assert y.grad_fn is None
        return y
    if dy is None:
        dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(y)
    grads = _grads(y, [t[n] for n in names], dy)
    grads64 = _grads(y64, [t64[n] for n in names], dy.double())
    eager = [0.0] * len(names)
    if low:  # eager PyTorch's own error in this precision
        eager_grads = _grads(ye, [te[n] for n in names], dy)
        eager = [rel_err(g, g64) for g, g64 in zip(eager_grads, grads64)]
        for n, g, ge, g64 in zip(names, grads, eager_grads, grads64):
            max_err_vs_eager(g, ge, g64, f"grad of {n}", t["x"].dtype)
    for n, g, g64, e in zip(names, grads, grads64, eager):
        assert g.shape == t[n].shape and g.dtype == t[n].dtype, n
        err = rel_err(g, g64)
        lim = bound(tol, t["x"].dtype, e)
        assert err < lim, f"grad of {n}: rel err {err:.2e} >= {lim:.2e} (eager in this dtype: {e:.2e})"
    return y


def cpu_backends() -> list:
    """Fused backends that take CPU tensors here (triton only under the interpreter): for the tests of
    integrations and distributed training, which build CPU models."""
    return [b for b in fused_backends() if device_for(b) == "cpu"]


def zero_adapter_outputs(model) -> list:
    """Zero every adapterfuse.Adapter's up-projection (the adapter becomes the identity on its skip);
    returns the adapters."""
    adapters = [m for m in model.modules() if isinstance(m, adapterfuse.Adapter)]
    with torch.no_grad():
        for a in adapters:
            a.up.weight.zero_()
            if a.up.bias is not None:
                a.up.bias.zero_()
    return adapters


def randomize_adapters(model, std: float = 0.3, seed=None) -> None:
    """Random (non-zero) weights for every adapterfuse.Adapter in model (or model itself): N(0, std^2) everywhere,
    the scale around 1. With seed, a private generator (reproducible whatever ran before); else the global RNG."""
    import adapterfuse as af

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, af.Adapter):
                for p in m.parameters():
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
                    p.copy_(noise + (1.0 if p is m.scale else 0.0))


def make_bank_case(shape, d, r, ids, *, adapters, dtype=torch.float32, device="cpu", activation="gelu", bias=True,
                   scale_kind="channel", skip_kind="x", sample=True, seed=0):
    """Random inputs for one fused_adapter_bank call: A stacked adapters, ids ([B] or [M] list / tensor) as the
    adapter_index. Returns (tensors, kwargs) in the form of make_case (the index is a kwarg)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    a = adapters
    t = {"x": rnd(*shape, d),
         "w_down": rnd(a, r, d, std=1.0 / max(d, 1) ** 0.5),
         "w_up": rnd(a, d, r, std=1.0 / max(r, 1) ** 0.5),
         "b_down": rnd(a, r, std=0.5) if bias else None,
         "b_up": rnd(a, d, std=0.5) if bias else None}
    if scale_kind == "adapter":
        t["scale"] = rnd(a) + 1.0
    elif scale_kind == "channel":
        t["scale"] = rnd(a, d) + 1.0
    if skip_kind == "other":
        t["skip"] = rnd(*shape, d)
    if sample:
        g = torch.rand(shape[0], generator=gen, dtype=torch.float64) * 2 + 0.25
        if shape[0] > 1:
            g[0] = 0.0
        t["sample_scale"] = g.float().to(device)
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    kwargs = {"scale": t.get("scale", 0.75), "activation": activation, "sample_scale": t.get("sample_scale"),
              "skip": {"none": None, "x": t["x"], "other": t.get("skip")}[skip_kind],
              "adapter_index": torch.as_tensor(ids, dtype=torch.int64, device=device)}
    return t, kwargs


def make_linear_case(shape, k, d, r, *, dtype=torch.float32, device="cpu", activation="gelu", bias=True,
                     linear_bias=True, scale_kind="channel", residual="before", seed=0, frozen=True):
    """Random inputs for one fused_linear_adapter call, in the form of make_case: t holds x (the Linear's input
    inp, [*shape, k]), the adapter, weight / bias (the frozen Linear: requires_grad unless frozen is False) and
    the residual; kwargs passes weight, bias, residual and residual_position ("before", "after", or "none" for no
    residual). Call with LINEAR_FN / LINEAR_REF."""
    t, kw = make_case(shape, d, r, dtype=dtype, device=device, activation=activation, bias=bias,
                      scale_kind=scale_kind, skip_kind="none", sample=False, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    t["x"] = rnd(*shape, k).requires_grad_()
    t["weight"] = rnd(d, k, std=1.0 / max(k, 1) ** 0.5).requires_grad_(not frozen)
    t["bias"] = rnd(d, std=0.5).requires_grad_(not frozen) if linear_bias else None
    t["residual"] = rnd(*shape, d).requires_grad_() if residual != "none" else None
    kw.pop("sample_scale")
    kw.pop("skip")
    kw.update(weight=t["weight"], bias=t["bias"], residual=t["residual"],
              residual_position="before" if residual == "none" else residual)
    return t, kw


def LINEAR_FN(x, w_down, b_down, w_up, b_up, weight, bias, **kw):
    """fused_linear_adapter called in make_case's argument order (check_against_reference's fn)."""
    return adapterfuse.fused_linear_adapter(x, weight, bias, w_down, b_down, w_up, b_up, **kw)


def LINEAR_REF(x, w_down, b_down, w_up, b_up, weight, bias, **kw):
    from adapterfuse.reference import linear_adapter_reference

    return linear_adapter_reference(x, weight, bias, w_down, b_down, w_up, b_up, **kw)
