"""Mixed batches: many adapters in one batch (issue 11). The adapter bank (fused_adapter_bank, one call per
direction) against the ways a batch that mixes A adapters runs without it, and against one single-adapter
fused call on the same batch (the cost the bank should stay near whatever A is):

* ``bank``: fused_adapter_bank, ids per sample or per token, w_up in AdapterBank's layout (up-major: the CPU
  kernels read it without a per-adapter transpose; docs/design.md, Adapter bank);
* ``single``: fused_adapter with one adapter on the whole batch (the yardstick: same rows, same bytes);
* ``loop_fused``: a Python loop over the adapters present, each a fused_adapter call on its gathered rows
  (what AdapterHub's BatchSplit and PEFT's mixed-batch ``adapter_names`` do, with our fused op inside);
* ``loop_eager``: the same loop with the eager reference (adapter_bank_reference).

The four run in interleaved rounds (15; each sample a burst of calls lasting ~20 ms) and ``ratio_vs_single``
is the median of the round-by-round ratios (``ratio_q1`` / ``ratio_q3`` their quartiles).

Sizes: a serving batch (16 sequences of 32 tokens) and a training batch (64 x 197, ViT-B/16), d = 768,
r = 8; A in {1, 4, 16, 64}; forward (no grad) and training (forward + backward).

Model level (``run_mixed_model_benchmark``): a BERT-base-width encoder (d = 768, 2 layers on CPU, 12 on a GPU)
whose batch mixes A adapters (one per sample, samples of an adapter contiguous, as BatchSplit needs),
Pfeiffer-position adapters with r = 8 and LoRA r = 8 on the attention output projection (the same trainable
parameter count per layer, 13k vs 12k):

* ``frozen``: the model without adapters (the floor; forward only, nothing in it trains);
* ``hub_batchsplit``: AdapterHub ``adapters`` with a ``BatchSplit`` over the A adapters (its loop);
* ``hub_batchsplit_fused``: the same model after ``adapters_hub.fuse`` (one bank call per site);
* ``af_bank``: ``add_adapters(model, config, adapters=[...])`` with ``adapter_index`` (adapterfuse's own);
* ``peft_lora_mixed``: PEFT LoRA with ``adapter_names`` per sample (forward only: PEFT refuses
  ``adapter_names`` in training mode).
"""
from __future__ import annotations

import statistics
from typing import Callable, List, Optional

import torch

from .timing import as_step, auto_burst, interleaved_samples, paired_ratio

#: (name, B, T): B sequences of T tokens
SIZES = (("serve_16x32", 16, 32), ("train_64x197", 64, 197))
QUICK_SIZES = (("serve_16x32", 16, 32),)
ADAPTERS = (1, 4, 16, 64)
QUICK_ADAPTERS = (1, 16)


def _bank_backend(device: torch.device) -> Optional[str]:
    import adapterfuse

    name = "cpu" if device.type == "cpu" else "triton"
    return name if name in adapterfuse.available_backends() else None


def run_mixed_benchmark(device: torch.device, *, quick: bool = False, d: int = 768, r: int = 8,
                        dtype: torch.dtype = torch.float32, sizes=None, adapters=None,
                        log: Callable[[str], None] = print) -> List[dict]:
    """Rows {size, B, T, M, d, r, A, ids, mode, variant, ms, ratio_vs_single}."""
    from ..functional import fused_adapter, fused_adapter_bank
    from ..reference import adapter_bank_reference

    backend = _bank_backend(device)
    if backend is None:
        log(f"  mixed batches: no adapter-bank kernels for {device.type} tensors yet, skipped")
        return []
    rows: List[dict] = []
    gen = torch.Generator().manual_seed(0)
    for size, b, t in sizes or (QUICK_SIZES if quick else SIZES):
        m = b * t
        for a in adapters or (QUICK_ADAPTERS if quick else ADAPTERS):
            mk = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype)  # noqa: E731
            x0 = mk(b, t, d)
            wd, bd, wu, bu = mk(a, r, d, std=d ** -0.5), mk(a, r), mk(a, d, r, std=0.02), mk(a, d)
            scale = (torch.rand(a, d, generator=gen) + 0.5).to(device=device, dtype=dtype)
            for ids_kind in ("sample", "token"):
                n_ids = b if ids_kind == "sample" else m
                ids = torch.randint(0, a, (n_ids,), generator=gen).to(device)
                row_ids = ids.repeat_interleave(t) if ids_kind == "sample" else ids
                for mode in ("fwd", "train"):
                    train = mode == "train"
                    params = [p.detach().requires_grad_(train) for p in (wd, bd, wu, bu, scale)]
                    pwd, pbd, pwu, pbu, ps = params
                    # the bank's w_up as AdapterBank stores it ([A, r, d] memory seen as [A, d, r]); the single call
                    # and the loops take each adapter's w_up contiguous, as an Adapter stores it
                    bwu = pwu.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(train)
                    x = x0.detach().requires_grad_(train)

                    def bank():
                        return fused_adapter_bank(x, pwd, pbd, bwu, pbu, ids, scale=ps, skip=x, backend=backend)

                    def single():
                        return fused_adapter(x, pwd[0], pbd[0], pwu[0], pbu[0], scale=ps[0], skip=x, backend=backend)

                    def loop_fused():
                        xf = x.reshape(m, d)
                        out = xf.clone()  # one copy, then each adapter's rows written in place
                        for i in torch.unique(row_ids).tolist():
                            sel = (row_ids == i).nonzero().squeeze(1)
                            xs = xf.index_select(0, sel)
                            ys = fused_adapter(xs, pwd[i], pbd[i], pwu[i], pbu[i], scale=ps[i], skip=xs,
                                               backend=backend)
                            out.index_copy_(0, sel, ys)
                        return out.view(x.shape)

                    def loop_eager():
                        return adapter_bank_reference(x, pwd, pbd, pwu, pbu, ids, scale=ps, skip=x)

                    # interleaved rounds, ratios taken round by round (paired_ratio): this machine's speed drifts
                    fns = {name: as_step(fn, train) for name, fn in (("bank", bank), ("single", single),
                                                                     ("loop_fused", loop_fused),
                                                                     ("loop_eager", loop_eager))}
                    times = interleaved_samples(fns, device, burst=auto_burst(fns["single"], device),
                                                samples=5 if quick else 15)
                    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                    for name, v in ms.items():
                        ratio, q1, q3 = paired_ratio(times, name, "single")
                        rows.append(dict(size=size, B=b, T=t, M=m, d=d, r=r, A=a, ids=ids_kind, mode=mode,
                                         variant=name, dtype=str(dtype).replace("torch.", ""), ms=round(v, 4),
                                         ratio_vs_single=round(ratio, 3), ratio_q1=round(q1, 3),
                                         ratio_q3=round(q3, 3)))
                    log(f"  {size:13s} A={a:3d} ids/{ids_kind:6s} {mode:5s} " +
                        "  ".join(f"{k} {v:8.2f}" for k, v in ms.items()) +
                        f"   bank/single {paired_ratio(times, 'bank', 'single')[0]:.2f}x")
    return rows


def mixed_table(rows: List[dict]) -> str:
    from .report import text_table

    return text_table(rows, [("size", "size", "13s"), ("A", "A", "3d"), ("ids", "ids", "6s"), ("mode", "mode", "5s"),
                             ("variant", "variant", "11s"), ("ms", "ms", "9.3f"), ("ratio_vs_single", "xsingle", "8.2f")])


#: (name, B, T) of the model-level section; A in MODEL_ADAPTERS (at most B: one sample per adapter at least)
MODEL_SIZES = (("serve_16x32", 16, 32), ("train_16x128", 16, 128))
MODEL_ADAPTERS = (4, 16)


def _encoder(device, quick: bool, d: int):
    from transformers import BertConfig, BertModel

    layers = 1 if quick else (12 if device.type == "cuda" else 2)
    cfg = BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=max(1, d // 64),
                     intermediate_size=4 * d, vocab_size=1000)
    torch.manual_seed(0)
    return BertModel(cfg).to(device)


def _mixed_models(device, quick: bool, d: int, r: int, names: List[str], sizes: List[int]) -> dict:
    """variant -> (model, forward(model, ids) -> hidden states, trains: bool). Skips what is not installed."""
    import copy

    from ..integrations.hf import add_adapters
    from ..modules import AdapterConfig, adapter_index

    base = _encoder(device, quick, d)
    for p in base.parameters():
        p.requires_grad_(False)
    # (the frozen model has no training step: nothing in it trains)
    models = {"frozen": (base, lambda m, ids, ad: m(input_ids=ids).last_hidden_state, False)}
    own = copy.deepcopy(base)
    add_adapters(own, AdapterConfig.pfeiffer(bottleneck=r), adapters=names)

    def own_fwd(m, ids, ad):
        with adapter_index(m, ad):
            return m(input_ids=ids).last_hidden_state
    models["af_bank"] = (own, own_fwd, True)
    try:
        import adapters
        from adapters import SeqBnConfig
        from adapters.composition import BatchSplit

        from ..integrations import adapters_hub
    except ImportError:
        adapters = None
    if adapters is not None:
        for variant in ("hub_batchsplit", "hub_batchsplit_fused"):
            hub = copy.deepcopy(base)
            adapters.init(hub)
            for n in names:
                hub.add_adapter(n, config=SeqBnConfig(reduction_factor=d // r))
            setup = BatchSplit(*names, batch_sizes=sizes)
            hub.train_adapter(setup)
            hub.set_active_adapters(setup)
            if variant.endswith("fused"):
                adapters_hub.fuse(hub)
            models[variant] = (hub.to(device), lambda m, ids, ad: m(input_ids=ids).last_hidden_state, True)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        get_peft_model = None
    if get_peft_model is not None:
        lcfg = dict(r=r, target_modules=["attention.output.dense"], lora_dropout=0.0)
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(**lcfg), adapter_name=names[0])
        for n in names[1:]:
            lora.add_adapter(n, LoraConfig(**lcfg))
        with torch.no_grad():  # (LoRA's B starts at 0: random B so every adapter computes)
            for n_, p in lora.named_parameters():
                if "lora_B" in n_:
                    p.normal_(std=0.02)
        per_sample = [n for n, k in zip(names, sizes) for _ in range(k)]
        models["peft_lora_mixed"] = (lora.eval(), lambda m, ids, ad: m(input_ids=ids, adapter_names=per_sample)
                                     .last_hidden_state, False)
    return models


def run_mixed_model_benchmark(device: torch.device, *, quick: bool = False, d: int = 768, r: int = 8,
                              sizes=None, adapters=None, log: Callable[[str], None] = print) -> List[dict]:
    """Rows {size, B, T, A, mode, variant, ms, ratio_vs_frozen, adapter_ms (forward), ratio_vs_hub, hub_q1, hub_q3,
    layers}: a batch mixing A adapters through a whole encoder, AdapterHub's BatchSplit (unfused and fused) and
    PEFT's mixed batch against the bank. Ratios are medians of round-by-round ratios (paired_ratio; hub_q1 / hub_q3
    the quartiles of the ratio to hub_batchsplit); adapter_ms is the median of the round-by-round differences to the
    frozen model: what the adapters add, which at this model size is a few % of a noisy whole."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        log("  mixed batches, model level: transformers is not installed, skipped")
        return []
    rows: List[dict] = []
    for size, b, t in sizes or (QUICK_SIZES if quick else MODEL_SIZES):
        for a in adapters or ((4,) if quick else MODEL_ADAPTERS):
            a = min(a, b)
            names = [f"task{i}" for i in range(a)]
            sizes_ = [b // a + (1 if i < b % a else 0) for i in range(a)]
            ad = torch.repeat_interleave(torch.arange(a), torch.tensor(sizes_)).to(device)
            ids = torch.randint(0, 1000, (b, t), generator=torch.Generator().manual_seed(1)).to(device)
            models = _mixed_models(device, quick, d, r, names, sizes_)
            for mode in ("fwd", "train"):
                steps = {}
                for variant, (model, fwd, trains) in models.items():
                    if mode == "train" and not trains:
                        continue
                    model.train(mode == "train" and variant != "peft_lora_mixed")
                    steps[variant] = as_step(lambda m=model, f=fwd: f(m, ids, ad), mode == "train")
                # whole-model calls (tens to hundreds of ms on a CPU): one call per sample, the variants
                # interleaved so that the machine's swings hit them alike, compared round by round
                times = interleaved_samples(steps, device, samples=3 if quick else 11)
                layers = models["frozen"][0].config.num_hidden_layers
                for variant, v in times.items():
                    row = dict(size=size, B=b, T=t, A=a, d=d, r=r, layers=layers, mode=mode, variant=variant,
                               ms=round(statistics.median(v) * 1e3, 3), ratio_vs_frozen=None, adapter_ms=None,
                               ratio_vs_hub=None, hub_q1=None, hub_q3=None)
                    if "frozen" in times:
                        row["ratio_vs_frozen"] = round(paired_ratio(times, variant, "frozen")[0], 3)
                        row["adapter_ms"] = round(statistics.median(
                            [(u - f) * 1e3 for u, f in zip(v, times["frozen"])]), 3)
                    if "hub_batchsplit" in times:
                        q2, q1, q3 = paired_ratio(times, variant, "hub_batchsplit")
                        row.update(ratio_vs_hub=round(q2, 3), hub_q1=round(q1, 3), hub_q3=round(q3, 3))
                    rows.append(row)
                log(f"  model {size:13s} A={a:3d} {mode:5s} " + "  ".join(
                    f"{k} {statistics.median(v) * 1e3:8.1f}" for k, v in times.items()))
    return rows


def mixed_model_table(rows: List[dict]) -> str:
    from .report import text_table

    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [dict(r, xf=fmt(r["ratio_vs_frozen"]), am=fmt(r.get("adapter_ms")), xh=fmt(r["ratio_vs_hub"]))
            for r in rows]
    return text_table(rows, [("size", "size", "13s"), ("A", "A", "3d"), ("mode", "mode", "5s"),
                             ("variant", "variant", "21s"), ("ms", "ms", "9.2f"), ("xf", "xfrozen", ">8s"),
                             ("am", "adapter ms", ">10s"), ("xh", "xhub", ">8s")])
