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


#: the fused result may also be this many times as far from float64 as eager PyTorch is in the same precision:
#: in fp16 / bf16 tiny cases, where a single rounding dominates the relative error; in any precision an
#: ill-conditioned result, e.g. a per-adapter scale's gradient summed over one row of d products that cancel
#: to 1e-3 of their magnitude (eager fp32 itself is then 3e-5 off, past TOL's 1e-5)
EAGER_FACTOR = 4.0
#: eager's error is the largest over this many nearby cases: the case itself, then its inputs each moved by about
#: one rounding step of their dtype. On one ill-conditioned number, one case's rounding can land lucky for eager
#: (an fp16 bank gradient whose row of d_h summed to 1/56 of its terms came out 13x closer in eager than fused)
EAGER_DRAWS = 4


def bound(tol: float, eager_err: float = 0.0) -> float:
    """The relative error allowed against float64: tol, or EAGER_FACTOR x eager's own error in the same precision
    (eager_errors) where that is larger."""
    return max(tol, EAGER_FACTOR * eager_err)


def nearby(v: torch.Tensor, k: int) -> torch.Tensor:
    """Draw k of an input for eager_errors: k = 0 the value itself, else each element moved by about one rounding
    step of its dtype, up or down (signs seeded by k)."""
    v = v.detach()
    if k == 0 or not v.is_floating_point():
        return v.clone()
    sign = torch.randint(0, 2, v.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 2 - 1
    return (v.double().cpu() * (1 + torch.finfo(v.dtype).eps * sign)).to(v.dtype).to(v.device)


def eager_errors(run, leaves: dict, grad_names, dy: torch.Tensor, draws: int = EAGER_DRAWS):
    """Eager PyTorch's own error in the case's precision. run(values: dict, hp: bool) -> y evaluates the reference
    on the given leaves (in their dtypes, or with hp in float64 throughout). Returns, for y and then the gradient
    of each of grad_names, (relative errors, largest elementwise errors) against float64, each the largest over
    `draws` nearby cases (nearby)."""
    rel, big = [0.0] * (1 + len(grad_names)), [0.0] * (1 + len(grad_names))
    for k in range(draws):
        lp = {n: nearby(v, k).requires_grad_(n in grad_names) for n, v in leaves.items()}
        hp = {n: v.detach().double().requires_grad_(n in grad_names) for n, v in lp.items()}
        y, y64 = run(lp, False), run(hp, True)
        outs = [y] + _grads(y, [lp[n] for n in grad_names], dy)
        outs64 = [y64] + _grads(y64, [hp[n] for n in grad_names], dy.double())
        for i, (o, o64) in enumerate(zip(outs, outs64)):
            o, o64 = o.detach().double().cpu(), o64.detach().cpu()
            rel[i] = max(rel[i], rel_err(o, o64))
            big[i] = max(big[i], (o - o64).abs().max().item() if o.numel() else 0.0)
    return rel, big


def max_err_vs_eager(out: torch.Tensor, ref64: torch.Tensor, eager_err: float, what: str,
                     dtype: torch.dtype) -> None:
    """The extra fp16 / bf16 bound (docs/design.md, Tolerances): the fused result's largest elementwise error
    against float64 is at most EAGER_FACTOR x eager PyTorch's largest error in the same precision (eager_err, from
    eager_errors), plus one rounding step at the largest magnitude (where eager happens to be exact) and two at
    magnitude 1 (the inputs of make_case are O(1); a reduction that cancels to far below its terms, e.g. the
    sample-scale gradient of one row, carries the rounding of the terms)."""
    ulp = torch.finfo(dtype).eps  # one rounding step of the computation's dtype (x's), relative
    out, ref64 = (t.detach().double().cpu() for t in (out, ref64))
    if ref64.numel() == 0:
        return
    fused_err = (out - ref64).abs().max().item()
    floor = ulp * ref64.abs().max().item() + 2 * ulp
    lim = EAGER_FACTOR * eager_err + floor
    assert fused_err <= lim, (f"{what}: max abs err {fused_err:.3e} > {EAGER_FACTOR} x eager's {eager_err:.3e} "
                              f"+ {floor:.1e}")


#: inputs that y is linear in, each output element through one of their elements (y = skip + sample_scale[b] *
#: scale[...] * adapter(x)): their gradients are plain sums of the terms dy_j * dy_j/dθ_k over rows (and channels)
SUMMED_GRADS = ("scale", "sample_scale")
#: machine epsilons of the computation's dtype allowed relative to the magnitude of the terms such a sum adds
#: (the fp32 sample-scale gradient of one LayerNorm'd row of d = 1000, its terms cancelling to 1/1162 of their
#: magnitude, came out 0.36 eps off; a well-conditioned sum of n random terms cancels to ~1/sqrt(n), so one eps
#: of the terms stays at or below TOL's relative 1e-5 up to n ~ 10^4)
CANCEL_EPS = 1.0


def summed_terms(run, value: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """For an input θ (= value, float64) of SUMMED_GRADS, y = run(θ): per element of θ, sum_j |dy_j dy_j/dθ_k|, the
    magnitude of the terms its gradient adds up. When they cancel, the sum carries their rounding, which eager
    PyTorch may dodge by luck (docs/design.md, Tolerances)."""
    y0 = run(torch.zeros_like(value)).detach()
    v = value.detach().clone().requires_grad_()
    y = run(v)
    if not y.requires_grad:  # θ unused (a bank whose rows all have id -1)
        return torch.zeros_like(v)
    # |y_j - y0_j| = |θ_k| |dy_j/dθ_k|, whose derivative in θ_k is sign(θ_k) |dy_j/dθ_k|
    g, = torch.autograd.grad((dy.abs() * (y - y0).abs()).sum(), v, allow_unused=True)
    return torch.zeros_like(v) if g is None else g.abs()


def check_grad(name: str, g: torch.Tensor, g64: torch.Tensor, lim: float, dtype: torch.dtype, tol: float,
               terms: torch.Tensor | None = None) -> None:
    """||g - g64|| < lim ||g64|| (lim: bound()), or, for a gradient that sums terms of magnitude `terms`
    (summed_terms), CANCEL_EPS machine epsilons of dtype at that magnitude where that is larger (under TF32, tol
    above TOL: TF32's epsilon, 2^-10)."""
    g, g64 = g.detach().double().cpu(), g64.detach().double().cpu()
    num, den = (g - g64).norm().item(), g64.norm().item()
    allowed = lim * den if den > 0 else lim
    if terms is not None:
        step = 2.0 ** -10 if dtype == torch.float32 and tol > TOL[torch.float32] else torch.finfo(dtype).eps
        allowed = max(allowed, CANCEL_EPS * step * terms.double().norm().item())
    assert num < allowed, (f"grad of {name}: rel err {num / max(den, 1e-300):.2e} >= {allowed / max(den, 1e-300):.2e}"
                           f" (||terms|| / ||grad|| = {terms.norm().item() / max(den, 1e-300) if terms is not None else 1:.0f})")


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


def _same(v):
    return v


def _to_double(v):
    return v.double()


def copy_case(t: dict, kwargs: dict, convert=_same, replace: dict | None = None):
    """Leaf copies (converted, same requires_grad) of a case, keeping skip-is-x and the kwargs' identities;
    replace: entries taken as they are instead (in kwargs too)."""
    tc = {k: (convert(v.detach().clone()).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
          for k, v in t.items()}
    tc.update(replace or {})
    kc = dict(kwargs)
    for k, v in kwargs.items():  # tensor kwargs that are entries of t (scale, skip, ...): their copies instead
        if isinstance(v, torch.Tensor):  # (others, e.g. an adapter index, pass as they are)
            name = next((n for n, tv in t.items() if tv is v), None)
            if name is not None:
                kc[k] = tc[name]
    return tc, kc


def to_double(t: dict, kwargs: dict):
    """Upcast copies (leaves, same requires_grad) of a case, keeping skip-is-x identity."""
    return copy_case(t, kwargs, _to_double)


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
    names = [n for n, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    dtype = t["x"].dtype
    low = dtype in (torch.float16, torch.bfloat16)
    if dy is None:
        dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(y)
    # eager PyTorch in the same precision: the yardstick of the extra bound (docs/design.md, Tolerances)
    leaves = {n: v for n, v in t.items() if isinstance(v, torch.Tensor)}
    e_rel, e_big = eager_errors(lambda vals, hp: _call(ref, *copy_case(t, kwargs, _to_double if hp else _same,
                                                                        replace=vals)), leaves, names, dy)
    err, lim = rel_err(y, y64), bound(tol, e_rel[0])
    assert err < lim, f"forward: rel err {err:.2e} >= {lim:.2e}"
    if low:
        max_err_vs_eager(y, y64, e_big[0], "forward", dtype)
    if not names:
        assert y.grad_fn is None
        return y
    grads = _grads(y, [t[n] for n in names], dy)
    grads64 = _grads(y64, [t64[n] for n in names], dy.double())
    for i, (n, g, g64) in enumerate(zip(names, grads, grads64), 1):
        assert g.shape == t[n].shape and g.dtype == t[n].dtype, n
        if low:
            max_err_vs_eager(g, g64, e_big[i], f"grad of {n}", dtype)
        terms = None
        if n in SUMMED_GRADS:
            terms = summed_terms(lambda v: _call(ref, *copy_case(t64, k64, replace={n: v})), t64[n], dy.double())
        check_grad(n, g, g64, bound(tol, e_rel[i]), dtype, tol, terms)
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
