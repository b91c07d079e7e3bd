"""Shared fixtures: tiny random ViTs, a tiny VTAB-layout task, and the ../shared folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from querytune.backbones.vit import VisionTransformer, ViTConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
DINOV2_SMALL = SHARED / "weights" / "dinov2-small-imgfocus"
VTAB_MINI = SHARED / "data" / "vtab1k-mini"


def import_timm():
    """timm, imported with the test-only ``torchvision`` stand-in (tests/torchvision_stub.py) where no
    torchvision is installed; skips where timm itself is absent (it is installed with ``--no-deps``)."""
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)", allow_module_level=True)
    if importlib.util.find_spec("torchvision") is None:
        import torchvision_stub

        return torchvision_stub.import_with_stand_in("timm")
    import timm

    return timm


def require_shared(path: Path) -> Path:
    """Integration tests read the real weights and data from ../shared; skip, saying why, where absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared folder must sit beside the checkout)")
    return path


def tiny_vit(layer_scale: bool = False, num_reg_tokens: int = 0, seed: int = 0, **overrides) -> VisionTransformer:
    """A small random ViT whose norms and LayerScales are not at their identity init."""
    torch.manual_seed(seed)
    config = ViTConfig(**{"image_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 4,
                          "layer_scale": layer_scale, "num_reg_tokens": num_reg_tokens, "name": "tiny", **overrides})
    model = VisionTransformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith(("norm1.bias", "norm2.bias", "norm.bias")):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval().requires_grad_(False)


def tiny_siglip(seed: int = 0, **overrides) -> VisionTransformer:
    """:func:`tiny_vit` shaped like SigLIP: no class token, pooled by its attention-pooling (MAP) head,
    whose latent query is moved off zero."""
    model = tiny_vit(seed=seed, class_token=False, map_pool=True, pos_embed_prefix=0, **overrides)
    assert model.attn_pool is not None
    with torch.no_grad():
        model.attn_pool.latent.normal_()
    return model


ROPE_FAMILIES = {
    "eva02": {"rope": "eva", "rope_grid": 3, "swiglu": True, "mlp_norm": True},
    "dinov3": {"rope": "dinov3", "rope_temperature": 100.0, "absolute_pos_embed": False, "pos_embed_prefix": 0,
               "num_reg_tokens": 2, "layer_scale": True},
}


# Each family's ViTConfig options as its loaders read them (tests/test_families.py, test_timm_parity.py check the
# reading): what :func:`tiny_family` builds, for the tests that run every method and export on every family
FAMILIES = {
    "clip": {"norm_pre": True, "patch_bias": False, "act": "quick_gelu", "norm_eps": 1e-5},
    "siglip": {"class_token": False, "map_pool": True, "pos_embed_prefix": 0, "act": "gelu_tanh"},
    "dinov3": ROPE_FAMILIES["dinov3"],
    "eva02": ROPE_FAMILIES["eva02"],
    "mae": {"global_pool": True},  # the fine-tuned checkpoint's fc_norm: mean pooling
    "msn": {},  # a plain ViT
    "dinov2_swiglu": {"swiglu": True, "layer_scale": True},
    "gelu_new": {"act": "gelu_tanh"},
}


def tiny_family(family: str, seed: int = 0) -> VisionTransformer:
    """A two-block :func:`tiny_vit` shaped like ``family`` (:data:`FAMILIES`); RoPE families as :func:`tiny_rope`,
    SigLIP as :func:`tiny_siglip`."""
    if family in ROPE_FAMILIES:
        return tiny_rope(family, seed, depth=2)
    if family == "siglip":
        return tiny_siglip(seed, depth=2, act="gelu_tanh")
    return tiny_vit(seed=seed, depth=2, **FAMILIES[family])


def tiny_rope(family: str, seed: int = 0, **overrides) -> VisionTransformer:
    """:func:`tiny_vit` shaped like EVA-02 or DINOv3 (rotary position embeddings, :data:`ROPE_FAMILIES`), with
    random q/k/v biases: with RoPE even the key bias shows in the attention."""
    model = tiny_vit(seed=seed, **ROPE_FAMILIES[family], **overrides)
    with torch.no_grad():
        for block in model.blocks:
            bias = block.attn.qkv.bias
            assert bias is not None
            bias.normal_()
    return model


def write_task(root: Path, classes: int = 3, per_split: dict[str, int] | None = None, size: int = 24,
               seed: int = 0) -> Path:
    """A VTAB-1k layout task whose classes differ by colour, so a probe can learn them."""
    per_split = per_split or {"train800": 12, "val200": 6, "test": 9}
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(classes, 3))
    root.mkdir(parents=True)
    lists: dict[str, list[str]] = {}
    for split, count in per_split.items():
        (root / "images" / split).mkdir(parents=True)
        lines = []
        for i in range(count):
            label = i % classes
            pixels = np.clip(colours[label] + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            rel = f"images/{split}/{i:05d}.jpg"
            Image.fromarray(pixels).save(root / rel)
            lines.append(f"{rel} {label}")
        lists[split] = lines
    if "train800" in lists and "val200" in lists:
        lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(f"class{c}" for c in range(classes)) + "\n")
    return root


@pytest.fixture
def tiny_task(tmp_path: Path) -> Path:
    return write_task(tmp_path / "tiny")


@pytest.fixture
def tiny_backbone_dir(tmp_path: Path) -> Path:
    """A tiny random ViT saved as a timm-format checkpoint (its config in the metadata)."""
    from querytune.backbones import save_backbone

    path = tmp_path / "tiny-vit.safetensors"
    save_backbone(tiny_vit(layer_scale=True), path)
    return path


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode; returns a function creating a repo snapshot folder.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into its constants at import time and
    consults the constants at call time, so both the environment and the constants are set.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for name, env, value in (("HF_HUB_CACHE", str(cache), str(cache)), ("HF_HUB_OFFLINE", "1", True)):
        monkeypatch.setenv(name, env)
        monkeypatch.setattr(constants, name, value)

    def add_repo(repo_id: str) -> Path:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        return snapshot

    return add_repo


@pytest.fixture(autouse=True)
def private_feature_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI caches features under $QUERYTUNE_CACHE by default: keep each test's cache its own."""
    path = tmp_path / "feature-cache"
    monkeypatch.setenv("QUERYTUNE_CACHE", str(path))
    return path


@pytest.fixture(autouse=True)
def float32_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--precision auto`` means float32 in the tests (and in the processes they start), whatever this
    CPU computes natively, so that the tests compute alike on every machine; tests of ``auto`` unset it."""
    monkeypatch.setenv("QUERYTUNE_PRECISION", "fp32")


def assert_matches_reference(module: torch.nn.Module, fast: torch.Tensor, naive, grad_floor: float = 0.0) -> dict:
    """The efficient path's logits ``fast`` equal the naive reference's ``naive()``, and so do the
    gradients of a random linear loss for every trainable parameter of ``module``.

    float32 tolerances: 1e-5 for logits; for gradients 1e-5 relative to each gradient's scale,
    floored at ``grad_floor`` times the largest (for parameters whose true gradient is 0, where
    autograd returns rounding noise). Returns the efficient path's gradients.
    """
    weights = torch.randn(fast.shape)
    (fast * weights).sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad()
    reference = naive()
    (reference * weights).sum().backward()
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    largest = max(p.grad.abs().max().item() for p in module.parameters() if p.requires_grad)
    for name, param in module.named_parameters():
        if param.requires_grad:
            scale = max(param.grad.abs().max().item(), grad_floor * largest)
            torch.testing.assert_close(fast_grads[name], param.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    return fast_grads


def train_a_few_steps(method: torch.nn.Module, inputs, labels: torch.Tensor, steps: int = 5,
                      lr: float = 0.05) -> list[float]:
    """Plain SGD steps of ``method`` on one batch; returns the losses, which training should lower."""
    method.train()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(method(inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with small noise added to every parameter and saved buffer of floating type (eval mode; a
    buffer that is not saved, such as DINOv3's rotary frequencies, is computed from the config), so that a
    wrong mapping of its weights shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn_like(tensor))
    return model.eval()
