"""The frozen trunk and everything that decides how a method gets its input.

A method declares what it reads from the trunk (:class:`TrunkInput`); :func:`make_source`
turns that into batches: images for the methods that backpropagate through the trunk,
or frozen-trunk :class:`Features` computed live or read from the feature cache, on the
CPU or the GPU, in the run's precision.

- :mod:`.features`: what the frozen trunk yields (:class:`Features`) and how it is run;
- :mod:`.cache`: the on-disk feature cache;
- :mod:`.sources`: batch sources (images, live features, cached features) and :func:`make_source`;
- :mod:`.precision`: the run's one :class:`~.precision.Precision` (fp32, bf16, fp16), resolved once with the device;
- :mod:`.device`: default device and workers, moving batches.
"""

from __future__ import annotations

from enum import Enum


class TrunkInput(Enum):
    """What a method reads from the trunk: the one declaration that routes its input."""

    IMAGES = "images"  # it adapts the trunk: images in, the trunk runs with autograd
    CLASS_TOKEN = "class token"  # the frozen trunk's pooled final feature (``Features.pooled``)
    LAYERS = "layers"  # the frozen trunk's normalised tokens of every block (and the pooled feature)

    @property
    def frozen(self) -> bool:
        """The trunk runs under no_grad (or is read from the feature cache)."""
        return self is not TrunkInput.IMAGES

    @property
    def with_layers(self) -> bool:
        return self is TrunkInput.LAYERS
