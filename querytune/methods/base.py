"""The small contract every method follows (one file per method).

A method is an ``nn.Module`` built from a backbone, a number of classes and its
options dataclass. ``reads`` (:class:`~querytune.trunk.TrunkInput`) declares what it
takes from the trunk, which decides its input:

- ``CLASS_TOKEN`` or ``LAYERS``: the trunk runs once under ``no_grad`` (or is read from
  the feature cache) and ``forward`` receives :class:`~querytune.trunk.features.Features`
  (with the per-block tokens for ``LAYERS``);
- ``IMAGES``: the method adapts the backbone's features, so ``forward`` receives images
  and the trunk runs with autograd.

Only the parameters that require grad are trained and saved (``trainable_state_dict``).
``train_defaults`` holds the published protocol's training settings.

What the rest of querytune asks a method, so that adding one means one file:

- ``not_mergeable`` (``querytune export --format merged``): why its trained state has no place in a
  plain ViT's weights, or None where it has one (its backbone and linear ``head`` are a plain ViT's);
- ``peft_exportable`` and ``to_peft()`` (``--format peft``): whether PEFT has the very same adapter
  (LoRA only), and the run's adapter as a PEFT model of its Hugging Face backbone;
- ``shared_rows()`` (:class:`~querytune.serve.MultiTaskServer`): the :class:`SharedRows` that serving
  merges with the other served runs' of the same kind, so that the work of all of them runs as one
  (rows through the blocks in one pass, heads in one matmul), or None;
- ``published_way()`` (``querytune measure --method NAME-naive``): the method executed the way its
  published code does, to measure what that costs, or None where there is no other way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..errors import CheckpointError, ConfigError
from ..options import check_options
from ..trunk import TrunkInput
from ..trunk.features import Features

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass
class NoOptions:
    """This method takes no options."""


class Method(nn.Module):
    name: ClassVar[str]
    reads: ClassVar[TrunkInput] = TrunkInput.LAYERS
    Options: ClassVar[type] = NoOptions
    train_defaults: ClassVar[dict[str, Any]] = {}
    # Learning-rate x weight-decay grid (:func:`querytune.grid.search_grid`) for `querytune train --grid`
    # and `querytune bench --search` (VPT/VQT's grid for Adam; learning rates are multiplied by batch/256
    # when scale_lr_by_batch is set).
    search_grid: ClassVar[dict[str, Any]] = {"lr": (1.0, 0.5, 0.25, 0.1, 0.05),
                                             "weight_decay": (1e-2, 1e-3, 1e-4, 0.0), "scale_lr_by_batch": True}
    # Method options the search crosses with that grid (name -> values, the protocol's default first): what the
    # protocol fixed for 1,000 images but matters with fewer. A stack's members may differ in these, so the
    # method's ``forward_members`` must take members with different values of them.
    search_options: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # False: weight decay on the trainable matrices only, not on 1-D parameters (biases, scales), as the
    # official code of methods trained with timm's optimiser factory has it.
    decay_vectors: ClassVar[bool] = True
    not_mergeable: ClassVar[str | None] = "it adds modules a plain ViT lacks"
    peft_exportable: ClassVar[bool] = False

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.options = options

    # ``Any``: each method takes what its ``reads`` gives it (Features or images) and narrows the type.
    def forward(self, inputs: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def forward_members(members: Sequence[Method], inputs: Any,
                        random_stream: Callable[[int], AbstractContextManager[None]]) -> list[Tensor]:
        """The logits of every member of a grid (:mod:`querytune.grid`: one method and its options, each
        member with its own parameters) on one batch; inside ``random_stream(k)`` member k's random
        draws (dropout) come from its own stream. Here each member runs its own forward; a method whose
        members can share the work overrides this, and its ``forward`` is then this of one member (with
        :func:`current_stream`), so that the method has one computation."""
        outputs = []
        for k, member in enumerate(members):
            with random_stream(k):
                outputs.append(member(inputs))
        return outputs

    def loss_penalty(self) -> Tensor | None:
        """A term the training loop adds to this method's loss (Head2Toe's group lasso), or None."""
        return None

    def shared_rows(self) -> SharedRows | None:
        """The rows that serving may merge with other runs' rows of their kind into one pass; None: served alone."""
        return None

    def to_peft(self, hf_model: nn.Module, modules_to_save: list[str]) -> Any:
        """This run's adapter as a PEFT model of ``hf_model``, the Hugging Face transformers model of its
        backbone, holding the trained adapter weights; PEFT keeps the modules named in ``modules_to_save``
        whole (the classifier, which the caller fills). Only where ``peft_exportable``."""
        raise NotImplementedError(f"method {self.name!r} has no PEFT equivalent")

    def published_way(self) -> Method | None:
        """This method executed the way its published code does (same parameters), or None."""
        return None

    def post_train(self, source: Any, cfg: Any, device: torch.device) -> dict[str, Any]:
        """Work after the main training (e.g. head compression); returns extra metrics."""
        return {}

    @contextmanager
    def apart_from_backbone(self) -> Iterator[Self]:
        """This method, its backbone set aside (not a submodule) meanwhile where the method reads the frozen trunk
        (else the method as it is): its own modules moved, switched to eval mode or listed without walking the
        backbone's hundreds of modules each time, as serving many tasks on one backbone does per task."""
        if not self.reads.frozen:
            yield self
            return
        order = list(self._modules)
        backbone = self._modules.pop("backbone")
        try:
            yield self
        finally:
            modules = {name: backbone if name == "backbone" else self._modules[name] for name in order}
            self._modules.clear()
            self._modules.update(modules)

    def _state(self) -> dict[str, Tensor]:
        """What an adapter holds: the trainable parameters and the method's own buffers (a frozen trunk has
        neither)."""
        with self.apart_from_backbone():
            state: dict[str, Tensor] = {name: p for name, p in self.named_parameters() if p.requires_grad}
            state.update((name, b) for name, b in self.named_buffers() if not name.startswith("backbone."))
        return state

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {name: t.detach() for name, t in self._state().items()}

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def load_trainable_state_dict(self, state: dict[str, Tensor], source: str = "adapter") -> None:
        """Load exactly the trainable parameters; any missing, extra or misshapen tensor is an error."""
        expected = self._state()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: does not fit method {self.name!r} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, param in expected.items():
            if state[name].shape != param.shape:
                raise CheckpointError(
                    f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                    f"method {self.name!r} expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(state[name])
        with self.apart_from_backbone():
            self.train(self.training)  # re-apply the mode: mode-dependent state (LoRA's merged weights) follows


class SharedRows(nn.Module):
    """What the served runs of one method compute together from the frozen trunk's features, in eval mode:
    rows passing the blocks in one call per block (masked memory's class tokens, VQT's queries, SynQT's
    synthesized queries), each reading the blocks' tokens (not changing them, never another task's rows
    unless it was trained to), and heads applied as one matmul (linear, Head2Toe, VQT). Each row gives a
    task's logits.

    A run's rows end with the row of its own logits; the rows before it are rows it reads (an extension
    reads its base run's)."""

    def forward(self, features: Features, backbone: VisionTransformer) -> list[Tensor]:
        """Each row's logits from the frozen trunk's ``features`` of ``backbone``."""
        raise NotImplementedError  # pragma: no cover - abstract

    @classmethod
    def merge(cls, parts: Sequence[Self]) -> tuple[Self, list[list[int]]]:
        """One set running the rows of all ``parts`` (rows equal in every respect may run once), and for
        each part where its rows went."""
        raise NotImplementedError  # pragma: no cover - abstract


RowsT = TypeVar("RowsT", bound="SharedRows")


def concatenated(cls: Callable[[list[Any]], RowsT], items: Sequence[Sequence[Any]]) -> tuple[RowsT, list[list[int]]]:
    """:meth:`SharedRows.merge` of sets of one row per item (a task's method or head): ``cls`` built from the
    parts' ``items`` concatenated, and where each part's rows went."""
    return cls([item for part in items for item in part]), consecutive_placement([len(part) for part in items])


def consecutive_placement(sizes: Sequence[int]) -> list[list[int]]:
    """Where the rows of parts of these ``sizes`` go when they are concatenated (for :meth:`SharedRows.merge`)."""
    placement, start = [], 0
    for size in sizes:
        placement.append(list(range(start, start + size)))
        start += size
    return placement


def current_stream(k: int) -> AbstractContextManager[None]:
    """The random streams of a lone member (``forward_members`` of one): the current stream."""
    return nullcontext()


def parse_options(method_cls: type[Method], given: dict[str, Any]) -> Any:
    """Build ``method_cls.Options`` from user-given values; unknown names and bad values are errors."""
    check_options(method_cls.Options, given, method_cls.name)
    try:
        return method_cls.Options(**given)
    except (TypeError, ValueError) as error:  # checks across options, in __post_init__
        raise ConfigError(f"method {method_cls.name!r}: {error}") from error
