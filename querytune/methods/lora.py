"""LoRA: low-rank updates of the attention query and value projections (Hu et al., ICLR 2022).

In every block, the fused ``attn.qkv`` projection W (3D x D) becomes

    W' = W + (alpha / r) [B_q A_q ; 0 ; B_v A_v]

with A (r x D) initialised like loralib (kaiming-uniform, a = sqrt(5), i.e.
U(-1/sqrt(D), 1/sqrt(D))) and B (D x r) zero, so a new model equals the backbone
exactly. Dropout (``lora_dropout``) applies to the input of the low-rank path only.
The backbone stays frozen; A, B and a new linear head on the final class token train.

Inference: switching to eval mode merges W' into one weight per block (kept beside
the frozen W, which is never modified, so the backbone object stays shareable), so
evaluation costs exactly a backbone forward; train mode drops the merged copy. Saved
adapters hold the unmerged A and B.

Defaults: rank 8 and alpha 8 (scale 1, i.e. no extra scaling) on q and v, no dropout,
as NOAH's VTAB-1k "LoRA-8" baseline (Zhang et al. 2022; github.com/ZhangYuanhan-AI/NOAH,
experiments/LoRA/ViT-B_prompt_lora_8.yaml, model/module/qkv_super_prompt.py).
Training as in NOAH's VTAB-1k LoRA script (configs/LoRA/VTAB/slurm_train_lora_vtab.sh):
AdamW, lr 5e-3 x batch / 512 (6.25e-4 at batch 64), weight decay 1e-4, batch 64,
100 epochs, no augmentation.

PEFT (``querytune export --format peft``): Hugging Face ViT/DeiT/DINOv2 keep q, k and v as
separate linear layers, so PEFT's ``LoraConfig(r, lora_alpha, target_modules=[q, v])`` on those
two layers is the very same update (PEFT's scale is lora_alpha / r too), with no fused-qkv
workaround (such as a block-structured rank-2r update of a timm qkv).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..errors import ConfigError
from ..options import option
from ..trunk import TrunkInput
from .base import Method
from .registry import register


@dataclass
class LoRAOptions:
    lora_rank: int = option(8, "rank r of the q and v updates", min=1)
    lora_alpha: float = option(8.0, "the updates are scaled by alpha / r", min=0, min_open=True)
    lora_dropout: float = option(0.0, "dropout on the low-rank path's input", min=0, max=1, max_open=True)


class LoRAQKV(nn.Module):
    """A fused qkv projection with rank-r updates of its q and v parts.

    ``weight`` and ``bias`` are the *effective* ones, so code that reads the projection's
    weights directly (:meth:`Block.forward_rows`) sees the adapted projection.
    """

    merged_weight: Tensor | None

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        dim = base.in_features
        bound = 1 / math.sqrt(dim)  # kaiming_uniform_(a=sqrt(5)) on an (r, D) matrix
        self.lora_a = nn.Parameter(torch.empty(2, rank, dim, device=base.weight.device).uniform_(-bound, bound))
        self.lora_b = nn.Parameter(torch.zeros(2, dim, rank, device=base.weight.device))  # [q, v]
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        # The merged weight while in eval mode; a buffer so that it follows .to(device).
        self.register_buffer("merged_weight", None, persistent=False)

    def delta_weight(self) -> Tensor:
        """(alpha / r) [B_q A_q ; 0 ; B_v A_v], shape (3D, D)."""
        delta_q, delta_v = (self.lora_b @ self.lora_a) * self.scaling
        return torch.cat([delta_q, torch.zeros_like(delta_q), delta_v])

    @property
    def weight(self) -> Tensor:
        return self.merged_weight if self.merged_weight is not None else self.base.weight + self.delta_weight()

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, self.base.bias)
        q, k, v = self.base(x).chunk(3, dim=-1)
        h = self.dropout(x)
        q = q + F.linear(F.linear(h, self.lora_a[0]), self.lora_b[0]) * self.scaling
        v = v + F.linear(F.linear(h, self.lora_a[1]), self.lora_b[1]) * self.scaling
        return torch.cat([q, k, v], dim=-1)

    def merge(self) -> None:
        with torch.no_grad():
            self.merged_weight = self.base.weight + self.delta_weight()

    def unmerge(self) -> None:
        self.merged_weight = None

    def train(self, mode: bool = True) -> LoRAQKV:
        super().train(mode)
        if mode:
            self.unmerge()
        else:
            self.merge()
        return self


def add_lora(backbone: VisionTransformer, options: LoRAOptions) -> None:
    """Wrap every block's qkv projection in a :class:`LoRAQKV` (the backbone stays frozen)."""
    width = backbone.config.embed_dim
    if options.lora_rank > width:  # an update of a (D, D) projection has rank D at most
        raise ConfigError(f"--lora-rank {options.lora_rank}: must be at most the backbone's width {width}")
    for block in backbone.blocks:
        qkv = block.attn.qkv
        if isinstance(qkv, LoRAQKV):
            raise ConfigError("the backbone already carries LoRA; build each method on a freshly loaded backbone")
        if type(qkv) is not nn.Linear:
            raise ConfigError("the backbone already carries another method's adapters; build each method on a "
                              "freshly loaded backbone")
        block.attn.qkv = LoRAQKV(qkv, options.lora_rank, options.lora_alpha, options.lora_dropout)


@register
class LoRA(Method):
    name = "lora"
    reads = TrunkInput.IMAGES
    not_mergeable = None  # the update merges into qkv
    peft_exportable = True
    Options = LoRAOptions
    train_defaults = {"epochs": 100, "warmup_epochs": 10, "batch_size": 64, "optimizer": "adamw",
                      "lr": 5e-3 * 64 / 512, "weight_decay": 1e-4}
    search_grid = {"lr": (5e-3, 1e-3, 5e-4, 1e-4), "weight_decay": (1e-4, 0.0)}  # AdamW

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: LoRAOptions) -> None:
        super().__init__(backbone, num_classes, options)
        add_lora(backbone, options)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def to_peft(self, hf_model: nn.Module, modules_to_save: list[str]) -> Any:
        """A PEFT LoRA model of ``hf_model`` on its query and value projections, holding this run's factors."""
        import peft  # an optional dependency (querytune[peft])

        options = self.options
        config = peft.LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha,
                                 lora_dropout=options.lora_dropout, target_modules=_hf_qv_names(hf_model),
                                 modules_to_save=modules_to_save, bias="none")
        peft_model = peft.get_peft_model(hf_model, config)
        with torch.no_grad():
            for name, module in peft_model.named_modules():
                match = _HF_QV.fullmatch(name)
                if match is None:
                    continue
                qkv = self.backbone.blocks[int(match[1])].attn.qkv
                assert isinstance(qkv, LoRAQKV)
                part = 0 if match[2] in ("q_proj", "query") else 1
                module.lora_A["default"].weight.copy_(qkv.lora_a[part])
                module.lora_B["default"].weight.copy_(qkv.lora_b[part])
        return peft_model


_HF_QV = re.compile(r".*layers?\.(\d+)\.attention\.(?:attention\.)?(q_proj|v_proj|query|value)")


def _hf_qv_names(model: nn.Module) -> list[str]:
    """The names of a transformers ViT's query and value projections: ``query`` and ``value`` in
    transformers 4, ``q_proj`` and ``v_proj`` in transformers 5."""
    return sorted({match[2] for name, _ in model.named_modules() if (match := _HF_QV.fullmatch(name))})
