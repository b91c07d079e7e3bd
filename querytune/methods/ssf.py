"""SSF: scale and shift the features after every operation (Lian et al., NeurIPS 2022).

Each adapted operation's output y gets a learnt per-channel affine map over its last
(channel) axis,

    y' = y * s + t,    s ~ N(1, 0.02),  t ~ N(0, 0.02) at initialisation,

so a new model is close to, not equal to, the backbone. Where (the official code's
``tuning_mode='ssf'``, github.com/dongzelian/SSF, models/vision_transformer.py): after
the patch embedding's projection (per output channel), in every block after ``norm1``,
``attn.qkv`` (3D channels), ``attn.proj``, ``norm2``, ``mlp.fc1`` (the hidden width) and
``mlp.fc2``, and after the final ``norm``. LayerScale, where the backbone has it, stays
after the scaled ``proj`` and ``fc2``. Per block that is 2 x (D + 3D + D + D + H + D)
parameters (H the MLP width), plus 2D at the patch embedding and 2D at the final norm.
The backbone stays frozen; the scales, shifts and a new linear head on the backbone's
final feature train.

Each affected module (Linear, the patch embedding's Conv2d, LayerNorm) is wrapped in a
module holding the frozen original and ``scale``/``shift``. In train mode it computes
op(x) * s + t as the official code does; in eval mode it computes op with the merged
parameters, which is the same map (the paper's re-parameterisation): a linear map W, b
becomes diag(s) W, s * b + t, a LayerNorm's gain g and bias b become g * s, b * s + t.
The wrappers' ``weight`` and ``bias`` are these merged values, so code reading a
module's weights directly (:meth:`Block.forward_rows`, ``export --format merged``) sees
the adapted operation. A qkv projection without bias gains one (the shift): the
adapted backbone's config then says ``qkv_bias``, so the merged export has that bias.

Training as in the official VTAB-1k scripts (train_scripts/vit/vtab/*/train_ssf.sh;
defaults from cifar_100's): AdamW, lr 5e-3, weight decay 5e-5 on the weight matrices only
(every 1-D parameter, i.e. all scales, shifts and biases, is exempt, as timm's optimiser
factory has it), batch 64 (32 on each of 2 GPUs), 100 epochs, 10 warm-up epochs, cosine
to 1e-8, no augmentation, mixup or label smoothing. ``search_grid`` spans the per-task
learning rates (1e-2 to 1e-3) and weight decays (5e-2, 5e-5) of those scripts.
Deviations: the scripts use drop-path 0 to 0.2 depending on the task, querytune's
backbone forward has none; querytune's warm-up starts at 0, not at 1e-7, and steps per
iteration.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..errors import ConfigError
from ..trunk import TrunkInput
from .base import Method, NoOptions
from .registry import register


class ScaleShift(nn.Module):
    """A frozen operation ``base`` followed by ``y * scale + shift`` over its output channels."""

    base: nn.Linear | nn.LayerNorm | nn.Conv2d

    def __init__(self, base: nn.Linear | nn.LayerNorm | nn.Conv2d, channels: int) -> None:
        super().__init__()
        self.base = base
        device = base.weight.device
        self.scale = nn.Parameter(torch.empty(channels, device=device).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(channels, device=device).normal_(0.0, 0.02))

    def _channels(self, x: Tensor) -> Tensor:
        """``x`` (one value per output channel) shaped to multiply the base weight."""
        return x.reshape(-1, *([1] * (self.base.weight.dim() - 1)))

    @property
    def weight(self) -> Tensor:
        return self.base.weight * self._channels(self.scale)

    @property
    def bias(self) -> Tensor:
        base_bias = self.base.bias
        return self.shift if base_bias is None else base_bias * self.scale + self.shift


class SSFLinear(ScaleShift):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base, base.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.base(x) * self.scale + self.shift
        return F.linear(x, self.weight, self.bias)


class SSFLayerNorm(ScaleShift):
    def __init__(self, base: nn.LayerNorm) -> None:
        if base.weight is None or len(base.normalized_shape) != 1:
            raise ConfigError("SSF adapts LayerNorms with a gain over the channel axis only")
        super().__init__(base, base.normalized_shape[0])
        self.eps = base.eps  # read by the naive block (querytune.methods.vqt.naive_block_parts)
        self.normalized_shape = base.normalized_shape

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.base(x) * self.scale + self.shift
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class SSFConv2d(ScaleShift):
    """The patch embedding's projection, scaled and shifted per output channel (the patch tokens' channels)."""

    def __init__(self, base: nn.Conv2d) -> None:
        super().__init__(base, base.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        assert isinstance(base, nn.Conv2d)
        if self.training:
            return base(x) * self.scale[:, None, None] + self.shift[:, None, None]
        return F.conv2d(x, self.weight, self.bias, base.stride, base.padding, base.dilation, base.groups)


# The adapted modules, as attribute paths from a block, and from the backbone outside the blocks.
BLOCK_PLACES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
BACKBONE_PLACES = ("patch_embed.proj", "norm")


def _wrap(root: nn.Module, path: str) -> None:
    *parents, name = path.split(".")
    parent = root
    for part in parents:
        parent = getattr(parent, part)
    module = getattr(parent, name)
    wrapper: ScaleShift
    if isinstance(module, ScaleShift):
        raise ConfigError("the backbone already carries SSF; build each method on a freshly loaded backbone")
    if type(module) is nn.Linear:
        wrapper = SSFLinear(module)
    elif type(module) is nn.LayerNorm:
        wrapper = SSFLayerNorm(module)
    elif type(module) is nn.Conv2d:
        wrapper = SSFConv2d(module)
    else:
        raise ConfigError(f"SSF adapts plain Linear, LayerNorm and Conv2d modules; {path} is a "
                          f"{type(module).__name__} (the backbone already carries another method's adapters: "
                          "build each method on a freshly loaded backbone)")
    setattr(parent, name, wrapper)  # setattr: the ViT's attributes are typed as the plain modules


def add_ssf(backbone: VisionTransformer) -> None:
    """Wrap every official place in a :class:`ScaleShift` (the backbone's own parameters stay frozen)."""
    if any(isinstance(module, ScaleShift) for module in backbone.modules()):
        raise ConfigError("the backbone already carries SSF; build each method on a freshly loaded backbone")
    backbone.requires_grad_(False)
    for path in BACKBONE_PLACES:
        _wrap(backbone, path)
    for block in backbone.blocks:
        for path in BLOCK_PLACES:
            _wrap(block, path)
    if not backbone.config.qkv_bias:  # the qkv shift is the adapted projection's bias
        backbone.config = dataclasses.replace(backbone.config, qkv_bias=True)


@register
class SSF(Method):
    name = "ssf"
    reads = TrunkInput.IMAGES
    not_mergeable = None  # the scales and shifts merge into the preceding weights
    decay_vectors = False
    Options = NoOptions
    train_defaults = {"epochs": 100, "warmup_epochs": 10, "batch_size": 64, "optimizer": "adamw", "lr": 5e-3,
                      "weight_decay": 5e-5, "min_lr": 1e-8}
    search_grid = {"lr": (1e-2, 5e-3, 3e-3, 1e-3), "weight_decay": (5e-2, 5e-5)}  # AdamW

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: NoOptions) -> None:
        super().__init__(backbone, num_classes, options)
        add_ssf(backbone)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))
