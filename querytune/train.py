"""The training loop, for a lone run, a stack of runs and a method's fresh heads alike: optimiser,
warm-up + cosine schedule, clipping, bf16 or fp16 autocast, a resumable checkpoint of the trainable
state, and evaluation. Each epoch's record goes to the run's :class:`~querytune.runlog.EpochLog`, which
writes it.

Read top to bottom: :class:`TrainConfig`, :class:`Schedule`; :class:`Learner` (what a step updates),
:class:`EpochStats`, :func:`train_step`, :func:`train_epoch` (which :func:`querytune.methods.heads.train_head`
uses too); then the runs: :class:`Member`, :func:`fit`; and :func:`evaluate`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .errors import CheckpointError, ConfigError, DivergedError, one_line
from .files import recording_writes, write_atomic
from .options import check_fields, option
from .progress import note, progress_bar
from .trunk.device import compiled, to_device
from .trunk.precision import PRECISIONS, Precision
from .trunk.sources import BatchSource, CachedFeatureBatches, epoch_order

if TYPE_CHECKING:
    from .methods.base import Method
    from .runlog import EpochLog

OPTIMIZERS = ("adamw", "adam", "sgd")
# The protocols' epochs were set for VTAB-1k's 800- and 1,000-image splits: a smaller training split trains at
# least the optimiser steps the epochs take on this many images (TrainConfig.min_steps).
FLOOR_IMAGES = 800


def floor_steps(epochs: int, batch_size: int) -> int:
    """The optimiser steps ``epochs`` take on :data:`FLOOR_IMAGES` images: the floor of a run of them."""
    return epochs * math.ceil(FLOOR_IMAGES / batch_size)


@dataclass
class TrainConfig:
    """Training settings; a method's ``train_defaults`` and then the user's values override these
    (the user's are checked against the bounds declared here, named by their flags)."""

    epochs: int = option(100, "training epochs", min=1)
    batch_size: int = option(64, "global batch size", min=1)
    lr: float = option(1e-3, "peak learning rate", min=0, min_open=True)
    weight_decay: float = option(1e-4, "weight decay", min=0)
    optimizer: str = option("adamw", "the optimiser", choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum", min=0, max=1)
    warmup_epochs: float = option(10.0, "linear warm-up epochs", min=0)
    min_lr: float = option(1e-6, "learning rate at the end of the cosine decay", min=0)
    grad_clip: float | None = option(None, "clip the gradient norm at this value", min=0, min_open=True)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", min=0, max=1)
    seed: int = option(0, "random seed", min=0, max=2**32 - 1)  # numpy's seeds are 32-bit
    # Stacked seeds (querytune.grid) share one data order.
    data_seed: int | None = option(None, "seed of the epochs' order (default: --seed)", min=0, max=2**32 - 1)
    precision: str = option("auto", "auto (bf16 where the device computes it natively: a GPU with bf16, a CPU "
                                    "with AVX-512 BF16 or AMX; else fp32) | fp32 | bf16 (autocast) | fp16 (autocast "
                                    "and a gradient scaler, for GPUs without bfloat16)", choices=PRECISIONS)
    checkpointing: bool = option(False, "recompute each block in backward (methods that backpropagate through "
                                        "the trunk)")
    augment: bool = option(False, "random resized crop and flip of the training images (needs the trunk run live)")
    min_steps: int | None = option(None, "the fewest optimiser steps of a run: a training split too small for them "
                                         "trains more epochs, the warm-up the same share of the run (default: the "
                                         f"steps the protocol's epochs take on {FLOOR_IMAGES} images, a VTAB-1k "
                                         "search's training split, or none where --epochs is given; 0: none)",
                                   min=0)

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def for_method(cls, method_cls: type[Method], overrides: dict[str, Any]) -> TrainConfig:
        """The method's protocol with the user's values on top. A run cut shorter than the protocol
        warms up for at most a tenth of its epochs, unless the user set the warm-up. Unless given,
        ``min_steps`` is what the protocol's epochs take on :data:`FLOOR_IMAGES` images (:meth:`floored`);
        epochs the user gave are trained as given (no floor) unless ``min_steps`` is given too."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        cfg = cls(**{**method_cls.train_defaults, **given})  # checks every value, naming its flag
        if "warmup_epochs" not in given and cfg.epochs < method_cls.train_defaults.get("epochs", cls.epochs):
            cfg.warmup_epochs = min(cfg.warmup_epochs, cfg.epochs / 10)
        if cfg.min_steps is None:  # a full VTAB-1k split (800 or 1,000 images) takes at least these already
            cfg.min_steps = 0 if "epochs" in given else floor_steps(cfg.epochs, cfg.batch_size)
        return cfg

    def floored(self, items: int) -> TrainConfig:
        """These settings for a training split of ``items`` items: where the epochs take fewer optimiser steps
        than ``min_steps``, as many more epochs as reach it, the warm-up scaled with them (the same share of
        the run); else unchanged."""
        steps_per_epoch = math.ceil(items / self.batch_size)
        if not self.min_steps or self.epochs * steps_per_epoch >= self.min_steps:
            return self
        epochs = math.ceil(self.min_steps / steps_per_epoch)
        return replace(self, epochs=epochs, warmup_epochs=self.warmup_epochs * epochs / self.epochs)

    def schedule_record(self, items: int) -> dict[str, int]:
        """What config.json records of the run's schedule on ``items`` training items: its optimiser steps,
        those of the warm-up, and the floor they were held to."""
        schedule = Schedule.of(self, items)
        return {"train_items": items, "steps_per_epoch": schedule.steps_per_epoch, "steps": schedule.total_steps,
                "warmup_steps": schedule.warmup_steps, "min_steps": self.min_steps or 0}

    @property
    def resolved_precision(self) -> Precision:
        """:attr:`precision` as :func:`querytune.run.train_runs` resolved it for the device before anything
        trained; ``auto`` left unresolved (a caller of :func:`fit` that skipped ``train_runs``) is fp32."""
        return Precision.FP32 if self.precision == "auto" else Precision(self.precision)

    @property
    def order_seed(self) -> int:
        """The seed of the epochs' order."""
        return self.seed if self.data_seed is None else self.data_seed


@dataclass(frozen=True)
class Schedule:
    """The steps of a training and the learning rate at each: linear warm-up, then cosine decay."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, items: int) -> Schedule:
        """``cfg.epochs`` epochs of ``items`` items in batches of ``cfg.batch_size``, the first
        ``cfg.warmup_epochs`` of them warming up."""
        steps_per_epoch = math.ceil(items / cfg.batch_size)
        return cls(steps_per_epoch, steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch))

    def lr(self, step: int, cfg: TrainConfig) -> float:
        """The learning rate at ``step``: from 0 up to ``cfg.lr``, then down to ``cfg.min_lr``."""
        if step < self.warmup_steps:
            return cfg.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, decay_vectors: bool = True
                   ) -> torch.optim.Optimizer:
    """The optimiser of ``params``; ``decay_vectors`` False exempts the 1-D ones (biases, gains, scales and
    shifts) from weight decay, as timm's optimiser factory does."""
    groups: list[dict[str, Any]] = [{"params": params}]
    if not decay_vectors:
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed for one rank's random stream (dropout) from ``epoch`` on, when no saved stream fits."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


@dataclass
class Learner:
    """What a training step updates: ``params``, by ``optimizer`` through the gradient ``scaler`` (it passes
    through but for fp16), at the learning rate of ``cfg``'s schedule and with its clipping, on the
    cross-entropy with ``cfg``'s label smoothing plus ``penalty()`` (None: nothing)."""

    cfg: TrainConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    penalty: Callable[[], torch.Tensor | None]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        penalty = self.penalty()
        return loss if penalty is None else loss + penalty


@dataclass
class EpochStats:
    """A learner's loss sum, correct predictions and items seen so far in an epoch."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count a batch whose mean loss was ``loss``."""
        self.loss_sum += loss.item() * len(labels)
        self.correct += int((logits.argmax(-1) == labels).sum().item())
        self.seen += len(labels)

    def over_processes(self) -> EpochStats:
        """These statistics summed over all processes."""
        loss_sum, correct, seen = distributed.all_reduce_sum([self.loss_sum, self.correct, self.seen])
        return EpochStats(loss_sum, int(correct), int(seen))

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen


Batch = tuple[Any, torch.Tensor]  # inputs and labels, on the device


def train_step(learners: Sequence[Learner], step: int, schedule: Schedule, batch: Batch | None, global_items: int,
               logits_of: Callable[[Any], list[torch.Tensor]], stats: Sequence[EpochStats]) -> torch.Tensor | None:
    """One optimiser step of every learner, at ``step`` of ``schedule``, on this process's ``batch`` of a
    global batch of ``global_items`` items (all of it in one process; None: no part of it, but this process
    joins the gradient sum over the processes). ``logits_of(inputs)`` gives each learner's logits, which add to
    its ``stats``. Returns the last learner's loss (None: no batch)."""
    for learner in learners:
        lr = schedule.lr(step, learner.cfg)
        for group in learner.optimizer.param_groups:
            group["lr"] = lr
        learner.optimizer.zero_grad(set_to_none=True)
    loss = None
    if batch is not None:
        inputs, labels = batch
        share = len(labels) / global_items  # this rank's share of the global batch's mean loss
        total_loss = torch.zeros((), device=labels.device)
        for learner, logits, learner_stats in zip(learners, logits_of(inputs), stats):
            loss = learner.loss(logits, labels)
            total_loss = total_loss + learner.scaler.scale(loss * share)  # parameters are disjoint
            learner_stats.add(loss, logits, labels)
        total_loss.backward()
    for learner in learners:
        distributed.sum_gradients(learner.params)  # alike on every rank, so is the scaler's verdict
        if learner.cfg.grad_clip:
            learner.scaler.unscale_(learner.optimizer)
            torch.nn.utils.clip_grad_norm_(learner.params, learner.cfg.grad_clip)
        learner.scaler.step(learner.optimizer)  # skips the step where fp16 gradients overflowed
        learner.scaler.update()
    return loss


def train_epoch(learners: Sequence[Learner], logits_of: Callable[[Any], list[torch.Tensor]], source: BatchSource,
                epoch: int, schedule: Schedule, cfg: TrainConfig, device: torch.device,
                advance: Callable[..., None] | None = None) -> list[EpochStats]:
    """Epoch ``epoch`` of ``learners`` on ``source`` (:func:`train_step` on each batch of ``cfg``'s batch size,
    in its epochs' order, of ``cfg``'s precision), reporting each step to ``advance`` where given; each
    learner's statistics on this process. Across processes each takes its slice of every global batch."""
    stats = [EpochStats() for _ in learners]
    order = distributed.rank_order(epoch_order(len(source), cfg.order_seed, epoch), cfg.batch_size)
    batches = source.batches(order, distributed.local_batch_size(cfg.batch_size))
    for batch_index in range(schedule.steps_per_epoch):
        global_items = min(cfg.batch_size, len(source) - batch_index * cfg.batch_size)
        batch = next(batches, None)  # None: this rank has no part of the epoch's last, short batch
        if batch is not None:
            inputs, labels = batch
            batch = to_device(inputs, device, cfg.resolved_precision), labels.to(device)
        loss = train_step(learners, epoch * schedule.steps_per_epoch + batch_index, schedule, batch, global_items,
                          logits_of, stats)
        if advance is not None and loss is not None:
            if len(learners) == 1:
                advance(1, epoch=epoch + 1, loss=loss.item(), acc=stats[0].accuracy)
            else:
                advance(1, epoch=epoch + 1, members=len(learners))
    return stats


@dataclass
class FitResult:
    train_seconds: float
    final_loss: float
    train_accuracy: float


@dataclass
class Member:
    """One run trained by :func:`fit`; a lone run is a stack of one member. ``stream`` is its random
    stream (initialisation and dropout draws), as :func:`rng_state` gives it."""

    cfg: TrainConfig
    method: Method
    checkpoint: Path | None = None  # resumed from, and written after every epoch
    log: EpochLog | None = None
    stream: dict[str, torch.Tensor] = field(default_factory=dict)  # empty: the current one
    learner: Learner = field(init=False)
    done: dict[str, Any] = field(init=False)

    def result(self) -> FitResult:
        return FitResult(self.done["train_seconds"], self.done["loss"], self.done["train_accuracy"])


@contextmanager
def random_stream(stream: dict[str, torch.Tensor], device: torch.device) -> Iterator[None]:
    """Draw from ``stream`` inside the block, and keep where it got to."""
    outer = rng_state(device)
    restore_rng_state(stream, device)
    try:
        yield
    finally:
        stream.update(rng_state(device))
        restore_rng_state(outer, device)


def streams_of(members: list[Member], device: torch.device) -> Callable[[int], AbstractContextManager[None]]:
    """``k`` -> the context in which member k's random stream is the current one."""
    return lambda k: random_stream(members[k].stream, device)


def fit(members: list[Member], source: BatchSource, device: torch.device, show_progress: bool = True,
        compile_mode: str = "off") -> list[FitResult]:
    """Train every member on ``source``, one shared batch per step (the members' settings share the
    epochs, the batch size, the epochs' order and the precision); each member resumes from its
    checkpoint and saves it after every epoch (a member a killed stack left ahead waits for the rest).
    ``compile_mode`` (:func:`querytune.trunk.device.compiled`) runs a lone member's forward through
    ``torch.compile``; a stack's members compute together (``Method.forward_members``).

    A checkpoint holds only the trainable state, the optimiser and gradient-scaler state and the
    member's random stream on every process, so a resumed run ends exactly where an uninterrupted
    one would. Across processes (:mod:`querytune.distributed`, a lone member only) ``cfg.batch_size``
    is the global batch, each rank trains on its slice of it, and only rank 0 writes the checkpoint
    and the log.
    """
    cfg = members[0].cfg  # the shared settings
    if len(members) > 1 and (distributed.world_size() > 1 or compile_mode != "off"):
        raise ConfigError("a stack of runs trains in one process, uncompiled (not under torchrun or --compile)")
    for member in members:
        start(member, device)
    lone_forward = compiled(members[0].method, compile_mode) if len(members) == 1 else None
    schedule = Schedule.of(cfg, len(source))
    start_epoch = min(member.done["epochs_done"] for member in members)
    label = f"training {members[0].method.name}" if len(members) == 1 else \
        f"training {len(members)} {members[0].method.name} members"
    total = (cfg.epochs - start_epoch) * schedule.steps_per_epoch
    with progress_bar(label, total=total, enabled=show_progress) as advance:
        for epoch in range(start_epoch, cfg.epochs):
            active = [member for member in members if member.done["epochs_done"] <= epoch]
            started = time.perf_counter()
            for member in active:
                member.method.train()
            logits_of = members_logits(active, lone_forward, device, cfg)
            stats = train_epoch([member.learner for member in active], logits_of, source, epoch, schedule, cfg,
                                device, advance)
            seconds = time.perf_counter() - started  # the stack's time: each member's share of the machine
            totals = [member_stats.over_processes() for member_stats in stats]
            check_finite_losses(active, epoch, totals, source)  # before any checkpoint of the epoch is written
            for member, member_totals in zip(active, totals):
                end_epoch(member, epoch, member_totals, seconds, device)
    for member in members:
        if member.log is not None:
            member.log.finish()
    return [member.result() for member in members]


def check_finite_losses(active: list[Member], epoch: int, totals: list[EpochStats], source: BatchSource) -> None:
    """A :class:`DivergedError` where every member's loss over epoch ``epoch`` (its steps' losses summed, so a
    single NaN step shows) is not a number, naming the epoch and, for cached features, the entry to rebuild.
    In a stack where others still train (a grid's too-large learning rate) a diverged member goes on, noted
    once: its held-out accuracy ranks it, and the others are untouched (their parameters are disjoint)."""
    diverged = [(member, stats) for member, stats in zip(active, totals) if not math.isfinite(stats.loss)]
    if not diverged:
        return
    if isinstance(source, CachedFeatureBatches):
        entry = source.cache.path
        hint = (f"if the cached features are corrupt, remove their entry and train again: querytune cache rm "
                f"{entry.name} --cache {entry.parent}; else lower --lr")
    else:
        hint = "lower --lr or set --grad-clip"

    def said(member: Member, loss: float) -> str:
        run = f"{member.checkpoint.parent}: " if member.checkpoint is not None else ""
        return f"{run}epoch {epoch + 1}: the training loss is {loss}"

    if len(diverged) == len(active):
        member, stats = diverged[0]
        raise DivergedError(f"{said(member, stats.loss)}; {hint}")
    for member, stats in diverged:
        if member.done["epochs_done"] == 0 or math.isfinite(member.done["loss"]):  # its first diverged epoch
            note(f"{said(member, stats.loss)}; the other members of its stack go on, and so does it")


def members_logits(active: list[Member], lone_forward: Callable[..., Any] | None, device: torch.device,
                   cfg: TrainConfig) -> Callable[[Any], list[torch.Tensor]]:
    """``inputs`` -> the ``active`` members' logits, each member drawing from its own random stream: a lone
    member's through ``lone_forward`` (compiled or not), a stack's together."""
    streams = streams_of(active, device)

    def logits_of(inputs: Any) -> list[torch.Tensor]:
        with cfg.resolved_precision.autocast(device):
            if lone_forward is not None:
                with streams(0):
                    return [lone_forward(inputs)]
            return type(active[0].method).forward_members([member.method for member in active], inputs, streams)

    return logits_of


def start(member: Member, device: torch.device) -> None:
    """Set up the member's learner (optimiser and gradient scaler), and resume it from its checkpoint."""
    member.method.to(device)  # before the optimiser loads its state: that state follows the parameters' device
    member.method.backbone.set_grad_checkpointing(member.cfg.checkpointing)
    params = [p for p in member.method.parameters() if p.requires_grad]
    member.learner = Learner(member.cfg, params, make_optimizer(params, member.cfg, member.method.decay_vectors),
                             # fp16 scales the loss; otherwise the scaler passes the step through
                             torch.amp.GradScaler(device.type, enabled=member.cfg.resolved_precision.scales_loss),
                             member.method.loss_penalty)
    member.done = {"epochs_done": 0, "train_seconds": 0.0, "loss": float("nan"), "train_accuracy": float("nan")}
    if not member.stream:
        member.stream = rng_state(device)
    with random_stream(member.stream, device):  # a checkpoint's stream becomes the member's
        if member.checkpoint is not None and member.checkpoint.is_file():
            member.done = load_checkpoint(member.checkpoint, member.method, member.learner.optimizer,
                                          member.learner.scaler, device, member.cfg.seed)
        elif distributed.world_size() > 1:  # every rank draws its own dropout masks
            torch.manual_seed(rank_seed(member.cfg.seed, distributed.rank(), 0))
    distributed.broadcast_from_main(list(member.method.trainable_state_dict().values()))
    if member.log is not None:
        member.log.start(member.done["epochs_done"])


def end_epoch(member: Member, epoch: int, stats: EpochStats, seconds: float, device: torch.device) -> None:
    """Log the member's epoch (``stats`` over all processes) and save its checkpoint."""
    member.done = {"epochs_done": epoch + 1, "train_seconds": member.done["train_seconds"] + seconds,
                   "loss": stats.loss, "train_accuracy": stats.accuracy}
    if member.log is not None:  # every rank: a validation takes all of them
        member.log.epoch_end({"epoch": epoch + 1, "loss": stats.loss, "train_accuracy": stats.accuracy,
                              "lr": member.learner.optimizer.param_groups[0]["lr"],
                              "seconds": member.done["train_seconds"]})
    if member.checkpoint is not None:
        streams = distributed.all_gather(dict(member.stream))  # every rank takes part
        if distributed.is_main():
            save_checkpoint(member.checkpoint, {
                **member.done,
                "trainable": {k: v.cpu() for k, v in member.method.trainable_state_dict().items()},
                "optimizer": member.learner.optimizer.state_dict(),
                "scaler": member.learner.scaler.state_dict(),
                "rng": streams,
            })


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random streams: dropout draws from the CUDA one on a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Make ``state`` (what :func:`rng_state` gave) this process's random streams again."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with recording_writes(tmp) as handle:
            torch.save(state, handle)

    write_atomic(path, write)


def load_checkpoint(path: Path, method: Method, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    device: torch.device, seed: int) -> dict[str, Any]:
    """Load a checkpoint into ``method``, ``optimizer``, the fp16 gradient ``scaler`` and this rank's RNG;
    return its progress fields.

    A checkpoint written by another number of processes has no RNG stream for every
    rank; each rank then starts a fresh one (the run is then not bit-identical to an
    uninterrupted one, where it uses dropout).
    """
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file; delete it to train from the start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises assorted types, with long messages, for torn or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}); delete it to train "
                              "from the start") from error
    try:
        method.load_trainable_state_dict(state["trainable"], source=str(path))
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # an fp16 run's loss scale
            scaler.load_state_dict(state["scaler"])
        rank, world = distributed.rank(), distributed.world_size()
        if len(state["rng"]) == world:
            restore_rng_state(state["rng"][rank], device)
        else:
            torch.manual_seed(rank_seed(seed, rank, int(state["epochs_done"])))
        return {key: state[key] for key in ("epochs_done", "train_seconds", "loss", "train_accuracy")}
    except CheckpointError:
        raise
    except Exception as error:  # a foreign file: say which, never train on from garbage
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({type(error).__name__}: "
                              f"{one_line(error)})") from error


@torch.no_grad()
def predict(methods: Sequence[Method], source: BatchSource, device: torch.device, batch_size: int = 128,
            precision: Precision = Precision.FP32, show_progress: bool = False,
            indices: np.ndarray | None = None) -> list[torch.Tensor]:
    """Every method's logits for the items ``indices`` of ``source`` (default: all of them), in order, from
    one pass over ``source``: methods reading the frozen trunk from a live source share each batch's trunk
    pass."""
    members = list(methods)
    indices = np.arange(len(source)) if indices is None else indices
    outputs: list[list[torch.Tensor]] = [[torch.empty(0, m.num_classes)] for m in members]
    for method in members:
        method.to(device).eval()
    label = f"evaluating {members[0].name}" if len(members) == 1 else f"evaluating {len(members)} runs"
    with progress_bar(label, total=len(indices), enabled=show_progress) as advance:
        for inputs, _ in source.batches(indices, batch_size):
            inputs = to_device(inputs, device, precision)
            with precision.autocast(device):
                for method, method_outputs in zip(members, outputs):
                    method_outputs.append(method(inputs).float().cpu())
            advance(len(outputs[0][-1]))
    return [torch.cat(method_outputs) for method_outputs in outputs]


def evaluate(methods: Sequence[Method], source: BatchSource, device: torch.device, **kwargs: Any) -> list[float]:
    """Each method's accuracy on ``source``, from one pass over it; across processes every rank predicts
    every ``world``-th item."""
    part = np.arange(len(source))[distributed.rank() :: distributed.world_size()]
    labels = source.labels[part]
    correct = [(logits.argmax(-1).numpy() == labels).sum().item()
               for logits in predict(methods, source, device, indices=part, **kwargs)]
    totals = distributed.all_reduce_sum([*correct, len(part)])
    return [count / totals[-1] for count in totals[:-1]]
