"""The examples under examples/ run (a few steps) and do what they say."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unipelt_example_losses_agree(capsys):
    pytest.importorskip("adapters", exc_type=ImportError)
    pytest.importorskip("transformers")
    example = _load("unipelt_bert")
    assert example.main(["--steps", "3", "--batch", "4", "--seq", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fused 4 bottleneck adapters" in out and "largest relative loss difference" in out
