"""The single Vision Transformer of querytune.

Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``reg_token``,
``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv`` ...), so a timm state dict
loads with strict key matching and the names double as our checkpoint format.

Besides the ordinary forward, every block has a *rows* forward
(:meth:`Block.forward_rows`): extra rows (queries, new class tokens) pass through
the block's frozen weights while attending to the block's normalised input tokens
``U = LN1(X)`` without changing them. Keys and values are affine maps of ``U``, so
the rows forward folds ``Wk`` and ``Wv`` into the query side instead of computing
K and V for every token: per row and head it costs O(N * D), it needs only ``U``
(which is what the feature cache stores), and ``U`` is the only large tensor the
backward pass keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Generic, NamedTuple, Protocol, TypeVar, cast, overload

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


# the MLP activation by ViTConfig.act; gelu_tanh is transformers' gelu_new and gelu_pytorch_tanh
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "quick_gelu": QuickGELU,
}


@dataclass
class ViTConfig:
    """Architecture of a plain pre-norm ViT.

    ``pos_embed_prefix`` is the number of prefix tokens (class, then registers) that
    have their own position embedding: 1 for ViT/DeiT/DINOv2, 0 for timm models
    with ``no_embed_class``, 1 + registers for timm register models without it.
    ``pos_embed_antialias`` resamples position embeddings with antialiasing, as timm
    and DINOv2 with registers do (plain DINOv2, ViT and DeiT in transformers do not).
    ``global_pool``: the final feature is the normalised mean of the patch tokens (MAE's
    fine-tuning head, its ``fc_norm`` loaded as ``norm``), not the normalised class token.
    ``map_pool``: the final feature is the attention-pooling (MAP) head's output over the normalised
    tokens (SigLIP: one learned latent query, then an MLP; timm's ``attn_pool``).

    Family options: ``class_token`` (SigLIP has none), ``patch_bias`` (CLIP has none), ``norm_pre``
    (CLIP's LayerNorm before the blocks), ``act`` (the MLP activation, :data:`ACTIVATIONS`), ``swiglu``
    (a SwiGLU MLP of hidden width ``round(embed_dim * mlp_ratio)``: DINOv2 giant, EVA-02), ``mlp_norm``
    (a LayerNorm on the SwiGLU's hidden units: EVA-02 base and large, timm's ``scale_mlp``),
    ``pos_embed_resize`` (``bicubic``, or ``bilinear`` as SigLIP 2 resizes).

    Rotary position embeddings (:class:`RotaryEmbedding`): ``rope`` ``eva`` (EVA-02: integer patch
    positions scaled to the pretraining grid ``rope_grid``, interleaved pairs) or ``dinov3`` (patch centres
    in [-1, 1], periods of 2π, rotate-half pairs), of base ``rope_temperature``, rotate the queries and keys
    of the patch tokens in every block. ``absolute_pos_embed``: whether there is a ``pos_embed`` (DINOv3
    has none).
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_scale: bool = False
    num_reg_tokens: int = 0
    pos_embed_prefix: int = 1
    pos_embed_antialias: bool = False
    norm_eps: float = 1e-6
    mean: tuple[float, ...] | None = IMAGENET_MEAN  # None: unknown (a loader could not tell); see Preprocess
    std: tuple[float, ...] | None = IMAGENET_STD
    name: str = "vit"
    global_pool: bool = False
    map_pool: bool = False
    class_token: bool = True
    patch_bias: bool = True
    norm_pre: bool = False
    act: str = "gelu"
    swiglu: bool = False
    pos_embed_resize: str = "bicubic"
    mlp_norm: bool = False
    rope: str = ""
    rope_temperature: float = 10000.0
    rope_grid: int = 0
    absolute_pos_embed: bool = True

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 <= self.pos_embed_prefix <= self.num_prefix_tokens:
            raise ValueError(f"pos_embed_prefix must be in 0..{self.num_prefix_tokens}, got {self.pos_embed_prefix}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.act!r} (known: {', '.join(ACTIVATIONS)})")
        if self.pos_embed_resize not in ("bicubic", "bilinear"):
            raise ValueError(f"pos_embed_resize must be bicubic or bilinear, got {self.pos_embed_resize!r}")
        if self.global_pool and self.map_pool:
            raise ValueError("global_pool and map_pool exclude each other")
        if self.rope not in ("", *ROPE_KINDS):
            raise ValueError(f"unknown rope {self.rope!r} (known: {', '.join(ROPE_KINDS)})")
        if self.mlp_norm and not self.swiglu:
            raise ValueError("mlp_norm is a LayerNorm inside a SwiGLU MLP")
        if not self.class_token and not (self.global_pool or self.map_pool):
            raise ValueError("a ViT without a class token pools by global_pool or map_pool")
        if self.mean is not None and self.std is not None:  # from JSON they come back as lists
            self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_reg_tokens

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    def num_tokens(self, image_size: int | tuple[int, int] | None = None) -> int:
        """The tokens of an input of ``image_size``: N (square) or (height, width); default the native size."""
        size = image_size or self.image_size
        height, width = (size, size) if isinstance(size, int) else size
        return self.num_prefix_tokens + (height // self.patch_size) * (width // self.patch_size)

    def to_dict(self) -> dict:
        """The fields, those added for the RoPE families (EVA-02, DINOv3) only where they differ from their
        defaults: a plain ViT's dict, which the feature cache's backbone fingerprint hashes, stays as before."""
        fields = asdict(self)
        return {key: value for key, value in fields.items()
                if key not in ROPE_ERA_FIELDS or value != ROPE_ERA_FIELDS[key]}

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# fields written by ViTConfig.to_dict only where they differ from these defaults
ROPE_ERA_FIELDS = {"mlp_norm": False, "rope": "", "rope_temperature": 10000.0, "rope_grid": 0,
                   "absolute_pos_embed": True}
ROPE_KINDS = ("eva", "dinov3")


class RotaryEmbedding:
    """2-D rotary position embeddings of the patch tokens (timm's ``RotaryEmbeddingCat`` for EVA-02 and
    ``RotaryEmbeddingDinoV3``, transformers' ``DINOv3ViTRopePositionEmbedding``).

    Per patch (row y, column x) and head channel pair, the angle is a coordinate times a frequency: head_dim/4
    frequencies ``temperature ** (-k / (head_dim / 4))`` for y, then the same for x. ``eva``: coordinates
    are the grid indices scaled to the pretraining grid ``rope_grid`` (index * rope_grid / grid), pairs
    interleaved (channels 2i and 2i+1); ``dinov3``: coordinates are the patch centres in [-1, 1], times 2π,
    pairs split in halves (channels i and i + head_dim/2); either way each axis is scaled on its own, so a
    grid of height != width is rotated as timm and transformers rotate it. Prefix tokens carry no position
    and are not rotated. The tables are computed in float32 per grid and kept.

    The tokens say how many patches there are, not their grid: that is ``input_grid``, the (height, width)
    in patches of the input the model runs at (:meth:`VisionTransformer.set_input_size`, which
    :meth:`VisionTransformer.embed` calls with its images' size).
    """

    def __init__(self, config: ViTConfig) -> None:
        self.config = config
        self.head_dim = config.embed_dim // config.num_heads
        self._tables: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}
        self.input_grid: tuple[int, int] | None = None

    def grid(self, num_patches: int) -> tuple[int, int]:
        """The grid of ``num_patches`` patch tokens: ``input_grid`` where it holds that many, else the square."""
        if self.input_grid is not None and self.input_grid[0] * self.input_grid[1] == num_patches:
            return self.input_grid
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patch tokens make no square grid and the input grid is "
                             f"{self.input_grid}: set the input size (VisionTransformer.set_input_size)")
        return side, side

    def tables(self, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (height * width, head_dim) in float32."""
        key = (height, width, device)
        if key not in self._tables:
            config, bands = self.config, self.head_dim // 4
            freqs = config.rope_temperature ** (-torch.arange(bands, dtype=torch.float32) / bands)
            if config.rope == "eva":
                axes = [torch.arange(side, dtype=torch.float32) * (config.rope_grid / side if config.rope_grid else 1.0)
                        for side in (height, width)]
            else:
                axes = [torch.arange(0.5, side, dtype=torch.float32) / side * 2 - 1 for side in (height, width)]
                freqs = 2 * math.pi * freqs
            coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 1)  # (N, 2): y, x
            angles = (coords[:, :, None] * freqs).flatten(1)  # (N, head_dim / 2)
            angles = angles.repeat_interleave(2, -1) if config.rope == "eva" else torch.cat([angles, angles], -1)
            self._tables[key] = (angles.cos().to(device), angles.sin().to(device))
        return self._tables[key]

    def rotate(self, x: Tensor) -> Tensor:
        """``x`` (B, N, D): tokens' queries or keys, their patch tokens (after the prefix) rotated by
        position, per head."""
        prefix = self.config.num_prefix_tokens
        patches = x[:, prefix:].unflatten(-1, (-1, self.head_dim))  # B, P, H, hd
        cos, sin = self.tables(*self.grid(patches.shape[1]), x.device)
        cos, sin = cos[:, None], sin[:, None]
        if self.config.rope == "eva":
            pairs = patches.unflatten(-1, (-1, 2))
            turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        else:
            first, second = patches.chunk(2, dim=-1)
            turned = torch.cat([-second, first], dim=-1)
        rotated = (patches * cos + turned * sin).to(x.dtype).flatten(-2)
        return torch.cat([x[:, :prefix], rotated], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """``fc2(silu(x W_gate) * (x W_in))`` with the gate and input projections packed in ``fc1`` (gate
    first), as timm's ``SwiGLUPacked`` and DINOv2's ``weights_in``."""

    def __init__(self, dim: int, hidden: int, norm_eps: float | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(hidden, eps=norm_eps) if norm_eps is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.norm(self.act(gate) * value))


def make_mlp(config: ViTConfig) -> nn.Module:
    if config.swiglu:
        return SwiGLU(config.embed_dim, config.mlp_hidden, config.norm_eps if config.mlp_norm else None)
    return Mlp(config.embed_dim, config.mlp_hidden, config.act)


class Projection(Protocol):
    """What a block reads of its qkv projection: an ``nn.Linear``, or a module standing in for
    one with the effective weight and bias (LoRA's ``LoRAQKV``)."""

    @property
    def weight(self) -> Tensor: ...

    @property
    def bias(self) -> Tensor | None: ...

    def __call__(self, x: Tensor) -> Tensor: ...


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.rope = rope  # a plain object shared by the blocks, not a module: it holds no weights
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv: Projection = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, H, N, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def projections(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The queries, keys and values (B, N, D) of normalised tokens ``u``, the patch tokens' queries and
        keys rotated by position on a RoPE backbone."""
        q, k, v = self.qkv(u).chunk(3, dim=-1)
        if self.rope is not None:
            q, k = self.rope.rotate(q), self.rope.rotate(k)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Every query against every key and value (B, N, D), then the output projection."""
        out = F.scaled_dot_product_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v))
        return self.proj(out.transpose(1, 2).flatten(2))

    def forward(self, u: Tensor) -> Tensor:
        """Self-attention of normalised tokens ``u``."""
        return self.attend(*self.projections(u))


class RowsOutput(NamedTuple):
    """What a block computes for extra rows.

    ``out`` is the rows' block output; ``attn`` the attention branch after the output
    projection and LayerScale (before the residual); ``mlp`` the MLP branch after
    LayerScale (before the residual), so ``out = rows + attn + mlp``.
    """

    out: Tensor
    attn: Tensor
    mlp: Tensor


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale.

    Methods that adapt the block put a module of theirs in place of one of its own: LoRA's ``LoRAQKV``
    in place of ``attn.qkv``, plain memory's ``MemoryAttention`` in place of ``attn``, and AdaptFormer's
    ``AdaptedBlock``, whose :meth:`mlp_branch` adds its adapter, in place of the block.
    """

    def __init__(self, config: ViTConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias, rope)
        self.ls1 = LayerScale(dim) if config.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = make_mlp(config)
        self.ls2 = LayerScale(dim) if config.layer_scale else nn.Identity()
        self.checkpointing = False  # see VisionTransformer.set_grad_checkpointing

    def mlp_branch(self, a: Tensor) -> Tensor:
        """The MLP branch (after LayerScale, before the residual) of ``a``, the residual stream after attention."""
        return self.ls2(self.mlp(self.norm2(a)))

    def forward(self, x: Tensor) -> Tensor:
        """Ordinary forward."""
        return self.forward_normed(x, self.norm1(x))

    def forward_normed(self, x: Tensor, u: Tensor) -> Tensor:
        """Ordinary forward given ``u = norm1(x)`` (lets the trunk keep ``u`` as a feature)."""
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward_normed, x, u, use_reentrant=False)
        return self._forward_normed(x, u)

    def _forward_normed(self, x: Tensor, u: Tensor) -> Tensor:
        a = x + self.ls1(self.attn(u))
        return a + self.mlp_branch(a)

    def forward_rows(self, rows: Tensor, context: Tensor, extra: Tensor | None = None,
                     mask: Tensor | None = None) -> RowsOutput:
        """Push extra ``rows`` (B, R, D) through this block's weights.

        The rows' attention queries are ``norm1(rows) Wq``. Their keys and values are
        those of ``context`` (B, N, D), the block's *normalised* input tokens
        ``norm1(X)``, followed by those of ``extra`` (B, E, D), un-normalised tokens
        such as the rows themselves or memory tokens. ``mask`` (R, N + E) or
        (B, R, N + E) is added to the attention logits (use ``-inf`` to forbid).
        ``extra`` may also come in G groups, (B, G, E, D): the rows then split into G equal
        consecutive groups, and group g reads ``extra[:, g]`` only (no mask; the other
        groups' extras are never touched, so a non-finite value in one cannot reach the
        others, as it would through a ``-inf`` mask). The context tokens are read, never changed.

        The key bias adds the same ``q . b_k`` to every logit of a row, so it cancels
        in the softmax; the value bias is added once since attention weights sum to 1.
        The attention branch alone is :meth:`rows_attention`, the MLP branch :meth:`mlp_branch` (a method
        that drops branches, SynQT, composes them itself).

        The attention is computed one of two ways, whichever :func:`rows_attention_path` finds has fewer
        multiply-adds: ``folded`` folds W_k and W_v into each row, so the tokens are read as they are
        (cheapest for a few rows); ``projected`` projects the tokens' keys and values once for all rows
        (cheapest for many rows, such as stacked grid members). Grouped extra tokens are read folded.

        With rotary position embeddings (``ViTConfig.rope``: DINOv3, EVA-02) a token's key is rotated by
        its position, so ``W_k`` cannot be folded into the rows: the context's keys are projected (with
        their bias, which no longer cancels) and their patch tokens rotated, whatever the row count. The rows
        carry no position, like the class and register tokens, which these models never rotate either:
        a query row belongs to no patch, and reading every position alike is what a class token does.
        Extra tokens (memory, the rows themselves) carry none either.
        """
        attn_branch = self.rows_attention(rows, context, extra, mask)
        a = rows + attn_branch
        mlp_branch = self.mlp_branch(a)
        return RowsOutput(a + mlp_branch, attn_branch, mlp_branch)

    def rows_attention(self, rows: Tensor, context: Tensor, extra: Tensor | None = None,
                       mask: Tensor | None = None) -> Tensor:
        """The attention branch of :meth:`forward_rows` (after the output projection and LayerScale)."""
        attn = self.attn
        _, num_rows, dim = rows.shape
        heads_shape = (attn.num_heads, attn.head_dim)
        w_q, w_k, w_v = attn.qkv.weight.split(dim, dim=0)
        b_q = attn.qkv.bias[:dim] if attn.qkv.bias is not None else None
        b_v = attn.qkv.bias[2 * dim :] if attn.qkv.bias is not None else None

        device_type = context.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast the shared tokens once here, not once per matmul below (autocast would).
            context = context.to(torch.get_autocast_dtype(device_type))
        q = F.linear(self.norm1(rows), w_q, b_q).unflatten(-1, heads_shape)  # B, R, H, hd
        extra_normed = self.norm1(extra) if extra is not None else None  # B, (G,) E, D
        grouped = extra is not None and extra.dim() == 4
        if grouped and mask is not None:
            raise ValueError("grouped extra tokens take no mask")
        if attn.rope is not None:
            values = self._rotary_attention(q, context, extra_normed, mask, w_k, w_v)
        elif grouped or rows_attention_path(num_rows, context.shape[1], dim, attn.num_heads,
                                            rows.requires_grad and torch.is_grad_enabled(),
                                            context.requires_grad) == "folded":
            values = self._folded_attention(q, context, extra_normed, mask, w_k, w_v)
        else:
            values = self._projected_attention(q, context, extra_normed, mask, w_k, w_v)
        if b_v is not None:
            values = values + b_v
        return self.ls1(attn.proj(values))

    def _folded_attention(self, q: Tensor, context: Tensor, extra_normed: Tensor | None, mask: Tensor | None,
                          w_k: Tensor, w_v: Tensor) -> Tensor:
        """The rows' attention values (B, R, D) before the value bias, with W_k and W_v folded into the rows."""
        attn = self.attn
        _, num_rows, heads, head_dim = q.shape
        # Fold W_k into the query: logit = (q_h W_k,h) . u. Heads and rows share one axis so
        # that every product below is a plain batched matmul against the shared tokens.
        q_folded = torch.einsum("brhe,hed->brhd", q, w_k.unflatten(0, (heads, head_dim))).flatten(1, 2) * attn.scale
        logits = q_folded @ context.transpose(1, 2)  # B, R*H, N
        groups = extra_normed.shape[1] if extra_normed is not None and extra_normed.dim() == 4 else None
        if groups is not None:  # group g's rows (consecutive) against extra_normed[:, g] only
            assert extra_normed is not None
            extra_logits = (q_folded.unflatten(1, (groups, -1)) @ extra_normed.transpose(-1, -2)).flatten(1, 2)
            logits = torch.cat([logits, extra_logits], dim=-1)
        elif extra_normed is not None:
            logits = torch.cat([logits, q_folded @ extra_normed.transpose(1, 2)], dim=-1)
        if mask is not None:
            # mask: (B,) R, N+E -> broadcast over heads
            logits = (logits.unflatten(1, (num_rows, heads)) + mask.unsqueeze(-2)).flatten(1, 2)
        weights = logits.softmax(dim=-1)
        n_ctx = context.shape[1]
        mixed = weights[..., :n_ctx] @ context  # B, R*H, D: attention-weighted normalised tokens
        if groups is not None:
            assert extra_normed is not None
            mixed = mixed + (weights[..., n_ctx:].unflatten(1, (groups, -1)) @ extra_normed).flatten(1, 2)
        elif extra_normed is not None:
            mixed = mixed + weights[..., n_ctx:] @ extra_normed
        # Apply W_v per head: (B, R, H, D) x (H, hd, D) -> (B, R, H, hd)
        return torch.einsum("brhd,hed->brhe", mixed.unflatten(1, (num_rows, heads)),
                            w_v.unflatten(0, (heads, head_dim))).flatten(2)

    def _rotary_attention(self, q: Tensor, context: Tensor, extra_normed: Tensor | None, mask: Tensor | None,
                          w_k: Tensor, w_v: Tensor) -> Tensor:
        """The rows' attention values (B, R, D) before the value bias on a RoPE backbone: the context's keys
        projected with their bias and rotated by position; extra tokens, grouped or not, unrotated."""
        attn = self.attn
        assert attn.rope is not None
        b_k = attn.qkv.bias[w_k.shape[0] : 2 * w_k.shape[0]] if attn.qkv.bias is not None else None
        keys, values = attn.rope.rotate(F.linear(context, w_k, b_k)), F.linear(context, w_v)  # B, N, D
        queries = q  # B, R, H, hd
        if extra_normed is not None:
            extra_keys, extra_values = F.linear(extra_normed, w_k, b_k), F.linear(extra_normed, w_v)
            if extra_normed.dim() == 4:  # group g's rows (consecutive) read the context and extra[:, g]
                groups = extra_normed.shape[1]
                keys = torch.cat([keys.unsqueeze(1).expand(-1, groups, -1, -1), extra_keys], dim=2)
                values = torch.cat([values.unsqueeze(1).expand(-1, groups, -1, -1), extra_values], dim=2)
                queries = q.unflatten(1, (groups, -1))  # B, G, R/G, H, hd
            else:
                keys, values = torch.cat([keys, extra_keys], dim=1), torch.cat([values, extra_values], dim=1)

        def heads(tokens: Tensor) -> Tensor:  # (..., T, D) -> (..., H, T, hd)
            return tokens.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(-3, -2)

        attn_mask = mask.unsqueeze(-3) if mask is not None else None  # (B,) 1, R, N+E: the same for every head
        out = F.scaled_dot_product_attention(queries.transpose(-3, -2), heads(keys), heads(values),
                                             attn_mask=attn_mask)
        return out.transpose(-3, -2).flatten(-2).reshape(q.shape[0], q.shape[1], -1)

    def _projected_attention(self, q: Tensor, context: Tensor, extra_normed: Tensor | None, mask: Tensor | None,
                             w_k: Tensor, w_v: Tensor) -> Tensor:
        """The rows' attention values (B, R, D) before the value bias, from keys and values projected once.
        The key bias is left out as in the folded path (it cancels in the softmax)."""
        tokens = context if extra_normed is None else torch.cat([context, extra_normed], dim=1)
        keys = self.attn.split_heads(F.linear(tokens, w_k))  # B, H, N+E, hd
        values = self.attn.split_heads(F.linear(tokens, w_v))
        attn_mask = mask.unsqueeze(-3) if mask is not None else None  # (B,) 1, R, N+E: the same for every head
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attn_mask)  # B, H, R, hd
        return out.transpose(1, 2).flatten(2)


def rows_attention_path(num_rows: int, num_tokens: int, dim: int, heads: int, rows_grad: bool,
                        context_grad: bool) -> str:
    """The cheaper way (``folded`` or ``projected``) for ``num_rows`` rows to attend to ``num_tokens``
    tokens, by multiply-adds per sample.

    Folded: each row and head reads every token through its folded query and again to mix them,
    2·H·N·D per row. Projected: the tokens' keys and values cost 2·N·D² once (the weights are
    frozen), then each row 2·N·D. Backward repeats a product once for each operand that needs a
    gradient. So the folded path wins for a handful of rows, the projected one once the rows
    outnumber about D / H (D / 2H while training the rows against frozen tokens).
    """
    passes = 1 + rows_grad + context_grad  # a product of rows and tokens: forward, then a gradient for each side
    folded = 2 * heads * num_tokens * dim * num_rows * passes
    projected = 2 * num_tokens * dim * dim * (1 + context_grad) + 2 * num_tokens * dim * num_rows * passes
    return "projected" if projected < folded else "folded"


class AttentionPool(nn.Module):
    """The multi-head attention-pooling (MAP) head of SigLIP (timm's ``AttentionPoolLatent``, one latent):
    a learned query attends to the tokens, then a pre-norm MLP with a residual; (B, N, D) -> (B, D)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, config.mlp_hidden, config.act)

    def forward(self, x: Tensor) -> Tensor:
        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        keys, values = self.kv(x).chunk(2, dim=-1)
        query = self.q(self.latent).expand(x.shape[0], -1, -1)
        pooled = F.scaled_dot_product_attention(heads(query), heads(keys), heads(values))
        pooled = self.proj(pooled.transpose(1, 2).flatten(2))[:, 0]
        return pooled + self.mlp(self.norm(pooled))


if TYPE_CHECKING:
    M = TypeVar("M", bound=nn.Module)

    class ModuleListOf(nn.ModuleList, Generic[M]):
        """How the type checker sees an ``nn.ModuleList`` whose modules are all of one class."""

        def __iter__(self) -> Iterator[M]: ...

        @overload
        def __getitem__(self, idx: slice) -> nn.ModuleList: ...

        @overload
        def __getitem__(self, idx: int) -> M: ...

        def __getitem__(self, idx: int | slice) -> M | nn.ModuleList: ...


class VisionTransformer(nn.Module):
    """ViT with an optional class token, register tokens, LayerScale and the family options of
    :class:`ViTConfig` (timm names)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim, bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, config.num_reg_tokens, dim)) if config.num_reg_tokens else None
        num_pos = config.pos_embed_prefix + config.grid_size**2
        self.pos_embed = nn.Parameter(torch.randn(1, num_pos, dim) * 0.02) if config.absolute_pos_embed else None
        self.pos_embed_grid = (config.grid_size, config.grid_size)  # (height, width) of pos_embed's patch positions
        self.norm_pre = nn.LayerNorm(dim, eps=config.norm_eps) if config.norm_pre else nn.Identity()
        self.rope = RotaryEmbedding(config) if config.rope else None
        self.blocks = cast("ModuleListOf[Block]",
                           nn.ModuleList(Block(config, self.rope) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn_pool = AttentionPool(config) if config.map_pool else None
        self._init_weights()

    def _init_weights(self) -> None:
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's inputs for backward and recompute the rest there (as timm's method of
        this name): less activation memory for the methods that backpropagate through the trunk."""
        for block in self.blocks:
            block.checkpointing = enable

    @property
    def num_features(self) -> int:
        return self.config.embed_dim

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def set_input_size(self, height: int, width: int) -> None:
        """Run at ``height`` x ``width`` pixels: the grid the rotary position embeddings (DINOv3, EVA-02) give
        patch tokens that reach the blocks without passing :meth:`embed`, such as cached features, whose
        count does not tell a non-square grid (:class:`RotaryEmbedding`). Absolute position embeddings
        follow each input's size at run time and need nothing."""
        if self.rope is not None:
            # int(): under ONNX tracing the sizes are traced values; the rotation tables want plain ints
            self.rope.input_grid = (int(height) // self.config.patch_size, int(width) // self.config.patch_size)

    def position_embedding(self, height: int, width: int) -> tuple[Tensor, Tensor] | None:
        """(prefix position embeddings, patch position embeddings) for a grid of height x width patches.

        Patch embeddings are resized with bicubic interpolation (in float32, as DINOv2
        and Hugging Face do) when the grid differs from the pretrained one (``pos_embed_grid``), each axis
        to its own size. None without absolute position embeddings (DINOv3: its positions are rotary only).
        """
        if self.pos_embed is None:
            return None
        prefix = self.pos_embed[:, : self.config.pos_embed_prefix]
        patch = self.pos_embed[:, self.config.pos_embed_prefix :]
        if (height, width) != self.pos_embed_grid:
            grid = patch.reshape(1, *self.pos_embed_grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(
                grid.float(), size=(height, width), mode=self.config.pos_embed_resize, align_corners=False,
                antialias=self.config.pos_embed_antialias,
            )
            patch = grid.to(patch.dtype).permute(0, 2, 3, 1).reshape(1, height * width, -1)
        return prefix, patch

    def embed(self, images: Tensor) -> Tensor:
        """Tokens entering the first block: [class, registers, patches] with position embeddings (and
        ``norm_pre``)."""
        patches = self.patch_embed(images)
        self.set_input_size(images.shape[-2], images.shape[-1])
        height = images.shape[-2] // self.config.patch_size
        width = images.shape[-1] // self.config.patch_size
        positions = self.position_embedding(height, width)
        batch = patches.shape[0]
        prefix = [token.expand(batch, -1, -1) for token in (self.cls_token, self.reg_token) if token is not None]
        tokens = patches if positions is None else patches + positions[1]
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            n_pos = self.config.pos_embed_prefix
            if n_pos and positions is not None:
                pos_prefix = positions[0]
                prefix_tokens = torch.cat([prefix_tokens[:, :n_pos] + pos_prefix, prefix_tokens[:, n_pos:]], dim=1)
            tokens = torch.cat([prefix_tokens, tokens], dim=1)
        return self.norm_pre(tokens)

    def class_token_input(self) -> Tensor:
        """The class token as it enters block 0 (with its position embedding if it has one, and
        ``norm_pre``), shape (1, D)."""
        if self.cls_token is None:
            raise ValueError(f"{self.config.name} has no class token")
        token = self.cls_token[0]
        if self.config.pos_embed_prefix and self.pos_embed is not None:
            token = token + self.pos_embed[0, :1]
        return self.norm_pre(token)

    def run_blocks(
        self,
        x: Tensor,
        before_block: Callable[[int, Tensor], Tensor] | None = None,
        after_norm: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """The block loop: every block over tokens ``x`` (B, N, D); returns the last block's output
        (before the final norm).

        ``before_block(l, x)`` may change the tokens entering block l (VPT inserts its prompts
        there); ``after_norm(l, u)`` receives each block's normalised input ``u = norm1(x)``, what
        the frozen-trunk methods read (the feature cache stores it).
        """
        for index, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(index, x)
            u = block.norm1(x)
            if after_norm is not None:
                after_norm(index, u)
            x = block.forward_normed(x, u)
        return x

    def pool(self, x: Tensor, inserted: int = 0) -> Tensor:
        """The final feature (B, D) from the last block's output tokens ``x``: the normalised class token,
        with ``global_pool`` the normalised mean of the patch tokens, which follow the prefix tokens
        and ``inserted`` tokens a method put after them (VPT's prompts), with ``map_pool`` the attention
        pool over the normalised tokens (the inserted ones left out)."""
        prefix = self.config.num_prefix_tokens
        if self.attn_pool is not None:
            return self.attn_pool(self.norm(torch.cat([x[:, :prefix], x[:, prefix + inserted :]], dim=1)))
        if self.config.global_pool:
            return self.norm(x[:, prefix + inserted :].mean(1))
        return self.norm(x[:, 0])

    def forward_features(self, images: Tensor) -> Tensor:
        return self.norm(self.run_blocks(self.embed(images)))

    def forward(self, images: Tensor) -> Tensor:
        """The final feature (:meth:`pool`), (B, D)."""
        return self.pool(self.run_blocks(self.embed(images)))
