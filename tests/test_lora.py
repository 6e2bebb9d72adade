"""LoRALinear: PEFT's maths, exact merge in float64, exact unmerge, safe merge."""
import pytest
import torch

import adapterfuse as af


def test_matches_peft_maths_and_merges_exactly_in_float64():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, dtype=torch.float64)
    lora = af.LoRALinear(base, r=3, alpha=6)
    torch.nn.init.normal_(lora.lora_B)
    original = base.weight.detach().clone()
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = x @ original.t() + base.bias + (x @ lora.lora_A.t() @ lora.lora_B.t()) * 2.0
    y = lora(x)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    lora.merge()
    assert lora.merged and torch.allclose(lora(x), y, rtol=1e-12, atol=1e-12)
    lora.unmerge()
    assert not lora.merged and torch.equal(base.weight, original)  # bit for bit


def test_base_frozen_lora_trains():
    lora = af.LoRALinear(torch.nn.Linear(8, 8), r=2)
    assert not lora.base.weight.requires_grad and lora.lora_A.requires_grad and lora.lora_B.requires_grad
    assert torch.all(lora.lora_B == 0)  # starts as the identity on the base layer


def test_safe_merge_refuses_non_finite():
    lora = af.LoRALinear(torch.nn.Linear(4, 4), r=2)
    with torch.no_grad():
        lora.lora_B.fill_(float("inf"))
    before = lora.base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        lora.merge()
    assert torch.equal(lora.base.weight, before) and not lora.merged


def test_bad_arguments():
    with pytest.raises(TypeError):
        af.LoRALinear(torch.nn.Conv1d(2, 2, 1), r=2)
    with pytest.raises(ValueError):
        af.LoRALinear(torch.nn.Linear(2, 2), r=0)
