"""SynQT: synthesized query tuning (Zhang, Bai, Lu, Lian, Wang, Wang, Xia; ECCV 2024).

Task-specific learning and knowledge extraction are separated. A light side network,
the query synthesis chain, makes T query rows per block l:

    s_l = Drop_0.1( QSM_l( Adapter_l( q_l + feat_scale * F_{l-1} ) ) )   (no F term at l = 1)

from learnable seeds q_l (T x D, U(-1, 1)) and the previous layer's query feature
F_{l-1}. The rows then pass through frozen block l as extra *query rows*
(:meth:`Block.forward_rows`): they attend to the block's own tokens only, the tokens
never attend to them. Per layer the method keeps the attention branch h_l, the MLP
branch m_l and the output F_l, each averaged over the T rows. The head adapts the
3L+1 tokens [F_L, F_1..F_L, h_1..h_L, m_1..m_L] with one shared adapter, combines them
with weights predicted from token 0, normalises and classifies.

Execution: the trunk runs under no_grad (or comes from the feature cache); only the
side network and the query rows are differentiated, so backward keeps the normalised
block inputs (the keys and values of every layer) and nothing else that grows with
the number of patch tokens except the query rows' attention probabilities.

Where the official code (github.com/taolinzhang/SynQT, ``synqt.py``) settles what the
paper text leaves open, we follow it:

- Adapter(x) = x + drop(fc2(drop(GELU(fc1(x))))): dropout (0.1 in the query adapters,
  the QSM feed-forward and the head, 0 in the QSM projections) after the activation
  *and* after fc2.
- QSM attention: dropout 0.1 on the attention weights and after the output projection;
  the QSM block's own LayerNorm comes before the attention's separate query-side and
  key/value-side LayerNorms.
- attn_scale and ffn_scale are learnable scalars per layer; feat_scale is one learnable
  scalar shared by all layers. Their default init 0.1 is the QSM block's own default
  and the value most of the official per-task configs use (the training script's
  argparse default of 1 is always overridden by a per-task config).
- F_{l-1} is the T-averaged feature, added to each of the T seeds of layer l.
- Head: token + Adapter(LN(token)), where the adapter has its own residual, so
  token + LN(token) + MLP(LN(token)); DropPath 0.3 drops the whole adapted token
  (per sample and token), not only the adapter branch; the combine weights are
  tanh(drop_0.1(GELU(Linear(token_0)))) read from the adapted token 0, and the
  weighted tokens are averaged (divided by 3L+1).
- The head LayerNorm is trainable, initialised with a copy of the backbone's final
  norm. SynQT's own LayerNorms use PyTorch's default eps, as in the official code.
- Linear layers keep PyTorch's default initialisation.
- Stochastic depth: the official backbone's drop-path (0 -> 0.1 over the blocks) is applied
  to the query branches, as its ``forward_block`` does; the trunk's own tokens stay
  deterministic (they are cached).
- Left out: two parameter sets the official code creates but never uses (12 LayerNorms
  ``pre_norm`` and a 37-vector ``weight`` in the combine block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.vit import Block, RowsOutput, VisionTransformer
from ..options import option
from ..trunk import TrunkInput
from ..trunk.features import Features
from .base import Method, SharedRows, concatenated, current_stream
from .registry import register

QSM_PROJECTION_DROPOUT = 0.0
# The backbone's drop-path rate in the official code (timm, linspace 0 -> 0.1 over the blocks), which
# forward_block also applies to the query branches. The trunk's own drop-path cannot apply here: its
# tokens are computed once without it (and may come from the feature cache).
QUERY_DROP_PATH = 0.1


@dataclass
class SynQTOptions:
    num_queries: int = option(1, "query tokens per layer (T)", min=1)
    attn_scale: float = option(0.1, "initial QSM attention scale")
    ffn_scale: float = option(0.1, "initial QSM feed-forward scale")
    feat_scale: float = option(0.1, "initial scale of the previous layer's query feature")
    adapter_dim: int = option(48, "adapter bottleneck width", min=1)
    qsm_dim: int = option(8, "QSM projection bottleneck width (paper: 8 for D = 768)", min=1)
    dropout: float = option(0.1, "dropout of the query synthesis (seeds' adapters, QSM attention and feed-forward, "
                                 "its output) and of the head's adapter and combine weights", min=0, max=1,
                            max_open=True)
    head_drop_path: float = option(0.3, "drop-path of the head's aggregated tokens (all but the first)", min=0,
                                   max=1, max_open=True)


class Adapter(nn.Module):
    """Residual bottleneck D -> hidden -> D: x + drop(fc2(drop(GELU(fc1(x)))))."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class QSMAttention(nn.Module):
    """Single-head self-attention among the T synthesized rows; every projection is a
    residual bottleneck adapter D -> qsm_dim -> D."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.q_norm = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(dim)
        self.q_proj = Adapter(dim, hidden, QSM_PROJECTION_DROPOUT)
        self.k_proj = Adapter(dim, hidden, QSM_PROJECTION_DROPOUT)
        self.v_proj = Adapter(dim, hidden, QSM_PROJECTION_DROPOUT)
        self.out_proj = Adapter(dim, hidden, QSM_PROJECTION_DROPOUT)
        self.attn_drop = nn.Dropout(dropout)
        self.out_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q_proj(self.q_norm(x))
        kv = self.kv_norm(x)
        k, v = self.k_proj(kv), self.v_proj(kv)
        weights = self.attn_drop((q @ k.transpose(-1, -2) * self.scale).softmax(-1))
        return self.out_drop(self.out_proj(weights @ v))


class QSMBlock(nn.Module):
    """x + attn_scale * SelfAttn(LN(x)); then x + ffn_scale * Adapter(LN(x))."""

    def __init__(self, dim: int, options: SynQTOptions) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QSMAttention(dim, options.qsm_dim, options.dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = Adapter(dim, options.adapter_dim, options.dropout)
        self.attn_scale = nn.Parameter(torch.tensor(float(options.attn_scale)))
        self.ffn_scale = nn.Parameter(torch.tensor(float(options.ffn_scale)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn_scale * self.attn(self.norm1(x))
        return x + self.ffn_scale * self.ffn(self.norm2(x))


class QuerySynthesis(nn.Module):
    """The side network: seeds, per-layer adapter and QSM block, and the chain through F_{l-1}."""

    def __init__(self, dim: int, depth: int, options: SynQTOptions) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.empty(depth, options.num_queries, dim).uniform_(-1, 1))
        self.adapters = nn.ModuleList(Adapter(dim, options.adapter_dim, options.dropout) for _ in range(depth))
        self.qsm = nn.ModuleList(QSMBlock(dim, options) for _ in range(depth))
        self.feat_scale = nn.Parameter(torch.tensor(float(options.feat_scale)))
        self.drop = nn.Dropout(options.dropout)

    def forward(self, layer: int, batch: int, previous: Tensor | None) -> Tensor:
        """s_l (B, T, D) for block ``layer`` from F_{l-1} (B, D), or None at the first block."""
        seeds = self.seeds[layer].expand(batch, -1, -1)
        if previous is not None:
            seeds = seeds + self.feat_scale * previous.unsqueeze(1)
        return self.drop(self.qsm[layer](self.adapters[layer](seeds)))


class SynQTHead(nn.Module):
    """Shared adapter on the 3L+1 tokens, condition-combine from token 0, LayerNorm, classifier."""

    def __init__(self, dim: int, depth: int, options: SynQTOptions, final_norm: nn.LayerNorm,
                 num_classes: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.adapter = Adapter(dim, options.adapter_dim, options.dropout)
        self.combine = nn.Linear(dim, 3 * depth)
        self.combine_drop = nn.Dropout(options.dropout)
        self.drop_path = options.head_drop_path
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            self.norm.weight.copy_(final_norm.weight)
            self.norm.bias.copy_(final_norm.bias)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits from the head tokens (B, 3L+1, D)."""
        tokens = tokens + self.adapter(self.token_norm(tokens))
        if self.training:  # DropPath (0.3) on each aggregated token but the first, per sample
            dropped = drop_samples(tokens[:, 1:].flatten(0, 1), self.drop_path).unflatten(0, tokens[:, 1:].shape[:2])
            tokens = torch.cat([tokens[:, :1], dropped], dim=1)
        weights = torch.tanh(self.combine_drop(F.gelu(self.combine(tokens[:, 0]))))
        weights = torch.cat([weights.new_ones(weights.shape[0], 1), weights], dim=1)
        pooled = (weights.unsqueeze(-1) * tokens).mean(1)
        return self.classifier(self.norm(pooled))


def drop_samples(x: Tensor, p: float) -> Tensor:
    """Stochastic depth: each sample's ``x`` is zeroed with probability ``p``, the rest scaled by 1 / (1 - p)."""
    if p == 0:
        return x
    return x * sample_keep(x, p) / (1 - p)


def sample_keep(x: Tensor, p: float) -> Tensor:
    """The keep mask of :func:`drop_samples`: 1 or 0 per sample, drawn with probability 1 - ``p``."""
    return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)


def drop_branch(x: Tensor, p: float, draw_keep: Callable[[Tensor], Tensor] | None) -> Tensor:
    """:func:`drop_samples`, or with the keep mask ``draw_keep(x)`` where given."""
    if p == 0 or draw_keep is None:
        return drop_samples(x, p)
    return x * draw_keep(x) / (1 - p)


def rows_with_drop_path(block: Block, rows: Tensor, context: Tensor, drop_path: float = 0.0,
                        draw_keep: Callable[[Tensor], Tensor] | None = None) -> RowsOutput:
    """:meth:`Block.forward_rows` of the query ``rows`` against ``context``, with the rows' attention and MLP
    branches dropped per sample with probability ``drop_path`` (stochastic depth, as timm's blocks drop their
    own branches in training); ``draw_keep(branch)``, where given, draws the keep mask (1 or 0,
    broadcastable to the branch) instead, e.g. per row group from each group's own random stream."""
    attn = drop_branch(block.rows_attention(rows, context), drop_path, draw_keep)
    a = rows + attn
    mlp = drop_branch(block.mlp_branch(a), drop_path, draw_keep)
    return RowsOutput(a + mlp, attn, mlp)


def keep_per_member(sizes: list[int], drop_path: float,
                    random_stream: Callable[[int], AbstractContextManager[None]]) -> Callable[[Tensor], Tensor]:
    """``draw_keep`` for stacked members' rows (``sizes`` rows each): each member's per-sample drop-path
    mask, drawn from its own stream as its lone :func:`rows_with_drop_path` draws it, spread over its rows."""
    def draw_keep(branch: Tensor) -> Tensor:
        keeps = []
        for k, size in enumerate(sizes):
            with random_stream(k):
                keeps.append(sample_keep(branch[:, :1], drop_path).expand(-1, size, -1))
        return torch.cat(keeps, dim=1)

    return draw_keep


def head_tokens(outputs: list[Tensor], attns: list[Tensor], mlps: list[Tensor]) -> Tensor:
    """[F_L, F_1..F_L, h_1..h_L, m_1..m_L] stacked to (B, 3L+1, D)."""
    return torch.stack([outputs[-1], *outputs, *attns, *mlps], dim=1)


class SynQTRows(SharedRows):
    """SynQTs served together: their synthesized rows pass each frozen block in one ``forward_rows`` call
    (:func:`stacked_logits`; rows never attend to each other's task), while each task's side network and
    head run on their own (they are each task's own small modules, chained through the blocks' outputs).
    The methods are not registered as submodules."""

    def __init__(self, methods: Sequence[SynQT]) -> None:
        super().__init__()
        self.methods = list(methods)

    def forward(self, features: Features, backbone: VisionTransformer) -> list[Tensor]:
        return stacked_logits(self.methods, features, current_stream)

    @classmethod
    def merge(cls, parts: Sequence[SynQTRows]) -> tuple[SynQTRows, list[list[int]]]:
        return concatenated(cls, [part.methods for part in parts])


@register
class SynQT(Method):
    name = "synqt"
    reads = TrunkInput.LAYERS
    not_mergeable = "its query tokens and synthesis path run beside the trunk"
    Options = SynQTOptions
    # Official protocol: AdamW, lr 1e-3, wd 1e-2, batch 64, 50 epochs, 10 warm-up, cosine to 1e-6 per iteration.
    train_defaults = {"epochs": 50, "warmup_epochs": 10, "batch_size": 64, "optimizer": "adamw",
                      "lr": 1e-3, "weight_decay": 1e-2, "min_lr": 1e-6}
    search_grid = {"lr": (2e-3, 1e-3, 5e-4), "weight_decay": (1e-2, 1e-4)}  # around the official fixed 1e-3
    # its dropouts were set for 1,000 images; each member's side network and head are its own
    search_options = {"dropout": (0.1, 0.3)}

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: SynQTOptions) -> None:
        super().__init__(backbone, num_classes, options)
        dim, depth = backbone.config.embed_dim, backbone.config.depth
        self.synthesis = QuerySynthesis(dim, depth, options)
        self.head = SynQTHead(dim, depth, options, backbone.norm, num_classes)

    def query_drop_path(self, index: int) -> float:
        """The query branches' drop-path rate at block ``index`` (0 when not training)."""
        return QUERY_DROP_PATH * index / max(1, len(self.backbone.blocks) - 1) if self.training else 0.0

    def forward(self, features: Features) -> Tensor:
        return stacked_logits([self], features, current_stream)[0]

    def shared_rows(self) -> SynQTRows:
        return SynQTRows([self])

    @staticmethod
    def forward_members(members: Sequence[Method], inputs: Any,
                        random_stream: Callable[[int], AbstractContextManager[None]]) -> list[Tensor]:
        """:func:`stacked_logits`: the members' rows pass each frozen block together."""
        return stacked_logits(cast("list[SynQT]", members), inputs, random_stream)


def stacked_logits(synqts: Sequence[SynQT], features: Features,
                   random_stream: Callable[[int], AbstractContextManager[None]]) -> list[Tensor]:
    """Every member's synthesized rows pass each frozen block together, in one ``forward_rows`` call
    that reads the layer's tokens once; each member's side network and head run on their own. A
    member draws its dropout and drop-path masks from its own stream in the order its lone forward
    does: its synthesis, then its rows' attention and MLP keep masks, block by block, then its head."""
    assert features.layers is not None
    batch = len(features)
    outputs: list[list[Tensor]] = [[] for _ in synqts]
    attns: list[list[Tensor]] = [[] for _ in synqts]
    mlps: list[list[Tensor]] = [[] for _ in synqts]
    for index, block in enumerate(synqts[0].backbone.blocks):
        rows = []
        for k, synqt in enumerate(synqts):
            with random_stream(k):
                rows.append(synqt.synthesis(index, batch, outputs[k][-1] if outputs[k] else None))
        sizes = [r.shape[1] for r in rows]
        drop_path = synqts[0].query_drop_path(index)
        out, attn, mlp = rows_with_drop_path(block, torch.cat(rows, dim=1), features.layers[:, index], drop_path,
                                             keep_per_member(sizes, drop_path, random_stream))
        for k, (o, a, m) in enumerate(zip(out.split(sizes, 1), attn.split(sizes, 1), mlp.split(sizes, 1))):
            outputs[k].append(o.mean(1))
            attns[k].append(a.mean(1))
            mlps[k].append(m.mean(1))
    logits = []
    for k, synqt in enumerate(synqts):
        with random_stream(k):
            logits.append(synqt.head(head_tokens(outputs[k], attns[k], mlps[k])))
    return logits
