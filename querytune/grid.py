"""Member-stacked training: a learning-rate x weight-decay grid, or several seeds, of one method on
one task, trained together in one pass over the features per epoch.

Each **member** is an ordinary run folder, exactly what ``querytune train`` with the member's
settings writes (config.json, checkpoint.pt, log.jsonl, adapter, metrics.json), so it can be
evaluated, served, resumed or rerun on its own. Members differ only in learning rate, weight
decay and seed; they share the epochs' order (``TrainConfig.data_seed``: stacked seeds take the
first seed's order), so every step reads one batch for all of them. Each member keeps its own
optimiser, schedule, gradient scaler, random stream (initialisation and dropout), checkpoint, log
and metrics: a member equals its settings trained alone (``train --seed S --data-seed D``).

How the members compute on the shared batch is the method's (``Method.forward_members``): VQT
puts every member's query rows through each block in one ``Block.forward_rows`` call, reading the
layer's tokens once; masked memory does the same with its members' class tokens (each row reading
its own memory only), SynQT with its members' synthesized rows (each member's side network and head
run on their own); linear runs one forward per member on the shared batch.
Methods that adapt the trunk cannot share a backbone and are refused.

The search protocol is VQT's (``head2toe_train.py``, see docs/recipes-vtab1k.md): train the grid
on train800, score val200 top-1 after the last epoch, take the best (ties to the smaller learning
rate; equal learning rates: the first in the grid's order), then retrain the chosen setting on
train800val200 for each seed and report test top-1 after the last epoch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed
from .errors import ConfigError, QuerytuneError
from .files import write_json
from .methods import method_class, resolve_method
from .methods.base import Method
from .progress import progress_bar
from .run import RunSetup, prepare_run
from .runfolder import (
    check_run_folder,
    discard_run_folder,
    finish_run_folder,
    read_metrics,
    save_adapter,
    start_run_folder,
)
from .runlog import EpochLog
from .train import (
    FitResult,
    TrainConfig,
    evaluate,
    load_checkpoint,
    lr_at,
    make_optimizer,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from .trunk.device import autocast, resolve_device, resolve_workers, to_device
from .trunk.sources import BatchSource, check_augment, check_placement, epoch_order

# What members may differ in; everything else of their training settings is shared.
MEMBER_SETTINGS = ("lr", "weight_decay", "seed", "data_seed")


def search_grid(method: str, batch_size: int) -> list[dict[str, float]]:
    """The method's learning-rate x weight-decay grid (learning rates scaled by batch/256 where the paper does),
    in the official order: learning rates, then weight decays, from the largest."""
    grid = method_class(method).search_grid
    lrs = [lr * batch_size / 256 for lr in grid["lr"]] if grid.get("scale_lr_by_batch") else list(grid["lr"])
    return [{"lr": lr, "weight_decay": wd} for lr in lrs for wd in grid["weight_decay"]]


def member_name(point: dict[str, float]) -> str:
    """A grid point's folder name."""
    return f"lr{point['lr']:g}_wd{point['weight_decay']:g}"


def select_best(scored: Sequence[tuple[dict[str, float], float]]) -> dict[str, float]:
    """The grid point with the best validation accuracy; ties go to the smaller learning rate (as
    ``find_best_lrwd`` does), then to the earlier point in the grid."""
    best = max(range(len(scored)), key=lambda i: (scored[i][1], -scored[i][0]["lr"], -i))
    return scored[best][0]


def seed_settings(seeds: Sequence[int]) -> list[dict[str, int | None]]:
    """Each seed's settings in a stack: all read the first seed's order (which is its own)."""
    return [{"seed": seed, "data_seed": None if seed == seeds[0] else seeds[0]} for seed in seeds]


@dataclass
class Member:
    """One run of a stack and its training state."""

    run: Path
    cfg: TrainConfig
    method: Method
    config: dict[str, Any]
    stream: dict[str, torch.Tensor]  # its random stream, as rng_state gives it
    resuming: bool = False
    created: bool | None = None
    log: EpochLog | None = None  # log.jsonl and what derives from it, as a lone run's
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    done: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.method.parameters() if p.requires_grad]


@contextmanager
def random_stream(stream: dict[str, torch.Tensor], device: torch.device) -> Iterator[None]:
    """Draw from a member's ``stream`` inside the block, and keep where it got to."""
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


def fit_members(members: list[Member], source: BatchSource, device: torch.device,
                show_progress: bool = True) -> list[FitResult]:
    """Train every member on ``source``, one shared batch per step; each member resumes from its own
    checkpoint and saves it after every epoch it trains (a member a killed stack left ahead waits)."""
    cfg = members[0].cfg  # the shared settings: epochs, batch size, order, precision
    for member in members:
        member.method.to(device)
        member.optimizer = make_optimizer(member.params, member.cfg)
        member.scaler = torch.amp.GradScaler(device.type, enabled=member.cfg.fp16)
        member.done = {"epochs_done": 0, "train_seconds": 0.0, "loss": float("nan"), "train_accuracy": float("nan")}
        checkpoint = member.run / "checkpoint.pt"
        if checkpoint.is_file():
            with random_stream(member.stream, device):  # the checkpoint's stream becomes the member's
                member.done = load_checkpoint(checkpoint, member.method, member.optimizer, member.scaler, device,
                                              member.cfg.seed)
        assert member.log is not None
        member.log.start(member.done["epochs_done"])
    steps_per_epoch = math.ceil(len(source) / cfg.batch_size)
    total_steps, warmup_steps = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    start_epoch = min(member.done["epochs_done"] for member in members)
    with progress_bar(f"training {len(members)} {members[0].method.name} members",
                      total=(cfg.epochs - start_epoch) * steps_per_epoch, enabled=show_progress) as advance:
        for epoch in range(start_epoch, cfg.epochs):
            active = [member for member in members if member.done["epochs_done"] <= epoch]
            started = time.perf_counter()
            sums = [[0.0, 0, 0] for _ in active]  # loss sum, correct, seen
            for member in active:
                member.method.train()
            batches = source.batches(epoch_order(len(source), cfg.order_seed, epoch), cfg.batch_size)
            for batch_index, (inputs, labels) in enumerate(batches):
                step = epoch * steps_per_epoch + batch_index
                labels = labels.to(device)
                for member in active:
                    assert member.optimizer is not None
                    for group in member.optimizer.param_groups:
                        group["lr"] = lr_at(step, total_steps, warmup_steps, member.cfg)
                    member.optimizer.zero_grad(set_to_none=True)
                with autocast(device, cfg.bf16, cfg.fp16):
                    logits = type(active[0].method).forward_members(
                        [member.method for member in active], to_device(inputs, device, cfg.bf16),
                        streams_of(active, device))
                total_loss = torch.zeros((), device=device)
                for member, member_logits, member_sums in zip(active, logits, sums):
                    assert member.scaler is not None
                    loss = F.cross_entropy(member_logits.float(), labels, label_smoothing=member.cfg.label_smoothing)
                    total_loss = total_loss + member.scaler.scale(loss)  # members' parameters are disjoint
                    member_sums[0] += loss.item() * len(labels)
                    member_sums[1] += (member_logits.argmax(-1) == labels).sum().item()
                    member_sums[2] += len(labels)
                total_loss.backward()
                for member in active:
                    assert member.optimizer is not None and member.scaler is not None
                    if member.cfg.grad_clip:
                        member.scaler.unscale_(member.optimizer)
                        torch.nn.utils.clip_grad_norm_(member.params, member.cfg.grad_clip)
                    member.scaler.step(member.optimizer)
                    member.scaler.update()
                advance(1, epoch=epoch + 1, members=len(active))
            seconds = time.perf_counter() - started  # the stack's time, each member's share of the machine
            for member, (loss_sum, correct, seen) in zip(active, sums):
                end_epoch(member, epoch, loss_sum / seen, correct / seen, seconds)
    for member in members:
        assert member.log is not None
        member.log.finish()
    return [FitResult(m.done["train_seconds"], m.done["loss"], m.done["train_accuracy"]) for m in members]


def end_epoch(member: Member, epoch: int, loss: float, accuracy: float, seconds: float) -> None:
    """Log the member's epoch and save its checkpoint, as ``train.fit`` does for a lone run."""
    assert member.optimizer is not None and member.scaler is not None
    member.done = {"epochs_done": epoch + 1, "train_seconds": member.done["train_seconds"] + seconds,
                   "loss": loss, "train_accuracy": accuracy}
    assert member.log is not None
    member.log.epoch_end({"epoch": epoch + 1, "loss": loss, "train_accuracy": accuracy,  # the record train.fit logs
                          "lr": member.optimizer.param_groups[0]["lr"], "seconds": member.done["train_seconds"]})
    save_checkpoint(member.run / "checkpoint.pt", {
        **member.done,
        "trainable": {k: v.cpu() for k, v in member.method.trainable_state_dict().items()},
        "optimizer": member.optimizer.state_dict(),
        "scaler": member.scaler.state_dict(),
        "rng": [dict(member.stream)],
    })


def train_members(
    method_name: str,
    backbone_source: Any,
    data: str | Path,
    members: dict[Path, dict[str, Any]],
    *,
    options: dict[str, Any] | None = None,
    train_settings: dict[str, Any] | None = None,
    train_split: str | None = None,
    eval_split: str | None = "test",
    eval_every: int | None = None,
    val_split: str | None = None,
    loggers: Sequence[str] = (),
    image_size: int = 224,
    recipe: str | None = None,
    task_name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    cache_splits: Sequence[str] | None = None,
    cache_placement: str = "auto",
    device: torch.device | str | None = None,
    workers: int | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Train the runs ``members`` (run folder -> its own training settings, over ``train_settings``)
    as one stack and return their metrics, in order; the other arguments are :func:`train_run`'s.

    Finished members are read back; unfinished ones resume from their checkpoints. Members may
    differ only in :data:`MEMBER_SETTINGS` and must share the epochs' order.
    """
    if distributed.world_size() > 1:
        raise ConfigError("a grid or several seeds train in one process (not under torchrun)")
    device = resolve_device(device)
    workers = resolve_workers(workers)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    check_placement(cache_placement)
    method_cls, _ = resolve_method(method_name, options)
    if not method_cls.reads.frozen:
        raise ConfigError(f"method {method_cls.name!r} adapts the trunk, so its runs cannot share one: a grid or "
                          "several seeds need a frozen-trunk method")
    configs = [TrainConfig.for_method(method_cls, {**(train_settings or {}), **own}) for own in members.values()]
    check_shared(configs)
    check_augment(configs[0].augment, method_cls.reads, cache_dir)
    setup = prepare_run(method_name, backbone_source, data, options, train_split, eval_split, image_size, recipe,
                        task_name, mean, std, device, eval_every=eval_every, val_split=val_split, loggers=loggers,
                        cache_splits=cache_splits)
    stack = []
    for run, cfg in zip(members, configs):
        method, config = setup.build(cfg)
        stack.append(Member(Path(run), cfg, method, config, rng_state(device)))
    states = [check_run_folder(member.run, member.config) for member in stack]
    training = [member for member, state in zip(stack, states) if state != "finished"]
    if not training:
        return [read_metrics(member.run) for member in stack]
    source, eval_source = setup.sources(method_cls.reads, cache_dir, workers, show_progress, configs[0].bf16,
                                        cache_placement)
    for member in training:
        member.log = setup.epoch_log(member.run, member.method, member.cfg, cache_dir, workers, show_progress,
                                     cache_placement)
    for member, state in zip(stack, states):
        if state == "new":
            member.created = start_run_folder(member.run, member.config)
        member.resuming = state == "unfinished"
    try:
        results = fit_members(training, source, device, show_progress)
        for member, result in zip(training, results):
            finish_member(setup, member, result, source, eval_source, device)
    except QuerytuneError:
        for member in training:
            if member.created is not None:
                discard_run_folder(member.run, member.created)
        raise
    return [read_metrics(member.run) for member in stack]


def check_shared(configs: list[TrainConfig]) -> None:
    """Members share every training setting but :data:`MEMBER_SETTINGS`, and the epochs' order."""
    first = {k: v for k, v in vars(configs[0]).items() if k not in MEMBER_SETTINGS}
    for cfg in configs[1:]:
        differing = [k for k, v in vars(cfg).items() if k not in MEMBER_SETTINGS and first[k] != v]
        if differing:
            raise ConfigError(f"members of a grid may differ only in {', '.join(MEMBER_SETTINGS)} "
                              f"(not {', '.join(differing)})")
    orders = {cfg.order_seed for cfg in configs}
    if len(orders) > 1:
        raise ConfigError(f"members of a grid share one epoch order (data seeds {sorted(orders)} differ)")


def finish_member(setup: RunSetup, member: Member, result: FitResult, source: BatchSource,
                  eval_source: BatchSource | None, device: torch.device) -> None:
    """What ``train_run`` does after ``fit``: post-training, adapter, evaluation, metrics.json."""
    with random_stream(member.stream, device):  # head compression draws dropout masks
        extra_metrics = member.method.post_train(source, member.cfg, device)
    save_adapter(member.run, member.method)
    accuracy = (evaluate(member.method, eval_source, device, bf16=member.cfg.bf16, fp16=member.cfg.fp16)
                if eval_source is not None else None)
    metrics = setup.metrics(member.method, member.cfg, result, extra_metrics, accuracy, source, member.resuming)
    finish_run_folder(member.run, metrics)


def train_grid(
    method_name: str,
    backbone_source: Any,
    data: str | Path,
    out: str | Path,
    *,
    search: bool,
    seeds: Sequence[int],
    options: dict[str, Any] | None = None,
    train_settings: dict[str, Any] | None = None,
    train_split: str | None = None,
    eval_split: str | None = "test",
    **common: Any,
) -> dict[str, Any]:
    """``querytune train --grid`` / ``--seeds N``: with ``search``, the method's grid as one stack on
    train800 -> val200 (``OUT/search/lr<lr>_wd<wd>``) and the best point chosen (:func:`select_best`);
    then the chosen (or given) settings for every seed as one stack on ``train_split`` -> ``eval_split``
    (``OUT/seed<s>``). ``common``: :func:`train_members`'s other arguments. Writes and returns
    ``OUT/grid.json``: the search's table, the choice, each seed's accuracy, their mean and spread."""
    out = Path(out)
    settings = dict(train_settings or {})
    chosen: dict[str, float] = {}
    searched: list[dict[str, Any]] = []
    if search:
        method_cls, _ = resolve_method(method_name, options)
        points = search_grid(method_name, TrainConfig.for_method(method_cls, settings).batch_size)
        runs = {out / "search" / member_name(point): {**settings, **point} for point in points}
        metrics = train_members(method_name, backbone_source, data, runs, options=options, train_split="train800",
                                eval_split="val200", **common)
        scored = [(point, m["val200_accuracy"]) for point, m in zip(points, metrics)]
        chosen = select_best(scored)
        searched = [{**point, "val200_accuracy": accuracy} for point, accuracy in scored]
    runs = {out / f"seed{own['seed']}": {**settings, **chosen, **own} for own in seed_settings(seeds)}
    metrics = train_members(method_name, backbone_source, data, runs, options=options, train_split=train_split,
                            eval_split=eval_split, **common)
    accuracies = [m.get(f"{eval_split}_accuracy") for m in metrics]
    known = [a for a in accuracies if a is not None]
    summary = {"method": metrics[0]["method"], "task": metrics[0]["task"], "search": searched, "chosen": chosen,
               "seeds": [{"seed": seed, "run": str(run), "accuracy": accuracy}
                         for seed, run, accuracy in zip(seeds, runs, accuracies)],
               "eval_split": eval_split,
               "mean_accuracy": statistics.mean(known) if known else None,
               "std_accuracy": statistics.stdev(known) if len(known) > 1 else None}
    write_json(out / "grid.json", summary)
    return summary
