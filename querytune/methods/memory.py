"""Learnable memory tokens (Sandler, Zhmoginov, Vladymyrov, Jackson; CVPR 2022), non-destructive.

Per block l, m memory tokens E_l (init N(0, 0.02)) add keys and values only: whoever
may attend to them reads them, and their own outputs are discarded.

A task adds a class token C (init: the backbone's class token as it enters block 0; on a
backbone without one, such as SigLIP, N(0, 0.02) like the memory), its memory M and a head.
C is propagated through every block and attends to the original tokens, itself and M; the
original tokens attend only to each other, so they are exactly the frozen trunk's. The trunk
therefore runs under no_grad (or comes from the feature cache) and C passes each block as a
row of :meth:`Block.forward_rows` reading the block's normalised tokens. (The paper's plain
variant, where every token reads the memory, is :mod:`.memory_plain`.)

Task composition: a :class:`MemoryTaskSet` runs the class tokens of several tasks as rows
of one ``forward_rows`` call per block, with an explicit mask. Task k attends to the
original tokens, itself, its own memory, and the class tokens and memory of the tasks
in ``reads[k]``: none for *concatenated* tasks (each then computes exactly what its own
model does), all earlier tasks of the run it was trained on for an *extension*
(``--extend RUN``: the new task is trained on top of a finished run of this method,
whose tasks stay frozen and are read from that run folder when loading).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from ..backbones.vit import VisionTransformer
from ..errors import CheckpointError, ConfigError, QuerytuneError
from ..options import option
from ..runfolder import load_adapter, read_run_config
from ..trunk import TrunkInput
from ..trunk.features import Features
from .base import Method, SharedRows
from .registry import build_method, register

if TYPE_CHECKING:
    from ..backbones.vit import ModuleListOf

MEMORY_INIT_STD = 0.02
# The paper: SGD momentum 0.9, clipping 1.0, a 5-step linear warm-up, cosine, lr about 0.1 at
# batch 512 for 20k steps. Here batch 128 (a VTAB-1k task has 1000 images), 100 epochs.
TRAIN_DEFAULTS = {"epochs": 100, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 0.0, "warmup_epochs": 0.5, "grad_clip": 1.0}
SEARCH_GRID = {"lr": (0.3, 0.1, 0.03, 0.01), "weight_decay": (0.0, 1e-4)}  # SGD, around the paper's ~0.1


@dataclass
class MemoryOptions:
    memory_tokens: int = option(5, "memory tokens per layer (m; 0 for none)", min=0)
    train_class_token: bool = option(True, "train the (new) class token")
    extend: str | None = option(None, "train a new task on top of this finished memory run, whose tasks "
                                      "stay frozen and may be read")

    def __post_init__(self) -> None:
        if self.memory_tokens == 0 and not self.train_class_token:
            raise ValueError("--memory-tokens 0 with --no-train-class-token trains a head on a copy of the "
                             "class token; use --method linear")
        if self.extend is not None:
            self.extend = str(Path(self.extend).resolve())


class MemoryTask(nn.Module):
    """One task of the masked mode: class token C (D,), memory (L, m, D) and a linear head."""

    def __init__(self, class_token: Tensor, memory: Tensor, num_classes: int) -> None:
        super().__init__()
        self.class_token = nn.Parameter(class_token)
        self.memory = nn.Parameter(memory, requires_grad=memory.numel() > 0)  # m = 0: nothing to train or save
        self.head = nn.Linear(class_token.shape[-1], num_classes)


class MemoryTaskSet(SharedRows):
    """Masked-mode tasks run together, a row each; ``reads[k]``: the earlier tasks task k may attend to."""

    def __init__(self, tasks: list[MemoryTask], reads: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.tasks = cast("ModuleListOf[MemoryTask]", nn.ModuleList(tasks))
        self.reads = [tuple(r) for r in reads]

    def extra_mask(self) -> Tensor | None:
        """Additive mask (K, K + total memory) of the rows over [class tokens; memories]; None if all allowed."""
        sizes = [task.memory.shape[1] for task in self.tasks]
        count = len(self.tasks)
        starts = [count + sum(sizes[:j]) for j in range(count)]
        allowed = torch.zeros(count, count + sum(sizes), dtype=torch.bool)
        for k in range(count):
            for j in (k, *self.reads[k]):
                allowed[k, j] = True
                allowed[k, starts[j] : starts[j] + sizes[j]] = True
        if allowed.all():
            return None
        return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))

    def forward(self, features: Features, backbone: VisionTransformer) -> list[Tensor]:
        """Each task's logits from the frozen trunk's normalised block inputs ``features.layers`` (B, L, N, D).

        Tasks that read no other task (concatenated runs, grid members) with memories of one
        size pass as groups of ``forward_rows`` (each row reads its own token and memory only);
        otherwise every row reads every task's tokens under :meth:`extra_mask`."""
        layers = features.layers
        assert layers is not None  # memory reads LAYERS
        batch, _, tokens, _ = layers.shape
        rows = torch.stack([task.class_token for task in self.tasks]).expand(batch, -1, -1)  # B, K, D
        if all(not reads for reads in self.reads) and len({task.memory.shape for task in self.tasks}) == 1:
            memories = torch.stack([task.memory for task in self.tasks], dim=1)  # L, K, m, D
            for index, block in enumerate(backbone.blocks):
                extra = torch.cat([rows.unsqueeze(2), memories[index].expand(batch, -1, -1, -1)], dim=2)
                rows = block.forward_rows(rows, layers[:, index], extra).out
            final = backbone.norm(rows)
            return [task.head(final[:, k]) for k, task in enumerate(self.tasks)]
        memory = torch.cat([task.memory for task in self.tasks], dim=1)  # L, total memory, D
        mask = self.extra_mask()
        if mask is not None:  # the original tokens are readable by every row
            mask = torch.cat([mask.new_zeros(len(self.tasks), tokens), mask], dim=1).to(layers.device)
        for index, block in enumerate(backbone.blocks):
            extra = torch.cat([rows, memory[index].expand(batch, -1, -1)], dim=1)
            rows = block.forward_rows(rows, layers[:, index], extra, mask).out
        final = backbone.norm(rows)
        return [task.head(final[:, k]) for k, task in enumerate(self.tasks)]

    @classmethod
    def merge(cls, parts: Sequence[MemoryTaskSet]) -> tuple[MemoryTaskSet, list[list[int]]]:
        """One set running the tasks of all ``parts`` (concatenated), and where each part's tasks went.

        Tasks equal in every tensor and in what they read (the shared base of extensions
        of one run, or that run itself) are run once.
        """
        tasks: list[MemoryTask] = []
        reads: list[tuple[int, ...]] = []
        candidates: dict[tuple[Any, ...], list[int]] = {}  # what equal tasks share -> the tasks kept with it
        placement = []
        for part in parts:
            where: list[int] = []
            for task, task_reads in zip(part.tasks, part.reads):
                key = (tuple(where[j] for j in task_reads), *_task_digest(task))
                same = [i for i in candidates.get(key, []) if _same_task(tasks[i], task)]
                if not same:
                    tasks.append(task)
                    reads.append(key[0])
                    candidates.setdefault(key, []).append(len(tasks) - 1)
                where.append(same[0] if same else len(tasks) - 1)
            placement.append(where)
        return cls(tasks, reads), placement


def _task_digest(task: MemoryTask) -> tuple[Any, ...]:
    """What tasks equal in every tensor share, cheap to compare: their shapes, class token and head bias."""
    return (tuple(tensor.shape for tensor in task.state_dict().values()),
            task.class_token.detach().cpu().numpy().tobytes(), task.head.bias.detach().cpu().numpy().tobytes())


def _same_task(a: MemoryTask, b: MemoryTask) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


@register
class MemoryTokens(Method):
    name = "memory"
    reads = TrunkInput.LAYERS
    not_mergeable = "its memory tokens join every block's attention"
    Options = MemoryOptions
    train_defaults = TRAIN_DEFAULTS
    search_grid = SEARCH_GRID
    base_digest: Tensor  # a buffer, registered with --extend

    def __init__(self, backbone: VisionTransformer, num_classes: int, options: MemoryOptions) -> None:
        super().__init__(backbone, num_classes, options)
        depth, dim = backbone.config.depth, backbone.config.embed_dim
        class_token = initial_class_token(backbone)
        memory = torch.randn(depth, options.memory_tokens, dim) * MEMORY_INIT_STD
        base_tasks, base_reads = [], []
        if options.extend is not None:
            base = self._load_base(options.extend)
            base_tasks, base_reads = list(base.stack.tasks), base.stack.reads
            # what the adapter was trained on top of: checked when it is loaded again
            self.register_buffer("base_digest", _file_digest(Path(options.extend) / "adapter.safetensors"))
        task = MemoryTask(class_token, memory, num_classes)
        task.class_token.requires_grad_(options.train_class_token)
        # named "stack" as in the adapters saved so far (their tensors are "stack.tasks.K....")
        self.stack: MemoryTaskSet = MemoryTaskSet([*base_tasks, task], [*base_reads, tuple(range(len(base_tasks)))])

    def _load_base(self, run: str) -> MemoryTokens:
        try:
            config = read_run_config(run)
        except QuerytuneError as error:
            raise type(error)(f"--extend {run}: {error}") from error
        if config["method"] != self.name:
            raise ConfigError(f"--extend {run}: is a {config['method']!r} run; only a masked-memory run can be "
                              "extended")
        base = build_method(config["method"], self.backbone, config["num_classes"], config["options"])
        try:
            load_adapter(run, base)
        except QuerytuneError as error:
            raise type(error)(f"--extend {run}: {error}") from error
        assert isinstance(base, MemoryTokens)
        return base.requires_grad_(False)

    def forward(self, inputs: Features) -> Tensor:
        return stacked_logits([self], inputs)[0]

    def shared_rows(self) -> MemoryTaskSet:
        return self.stack

    @staticmethod
    def forward_members(members: Sequence[Method], inputs: Any,
                        random_stream: Callable[[int], AbstractContextManager[None]]) -> list[Tensor]:
        """:func:`stacked_logits` (the method draws no random numbers)."""
        return stacked_logits(cast("list[MemoryTokens]", members), inputs)

    def load_trainable_state_dict(self, state: dict[str, Tensor], source: str = "adapter") -> None:
        if self.options.extend and "base_digest" in state and not torch.equal(state["base_digest"], self.base_digest):
            raise CheckpointError(f"{source}: was trained on top of {self.options.extend}, "
                                  "whose adapter has changed since")
        super().load_trainable_state_dict(state, source)


def initial_class_token(backbone: VisionTransformer) -> Tensor:
    """A new class token (D,): the backbone's as it enters block 0, or, where the backbone has none (SigLIP
    pools by its MAP head), one drawn as the memory is."""
    if backbone.cls_token is None:
        return torch.randn(backbone.config.embed_dim) * MEMORY_INIT_STD
    return backbone.class_token_input()[0].detach().clone()


def _file_digest(path: Path) -> Tensor:
    """sha256 of a file, as 32 bytes in a tensor (so that it is saved with the adapter)."""
    return torch.frombuffer(bytearray(hashlib.sha256(path.read_bytes()).digest()), dtype=torch.uint8)


def stacked_logits(memories: Sequence[MemoryTokens], features: Features) -> list[Tensor]:
    """Each member's logits. Their tasks run as one concatenated :class:`MemoryTaskSet`: their class tokens
    pass each block as rows of one ``forward_rows`` call, each reading the tokens, itself and its own
    memory only, so each computes what it computes alone. An extension runs its own task set."""
    if any(len(m.stack.tasks) > 1 for m in memories):  # an extension: its task set reads its base tasks
        return [m.stack(features, m.backbone)[-1] for m in memories]
    # Built, not merged with MemoryTaskSet.merge: members equal at the start must stay apart.
    concatenated = MemoryTaskSet([m.stack.tasks[0] for m in memories], [() for _ in memories])
    return concatenated(features, memories[0].backbone)
