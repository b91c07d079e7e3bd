"""Naive reference formulations, as the methods' published code executes them.

Extra tokens are concatenated into the sequence, an attention mask keeps them from
disturbing the original tokens, and autograd runs through the whole backbone. The
block arithmetic is written out here from the block's weights, independently of
:meth:`Block.forward` and :meth:`Block.forward_rows`, so tests can check the
efficient paths against it and the benchmark can measure what it costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones.vit import Block, VisionTransformer
from .trunk import TrunkInput

NEG_INF = float("-inf")


def _layer_scale(module: torch.nn.Module, x: Tensor) -> Tensor:
    gamma = getattr(module, "gamma", None)
    return x * gamma if gamma is not None else x


def naive_block_parts(block: Block, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One pre-norm block over the whole sequence ``x`` with an additive attention ``mask`` (N, N):
    (output, attention branch, MLP branch), the branches before their residuals."""
    dim = x.shape[-1]
    heads = block.attn.num_heads
    u = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q, k, v = F.linear(u, block.attn.qkv.weight, block.attn.qkv.bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, dim // heads)).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * (dim // heads) ** -0.5
    if mask is not None:
        logits = logits + mask
    attended = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
    attn = _layer_scale(block.ls1, F.linear(attended, block.attn.proj.weight, block.attn.proj.bias))
    a = x + attn
    h = F.layer_norm(a, (dim,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    h = F.linear(F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)),
                 block.mlp.fc2.weight, block.mlp.fc2.bias)
    mlp = _layer_scale(block.ls2, h)
    if block.mlp_parallel is not None:
        mlp = mlp + block.mlp_parallel(a)
    return a + mlp, attn, mlp


def naive_block(block: Block, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """One pre-norm block over the whole sequence ``x`` with an additive attention ``mask`` (N, N)."""
    return naive_block_parts(block, x, mask)[0]


def final_class_token(backbone: VisionTransformer, x: Tensor) -> Tensor:
    norm = backbone.norm
    return F.layer_norm(x[:, 0], (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def naive_vqt_head_input(method, images: Tensor) -> Tensor:
    """VQT's head input computed the published way: at each query layer the queries are
    appended to the sequence; every row may attend to the original tokens only."""
    backbone, path = method.backbone, method.query_path
    x = backbone.embed(images)
    batch, tokens = x.shape[0], x.shape[1]
    summaries = []
    for index, block in enumerate(backbone.blocks):
        if index not in path.layer_ids:
            x = naive_block(block, x)
            continue
        slot = path.layer_ids.index(index)
        queries = path.dropout(path.queries[slot].expand(batch, -1, -1))
        sequence = torch.cat([x, queries], dim=1)
        mask = torch.zeros(sequence.shape[1], sequence.shape[1], dtype=x.dtype, device=x.device)
        mask[:, tokens:] = NEG_INF
        out = naive_block(block, sequence, mask)
        x, z = out[:, :tokens], out[:, tokens:]
        if path.combine == "concat":
            summaries.append(z.flatten(1))
        elif path.combine == "mean":
            summaries.append(z.mean(1))
        else:
            summaries.append((z * path.query_weights[slot][None, :, None]).sum(1))
    pieces = [final_class_token(backbone, x), *summaries]
    return torch.cat([F.normalize(p, dim=-1) for p in pieces], dim=-1)


def naive_vqt_logits(method, images: Tensor) -> Tensor:
    x = naive_vqt_head_input(method, images)
    if method.kept_features is not None:
        x = x[:, method.kept_features]
    return method.head(x)


def naive_synqt_logits(method, images: Tensor) -> Tensor:
    """SynQT's logits computed the published way: at every block the synthesized queries are
    appended to the sequence; they attend to the original tokens only and no token attends
    to them. The query synthesis and the head are the method's own modules."""
    backbone = method.backbone
    x = backbone.embed(images)
    batch, tokens = x.shape[0], x.shape[1]
    outputs: list[Tensor] = []
    attns: list[Tensor] = []
    mlps: list[Tensor] = []
    for index, block in enumerate(backbone.blocks):
        queries = method.synthesis(index, batch, outputs[-1] if outputs else None)
        sequence = torch.cat([x, queries], dim=1)
        mask = torch.zeros(sequence.shape[1], sequence.shape[1], dtype=x.dtype, device=x.device)
        mask[:, tokens:] = NEG_INF
        out, attn, mlp = naive_block_parts(block, sequence, mask)
        x = out[:, :tokens]
        outputs.append(out[:, tokens:].mean(1))
        attns.append(attn[:, tokens:].mean(1))
        mlps.append(mlp[:, tokens:].mean(1))
    return method.head(torch.stack([outputs[-1], *outputs, *attns, *mlps], dim=1))


class NaiveVQT(torch.nn.Module):
    """VQT executed the published way (queries concatenated into the sequence, autograd
    through the whole backbone), wrapped in the method interface so that
    :func:`querytune.measure.measure_step` can measure what that costs."""

    name = "vqt-naive"
    reads = TrunkInput.IMAGES

    def __init__(self, vqt) -> None:
        super().__init__()
        self.vqt = vqt
        self.backbone = vqt.backbone

    def num_trainable_params(self) -> int:
        return self.vqt.num_trainable_params()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return self.vqt.trainable_state_dict()

    def forward(self, images: Tensor) -> Tensor:
        return naive_vqt_logits(self.vqt, images)


def naive_plain_memory_logits(method, images: Tensor) -> Tensor:
    """Plain memory the published way: each block's memory is appended to the sequence, every
    row attends to everything, and the memory rows' outputs are dropped."""
    backbone = method.backbone
    x = backbone.embed(images)
    x = torch.cat([method.class_token.expand(x.shape[0], 1, -1), x[:, 1:]], dim=1)
    tokens = x.shape[1]
    for block, memory in zip(backbone.blocks, method.memory):
        sequence = torch.cat([x, memory.expand(x.shape[0], -1, -1)], dim=1)
        x = naive_block(block, sequence)[:, :tokens]
    return method.head(final_class_token(backbone, x))


def naive_masked_memory(stack, backbone: VisionTransformer, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Masked (non-destructive) memory the published way: the sequence of every block is
    [original tokens; class tokens C_1..C_K; memories M_1..M_K] under one full attention mask.
    Returns the original final class token (after the final norm) and each task's logits."""
    tasks, count = list(stack.tasks), len(stack.tasks)
    x = backbone.embed(images)
    batch, tokens = x.shape[:2]
    sizes = [task.memory.shape[1] for task in tasks]
    memory_at = [tokens + count + sum(sizes[:j]) for j in range(count)]
    total = tokens + count + sum(sizes)
    mask = torch.full((total, total), NEG_INF, dtype=x.dtype, device=x.device)
    mask[:tokens, :tokens] = 0  # the original tokens see only each other
    mask[tokens + count :, :] = 0  # memory rows: their outputs are dropped; allowing all keeps them finite
    for k in range(count):
        row = tokens + k
        mask[row, :tokens] = 0
        for j in (k, *stack.reads[k]):
            mask[row, tokens + j] = 0
            mask[row, memory_at[j] : memory_at[j] + sizes[j]] = 0
    classes = torch.stack([task.class_token for task in tasks]).expand(batch, -1, -1)
    for index, block in enumerate(backbone.blocks):
        memory = torch.cat([task.memory[index] for task in tasks]).expand(batch, -1, -1)
        out = naive_block(block, torch.cat([x, classes, memory], dim=1), mask)
        x, classes = out[:, :tokens], out[:, tokens : tokens + count]
    norm = backbone.norm
    finals = F.layer_norm(classes, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
    return final_class_token(backbone, x), [task.head(finals[:, k]) for k, task in enumerate(tasks)]
