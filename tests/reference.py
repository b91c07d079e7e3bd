"""Naive reference formulations of SynQT, memory tokens and DTL, as the methods' published code executes them.

Extra tokens are concatenated into the sequence, an attention mask keeps them from
disturbing the original tokens, and autograd runs through the whole backbone. The
block arithmetic is the package's naive one (``querytune.methods.vqt.naive_block``),
written from the block's weights, independently of :meth:`Block.forward` and
:meth:`Block.forward_rows`. VQT's reference lives with VQT
(``querytune.methods.vqt.naive_vqt_logits``), where ``querytune measure --method
vqt-naive`` measures what it costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from querytune.backbones.vit import VisionTransformer
from querytune.methods.vqt import NEG_INF, naive_block, naive_block_parts


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
        out, attn, mlp = naive_block_parts(block, sequence, mask, tokens)
        x = out[:, :tokens]
        outputs.append(out[:, tokens:].mean(1))
        attns.append(attn[:, tokens:].mean(1))
        mlps.append(mlp[:, tokens:].mean(1))
    return method.head(torch.stack([outputs[-1], *outputs, *attns, *mlps], dim=1))


def naive_plain_memory_logits(method, images: Tensor) -> Tensor:
    """Plain memory the published way: each block's memory is appended to the sequence, every
    row attends to everything, and the memory rows' outputs are dropped. On a backbone without a class
    token the method's class token is appended after the tokens, which do not attend to it."""
    backbone = method.backbone
    x = backbone.embed(images)
    token = method.class_token.expand(x.shape[0], 1, -1)
    appended = backbone.cls_token is None
    x = torch.cat([x, token] if appended else [token, x[:, 1:]], dim=1)
    tokens = x.shape[1]
    for block, memory in zip(backbone.blocks, method.memory):
        sequence = torch.cat([x, memory.expand(x.shape[0], -1, -1)], dim=1)
        mask = torch.zeros(sequence.shape[1], sequence.shape[1], dtype=x.dtype, device=x.device)
        if appended:
            mask[: tokens - 1, tokens - 1] = NEG_INF
        x = naive_block(block, sequence, mask, tokens - appended)[:, :tokens]
    return method.head(backbone.norm(x[:, -1]) if appended else backbone.pool(x))


def naive_masked_memory(stack, backbone: VisionTransformer, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Masked (non-destructive) memory the published way: the sequence of every block is
    [original tokens; class tokens C_1..C_K; memories M_1..M_K] under one full attention mask.
    Returns the backbone's pooled final feature (the original final class token after the final norm,
    where it pools by it) and each task's logits."""
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
        out = naive_block(block, torch.cat([x, classes, memory], dim=1), mask, tokens)
        x, classes = out[:, :tokens], out[:, tokens : tokens + count]
    norm = backbone.norm
    finals = F.layer_norm(classes, (classes.shape[-1],), norm.weight, norm.bias, norm.eps)
    return backbone.pool(x), [task.head(finals[:, k]) for k, task in enumerate(tasks)]


def naive_dtl_logits(method, images: Tensor) -> Tensor:
    """DTL's logits as its official forward computes them: a plain block loop that adds each block's
    low-rank map of the block's input to a running sum, and after every add-back block adds the sum's
    swish (DTL+: the patch rows passed through the depthwise convolution on their grid, written here
    with explicit padding) to the tokens; the head reads the normalised mean of the patch tokens.
    The parameters are the method's; the block arithmetic is the naive one."""
    backbone, side = method.backbone, method.side
    prefix = backbone.config.num_prefix_tokens
    height, width = (size // backbone.config.patch_size for size in images.shape[-2:])
    x = backbone.embed(images)
    residuals: Tensor | float = 0.0
    for bid, block in enumerate(backbone.blocks):
        residuals = residuals + x @ side.lora_a[bid].T @ side.lora_b[bid].T
        x = naive_block(block, x)
        if bid >= side.first:
            assert isinstance(residuals, Tensor)
            act = residuals * torch.sigmoid(side.beta * residuals)
            if side.lora_fusion is not None:
                weight = side.lora_fusion.weight  # D, 1, k, k
                k = weight.shape[-1]
                before, after = (k - 1) // 2, k - 1 - (k - 1) // 2  # PyTorch's 'same': the extra pad after
                grid = act[:, prefix:].reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
                fused = F.conv2d(F.pad(grid, (before, after, before, after)), weight, groups=grid.shape[1])
                act = torch.cat([act[:, :prefix], fused.permute(0, 2, 3, 1).reshape(x.shape[0], height * width, -1)],
                                dim=1)
            x = x + act
    return method.head(backbone.norm(x[:, prefix:].mean(dim=1)))
