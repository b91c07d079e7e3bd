"""benchmarks/trunk_speed.py: the compiled trunk of its ``--compile`` column computes what the eager one does."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_vit
from querytune.trunk.features import extract_features
from querytune.trunk.precision import Precision

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trunk_speed.py"


def load_script():
    spec = importlib.util.spec_from_file_location("trunk_speed", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor compiles the CPU trunk with a C++ compiler")
def test_compiled_trunk_matches_eager_features():
    backbone = tiny_vit(layer_scale=True).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    compiled = load_script().compiled_trunk(backbone, Precision.FP32)(images)
    eager = extract_features(backbone, images, with_layers=False, dtype=torch.float32).pooled
    assert compiled.shape == eager.shape
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
