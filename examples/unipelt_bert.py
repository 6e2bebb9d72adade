"""UniPELT-style fine-tuning of a small BERT-style model with AdapterHub `adapters`, unfused vs fused.

UniPELT (Mao et al. 2022; the base of "Parameter-Efficient Fine-Tuning With Adapters", Chen et al. 2024) puts a
gated bottleneck adapter, gated LoRA and gated prefix tuning into every layer. adapterfuse fuses the gated
bottleneck adapter (its gate becomes the fused op's per-sample scale); LoRA and prefix tuning run as
`adapters` runs them. Two identical models are trained for a few steps on the same batches, one as `adapters`
runs it and one after adapterfuse.integrations.adapters_hub.fuse(); their losses agree to float tolerance.

The task is built locally (no download): sequences of random tokens from a 64-token vocabulary, label = whether
token 7 occurs more often than token 9. Runs on CPU in about a minute; on a GPU with --device cuda.

    python examples/unipelt_bert.py [--steps 20] [--device cpu]
"""
import argparse
import copy
import time

import torch


def make_data(n, seq, vocab, generator):
    x = torch.randint(0, vocab, (n, seq), generator=generator)
    y = ((x == 7).sum(1) > (x == 9).sum(1)).long()
    return x, y


def build(device):
    import adapters
    import transformers
    from adapters import UniPELTConfig

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    adapters.init(model)
    model.add_adapter("task", config=UniPELTConfig())
    model.train_adapter("task")  # freezes the backbone; the adapters (and the head) train
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model.to(device)


def train(model, batches, steps, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, times = [], []
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from adapterfuse.integrations import adapters_hub

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(device) for t in make_data(args.batch, args.seq, 64, gen)) for _ in range(8)]
    unfused = build(device)
    fused = copy.deepcopy(unfused)
    report = adapters_hub.fuse(fused)
    print(report)
    l0, t0 = train(unfused, batches, args.steps)
    l1, t1 = train(fused, batches, args.steps)
    print(f"{'step':>4s} {'loss unfused':>13s} {'loss fused':>11s} {'ms unfused':>11s} {'ms fused':>9s}")
    for i, (a, b, ta, tb) in enumerate(zip(l0, l1, t0, t1)):
        print(f"{i:4d} {a:13.6f} {b:11.6f} {ta * 1e3:11.1f} {tb * 1e3:9.1f}")
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(l0, l1))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(f"largest relative loss difference: {worst:.2e}; median step: unfused {med(t0) * 1e3:.1f} ms, "
          f"fused {med(t1) * 1e3:.1f} ms")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
