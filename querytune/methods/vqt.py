"""VQT: Visual Query Tuning (Tu, Mai, Chao; CVPR 2023).

Per block l, T learnable query tokens P_l pass through block l as extra *query rows*:
they attend to the block's own tokens (never to each other), the tokens never attend
to them, and their outputs Z_l are collected, not passed on. The head reads the
L2-normalised pooled final feature (``VisionTransformer.pool``: the final class token, or the
mean of the patch tokens on a ``global_pool`` backbone) and the L2-normalised Z_l of every layer.

Execution: the trunk runs under no_grad (or comes from the feature cache); only the
query rows are differentiated, through :meth:`Block.forward_rows`, which reads the
cached normalised tokens and keeps nothing else large for backward.

The head is a linear layer initialised as the official code does (:func:`official_head`).

Head compression (``compress``, the official two-stage procedure, :func:`compress_head`):
after training, a fresh head is trained with a group-lasso penalty on the L2 norms of its
weight columns, the top fraction of input features by column norm is kept, and another
fresh head is trained on those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.vit import Block, VisionTransformer
from ..errors import ConfigError
from ..options import option
from ..train import TrainConfig
from ..trunk import TrunkInput
from ..trunk.features import Features
from .adaptformer import AdaptedBlock
from .base import Method, SharedRows, concatenated, current_stream
from .heads import SelectingHead, apply_stacked_heads, grouped, joined, stack_heads, stacked, train_head
from .registry import register
from .vpt import vpt_init_bound

if TYPE_CHECKING:
    from ..backbones.vit import ModuleListOf

COMBINES = ("concat", "mean", "weighted")


def parse_layers(spec: str | None, depth: int) -> tuple[int, ...]:
    """'all' / None -> every block; '8,9,10' or '6-11' -> those (0-based) blocks."""
    if spec is None or spec == "all":
        return tuple(range(depth))
    layers: list[int] = []
    try:
        for part in str(spec).split(","):
            if "-" in part:
                first, last = part.split("-")
                layers.extend(range(int(first), int(last) + 1))
            else:
                layers.append(int(part))
    except ValueError as error:
        raise ConfigError(f"--layers {spec!r}: expected block indices like '8,9,10' or '6-11'") from error
    if not layers or any(not 0 <= l < depth for l in layers) or len(set(layers)) != len(layers):
        raise ConfigError(f"--layers {spec!r}: need distinct block indices in 0..{depth - 1}")
    return tuple(sorted(layers))


@dataclass
class VQTOptions:
    num_queries: int = option(1, "query tokens per layer (T)", min=1)
    query_dropout: float = option(0.1, "dropout on the queries", min=0, max=1, max_open=True)
    combine: str = option("concat", "how the head reads the T queries of a layer: concat | mean | weighted",
                          choices=COMBINES)
    layers: str | None = option(None, "blocks with queries, e.g. '6-11' (default all)")
    compress: float | None = option(None, "keep this fraction of head features (group lasso)",
                                    min=0, max=1, min_open=True)


class QueryPath(nn.Module):
    """The VQT query tokens and the summary they produce from per-block tokens.

    Reused by the composite methods (``vqt+lora`` ...), which feed it adapted features.
    """

    def __init__(self, backbone: VisionTransformer, options: VQTOptions) -> None:
        super().__init__()
        self.layer_ids = parse_layers(options.layers, backbone.config.depth)
        dim, tokens = backbone.config.embed_dim, options.num_queries
        bound = vpt_init_bound(backbone)
        self.queries = nn.Parameter(torch.empty(len(self.layer_ids), tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(options.query_dropout)
        self.combine = options.combine
        if self.combine == "weighted":
            self.query_weights = nn.Parameter(torch.full((len(self.layer_ids), tokens), 1.0 / tokens))
        piece = tokens * dim if self.combine == "concat" else dim
        self.out_dim = dim + len(self.layer_ids) * piece

    def layer_outputs(self, layers: Tensor | Sequence[Tensor], blocks: ModuleListOf[Block]) -> list[Tensor]:
        """Z_l (B, T, D) of each query layer, from the normalised block inputs ``layers``: a
        (B, L, N, D) tensor, or a list of L (B, N, D) tensors (an adapted trunk's, left unstacked)."""
        per_layer = layers.unbind(1) if isinstance(layers, Tensor) else layers
        return QueryPath.stacked_outputs([self], per_layer, blocks, current_stream)[0]

    @staticmethod
    def stacked_outputs(paths: Sequence[QueryPath], per_layer: Sequence[Tensor], blocks: ModuleListOf[Block],
                        random_stream: Callable[[int], AbstractContextManager[None]]) -> list[list[Tensor]]:
        """Each path's Z_l: every path's query rows pass each block together, in one ``forward_rows`` call
        that reads the layer's tokens once (their rows never attend to each other); path k draws its
        dropout masks inside ``random_stream(k)``. The paths share their query layers."""
        batch = per_layer[0].shape[0]
        dropped = []  # per path, per query layer: its (B, T, D) rows
        for k, path in enumerate(paths):
            with random_stream(k):
                dropped.append([path.dropout(queries.expand(batch, -1, -1)) for queries in path.queries])
        outputs: list[list[Tensor]] = [[] for _ in paths]
        for i, layer in enumerate(paths[0].layer_ids):
            rows = [path_rows[i] for path_rows in dropped]
            out = blocks[layer].forward_rows(torch.cat(rows, dim=1), per_layer[layer]).out
            for path_outputs, z in zip(outputs, out.split([r.shape[1] for r in rows], dim=1)):
                path_outputs.append(z)
        return outputs

    def forward(self, layers: Tensor | Sequence[Tensor], pooled: Tensor, blocks: ModuleListOf[Block]) -> Tensor:
        """Head input: L2-normalised [pooled final feature, per-layer query summaries]."""
        return self.summary(pooled, self.layer_outputs(layers, blocks))

    def summary(self, pooled: Tensor, outputs: Sequence[Tensor]) -> Tensor:
        """Head input from the pooled final feature and the query outputs Z_l of every query layer."""
        pieces = [pooled]
        for i, z in enumerate(outputs):
            if self.combine == "concat":
                pieces.append(z.flatten(1))
            elif self.combine == "mean":
                pieces.append(z.mean(1))
            else:
                pieces.append(torch.einsum("btd,t->bd", z, self.query_weights[i]))
        return torch.cat([F.normalize(p, dim=-1) for p in pieces], dim=-1)


class VQTRows(SharedRows):
    """VQTs served together (eval mode: no dropout). Per block, the query rows of every task with queries there
    pass it in one ``forward_rows`` call (rows never attend to each other, so no task reads another's); tasks
    of one layout (query layers, queries, combine, kept features, classes) then build their head inputs and
    apply their heads as one batched matmul. Queries and head weights are copied; the methods are not registered
    as submodules."""

    def __init__(self, methods: Sequence[VQT]) -> None:
        super().__init__()
        self.methods = list(methods)
        paths = [method.query_path for method in methods]
        device = methods[0].head.weight.device if methods else None
        rows_at: dict[int, list[Tensor]] = {}  # block -> the query rows (T, D) passing it, task by task
        first_row: list[dict[int, int]] = []  # per task: block -> the index of its first row there
        row_count: dict[int, int] = {}
        for path in paths:
            first_row.append({})
            for layer, queries in zip(path.layer_ids, path.queries.detach()):
                first_row[-1][layer] = row_count.get(layer, 0)
                row_count[layer] = first_row[-1][layer] + len(queries)
                rows_at.setdefault(layer, []).append(queries)
        self.queries = {layer: joined(rows) for layer, rows in sorted(rows_at.items())}  # block -> (R, D)
        # per layout: its tasks, its query layers and per layer the rows of its tasks (K * T), the query weights
        # (K, layers, T) where it weighs them, the kept features (K, n) where it keeps some, head weights, biases
        self.layouts = []
        for (layer_ids, count, combine, _, _, _), members in grouped([
                (p.layer_ids, p.queries.shape[1], p.combine, m.kept_features is None, m.head.in_features,
                 m.num_classes) for p, m in zip(paths, methods)]).items():
            rows = [torch.cat([torch.arange(first_row[k][layer], first_row[k][layer] + count, device=device)
                               for k in members]) for layer in layer_ids]
            weights = (stacked([paths[k].query_weights.detach() for k in members]) if combine == "weighted"
                       else None)
            kept = [methods[k].kept_features for k in members]
            self.layouts.append((members, layer_ids, rows, count, combine, weights,
                                 stacked(cast("list[Tensor]", kept)) if kept[0] is not None else None,
                                 *stack_heads([methods[k].head for k in members])))

    def forward(self, features: Features, backbone: VisionTransformer) -> list[Tensor]:
        assert features.layers is not None  # VQT reads LAYERS
        batch = features.pooled.shape[0]  # not len(): a traced graph keeps the batch axis
        outputs = {layer: backbone.blocks[layer].forward_rows(queries.expand(batch, -1, -1), features.layers[:, layer])
                   .out for layer, queries in self.queries.items()}
        pooled = F.normalize(features.pooled, dim=-1)
        logits: dict[int, Tensor] = {}
        for members, layer_ids, rows, count, combine, weights, kept, weight, bias in self.layouts:
            pieces = [pooled.unsqueeze(1).expand(-1, len(members), -1)]
            for i, (layer, layer_rows) in enumerate(zip(layer_ids, rows)):
                z = outputs[layer][:, layer_rows].unflatten(1, (len(members), count))  # B, K, T, D
                if combine == "concat":
                    pieces.append(z.flatten(2))
                elif combine == "mean":
                    pieces.append(z.mean(2))
                else:
                    assert weights is not None
                    pieces.append(torch.einsum("bktd,kt->bkd", z, weights[:, i]))
            inputs = torch.cat([pieces[0], *(F.normalize(piece, dim=-1) for piece in pieces[1:])], dim=-1)
            if kept is not None:
                inputs = inputs.gather(2, kept.expand(batch, -1, -1))
            logits.update(zip(members, apply_stacked_heads(inputs, weight, bias).unbind(1)))
        return [logits[k] for k in range(len(self.methods))]

    @classmethod
    def merge(cls, parts: Sequence[VQTRows]) -> tuple[VQTRows, list[list[int]]]:
        return concatenated(cls, [part.methods for part in parts])


@register
class VQT(SelectingHead):
    name = "vqt"
    reads = TrunkInput.LAYERS
    not_mergeable = "its query tokens pass every block as extra rows"
    Options: ClassVar[type[VQTOptions]] = VQTOptions
    # Paper protocol: 100 epochs, 10 warm-up, cosine, batch 128, Adam, lr from the grid x batch/256.
    train_defaults = {"epochs": 100, "warmup_epochs": 10, "batch_size": 128, "optimizer": "adam",
                      "lr": 0.1 * 128 / 256, "weight_decay": 1e-4}

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: VQTOptions) -> None:
        super().__init__(backbone, num_classes, options)
        self.query_path = QueryPath(backbone, options)
        self.head = official_head(self.query_path.out_dim, num_classes)

    # ``Any``: Features here; the add-ons (vqt_addon) read images, as their ``reads`` says.
    def head_input(self, features: Any) -> Tensor:
        return self.query_path(features.layers, features.pooled, self.backbone.blocks)

    def forward(self, features: Features) -> Tensor:
        return self.classify(self.head_input(features))

    def classify(self, head_input: Tensor) -> Tensor:
        """The logits from the head input (the features a compressed head keeps)."""
        return self.head(head_input if self.kept_features is None else head_input[:, self.kept_features])

    @staticmethod
    def forward_members(members: Sequence[Method], inputs: Any,
                        random_stream: Callable[[int], AbstractContextManager[None]]) -> list[Tensor]:
        """Every member's query rows pass each block together (:meth:`QueryPath.stacked_outputs`); each
        member draws its dropout masks from its own stream, in the order its lone forward draws them."""
        vqts = cast("list[VQT]", members)
        features: Features = inputs
        assert features.layers is not None  # VQT reads LAYERS
        outputs = QueryPath.stacked_outputs([vqt.query_path for vqt in vqts], features.layers.unbind(1),
                                            vqts[0].backbone.blocks, random_stream)
        return [vqt.classify(vqt.query_path.summary(features.pooled, z)) for vqt, z in zip(vqts, outputs)]

    def shared_rows(self) -> VQTRows:
        return VQTRows([self])

    def published_way(self) -> Method | None:
        return NaiveVQT(self)

    def post_train(self, source: Any, cfg: Any, device: torch.device) -> dict[str, Any]:
        if self.options.compress is None:
            return {}
        return compress_head(self, source, cfg, device)


# Head compression, the official two-stage procedure (VQT's run_vqt_vtab_sparsity.sh,
# h2t_sparsity_trainer.py): with the trained query tokens frozen and their dropout on,
# stage 1 trains a fresh head with a group-lasso penalty (the L2 norm of each input feature's
# weight column, summed) and ranks the features by those norms; stage 2 trains another fresh
# head on the top int(D * keep) of them. Both stages run the training schedule with Adam at
# half the training learning rate and its weight decay (none on the bias).

GROUP_LASSO = 1e-4
HEAD_BIAS_PRIOR = 0.01  # the official head starts every class at probability ~1 % (special_bias)


def official_head(in_features: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """``nn.Linear`` initialised as VQT's head (src/models/mlp.py): weight kaiming-normal over the
    fan-out (std sqrt(2 / classes)), bias -log((1 - 0.01) / 0.01) = -4.595."""
    head = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out", generator=generator)
        head.bias.fill_(-math.log((1 - HEAD_BIAS_PRIOR) / HEAD_BIAS_PRIOR))
    return head


def compress_head(method: VQT, source: Any, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    keep_fraction = method.options.compress
    assert keep_fraction is not None
    stage_cfg = replace(cfg, lr=cfg.lr / 2)
    num_features, params_before = method.head.in_features, method.head.weight.numel() + method.head.bias.numel()
    generator = torch.Generator().manual_seed(cfg.seed)  # the fresh heads, the same on every rank

    method.train()  # the query dropout stays on, as in the official stages
    lasso_head = official_head(num_features, method.num_classes, generator).to(device)
    train_head(lasso_head, method.head_input, source, stage_cfg, device, GROUP_LASSO)
    kept_count = max(1, int(keep_fraction * num_features))
    kept = lasso_head.weight.detach().norm(dim=0).topk(kept_count).indices.sort().values

    head = official_head(kept_count, method.num_classes, generator).to(device)
    train_head(head, lambda features: method.head_input(features)[:, kept], source, stage_cfg, device, 0.0)
    method.keep_features(kept, head)
    return {"head_params_before": params_before, "head_params_after": head.weight.numel() + head.bias.numel(),
            "kept_features": kept_count, "total_features": num_features}


# The way the methods' published code runs extra tokens: concatenated into the whole sequence under an
# additive attention mask, autograd through all of it. Written out from a block's weights, apart from
# Block.forward and forward_rows, so that the tests check those against it (tests/reference.py) and
# `querytune measure --method vqt-naive` measures what it costs.

NEG_INF = float("-inf")


def _layer_scale(module: nn.Module, x: Tensor) -> Tensor:
    gamma = getattr(module, "gamma", None)
    return x * gamma if gamma is not None else x


def naive_block_parts(block: Block, x: Tensor, mask: Tensor | None = None,
                      image_tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One pre-norm block over the whole sequence ``x`` with an additive attention ``mask`` (N, N):
    (output, attention branch, MLP branch), the branches before their residuals. On a RoPE backbone the
    queries and keys of the first ``image_tokens`` tokens (default all: the image's own, prefix first) are
    rotated by position; the tokens appended after them carry none. It writes out a plain block, with the
    effective weights of modules standing in for a weight (LoRA's, SSF's), and AdaptFormer's adapter beside
    the MLP where the block is an :class:`AdaptedBlock`; plain memory's tokens are not read (its reference
    appends them to ``x``). Any other kind of block is refused rather than written out without what it adds."""
    if type(block) not in (Block, AdaptedBlock):
        raise TypeError(f"naive_block_parts writes out a Block or an AdaptedBlock, not a {type(block).__name__}")
    dim = x.shape[-1]
    heads = block.attn.num_heads
    u = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q, k, v = F.linear(u, block.attn.qkv.weight, block.attn.qkv.bias).chunk(3, dim=-1)
    rope = block.attn.rope
    if rope is not None:
        count = x.shape[1] if image_tokens is None else image_tokens
        q, k = (torch.cat([rope.rotate(t[:, :count]), t[:, count:]], dim=1) for t in (q, k))
    q, k, v = (t.unflatten(-1, (heads, dim // heads)).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * (dim // heads) ** -0.5
    if mask is not None:
        logits = logits + mask
    attended = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
    attn = _layer_scale(block.ls1, F.linear(attended, block.attn.proj.weight, block.attn.proj.bias))
    a = x + attn
    h = F.layer_norm(a, (dim,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    mlp = _layer_scale(block.ls2, block.mlp(h))
    if isinstance(block, AdaptedBlock):
        mlp = mlp + block.mlp_parallel(a)
    return a + mlp, attn, mlp


def naive_block(block: Block, x: Tensor, mask: Tensor | None = None, image_tokens: int | None = None) -> Tensor:
    """One pre-norm block over the whole sequence ``x`` with an additive attention ``mask`` (N, N)."""
    return naive_block_parts(block, x, mask, image_tokens)[0]


# VQT the published way, which `querytune measure --method vqt-naive` measures.


def naive_vqt_head_input(method: VQT, images: Tensor) -> Tensor:
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
        out = naive_block(block, sequence, mask, tokens)
        x, z = out[:, :tokens], out[:, tokens:]
        if path.combine == "concat":
            summaries.append(z.flatten(1))
        elif path.combine == "mean":
            summaries.append(z.mean(1))
        else:
            summaries.append((z * path.query_weights[slot][None, :, None]).sum(1))
    pieces = [backbone.pool(x), *summaries]
    return torch.cat([F.normalize(p, dim=-1) for p in pieces], dim=-1)


def naive_vqt_logits(method: VQT, images: Tensor) -> Tensor:
    x = naive_vqt_head_input(method, images)
    if method.kept_features is not None:
        x = x[:, method.kept_features]
    return method.head(x)


class NaiveVQT(Method):
    """A VQT executed the published way (queries concatenated into the sequence, autograd through the
    whole backbone), with the VQT's own parameters."""

    name = "vqt-naive"
    reads = TrunkInput.IMAGES

    def __init__(self, vqt: VQT) -> None:
        super().__init__(vqt.backbone, vqt.num_classes, vqt.options)
        self.vqt = vqt

    def forward(self, images: Tensor) -> Tensor:
        return naive_vqt_logits(self.vqt, images)
