"""Multi-task serving: finished runs of any method answered together, the frozen-backbone ones from one trunk pass.

A frozen-backbone method (``reads.frozen``) reads only what the unmodified trunk
computes, so K such tasks need the trunk once per image batch, not K times. The trunk
keeps its per-block tokens only when some task reads them. Tasks whose method passes rows
through the blocks (:meth:`Method.shared_rows`: masked memory's class tokens) are also
merged, per method, into one set whose rows pass each block in a single call. A method that adapts the
backbone (full, LoRA, VPT, AdaptFormer, BitFit, plain memory, the ``vqt+`` composites)
runs its own copy of the backbone on the images: one more trunk pass per such task.

    server = MultiTaskServer.from_runs("facebook/dinov2-small", ["runs/cifar", "runs/dtd"])
    logits = server.predict(images)                    # {"cifar": (B, 10), "dtd": (B, 47)}
    for record in server.predict_files(paths): ...     # {"path": ..., "predictions": {...}}
    server.predict_files(paths, skip_bad=True)         # an unreadable file's record: {"path": ..., "error": ...}
    records = server(["cat.jpg", pil_image], topk=3)   # the same records for paths or PIL images
"""

from __future__ import annotations

import copy
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .backbones import check_input_size, load_backbone
from .backbones.vit import VisionTransformer
from .data import IMAGE_SUFFIXES, Preprocess, iterate_loader, load_image
from .errors import ConfigError, DataError
from .files import special_kind
from .methods.base import Method, SharedRows
from .methods.registry import method_class
from .options import ImageSize
from .run import load_run
from .runfolder import read_run_config
from .trunk.cache import backbone_fingerprint
from .trunk.device import resolve_device, to_device
from .trunk.features import Features, extract_features
from .trunk.precision import Precision

SUBSETS_KEPT = 16  # the subsets of tasks (``predict(images, tasks)``) whose merged rows are kept built, at most;
# and together no more tasks than are served (beside the newest), so that clients asking for ever other subsets
# hold at most about two copies of the served tasks' weights, not SUBSETS_KEPT


@dataclass
class ServedMethod:
    """A method served as a task: the task's name in the outputs, the method, and its class names where known."""

    name: str
    method: Method
    classes: Sequence[str] | None = None

    @property
    def shares_trunk(self) -> bool:
        """Whether the task reads the shared frozen trunk pass (else it runs its own adapted backbone)."""
        return self.method.reads.frozen


class MergedRows(torch.nn.Module):
    """The served tasks' :meth:`Method.shared_rows`, merged per kind (a kind per method that has them): each
    kind's merged set runs once per batch for all its tasks (rows through the blocks in one call per block,
    heads as one matmul) and answers each of its tasks from that task's own row."""

    def __init__(self, tasks: Sequence[ServedMethod]) -> None:
        super().__init__()
        by_kind: dict[type[SharedRows], dict[str, SharedRows]] = {}
        for task in tasks:
            if (rows := task.method.shared_rows()) is not None:
                by_kind.setdefault(type(rows), {})[task.name] = rows
        self.sets = torch.nn.ModuleList()
        self.own_row: list[dict[str, int]] = []  # per set: task -> the set's row of the task's own logits
        for kind, parts in by_kind.items():
            merged, placement = kind.merge(list(parts.values()))
            self.sets.append(merged)
            self.own_row.append({name: where[-1] for name, where in zip(parts, placement)})

    def of_kind(self, kind: type[SharedRows]) -> SharedRows | None:
        """The merged set of this kind, if any task has one."""
        return next((rows for rows in self.sets if type(rows) is kind), None)

    def forward(self, features: Features, backbone: VisionTransformer) -> dict[str, Tensor]:
        """The logits of every task that has shared rows, from the frozen trunk's ``features``."""
        logits: dict[str, Tensor] = {}
        for rows, own_row in zip(self.sets, self.own_row):
            outputs = rows(features, backbone)
            logits.update((name, outputs[row]) for name, row in own_row.items())
        return logits


def run_mismatch(run: str | Path, config: dict[str, Any], reference_run: str | Path,
                 reference: dict[str, Any]) -> str | None:
    """Why ``run`` (its ``config``) cannot be served with ``reference_run``: another backbone, input normalisation
    or input size; None where it can."""
    if config["backbone"]["fingerprint"] != reference["backbone"]["fingerprint"]:
        return (f"{run}: was trained on backbone {config['backbone']['name']!r} and {reference_run} on "
                f"{reference['backbone']['name']!r} (other weights); runs served together share one")
    if config.get("normalisation") != reference.get("normalisation"):
        return (f"{run}: was trained with another input normalisation than {reference_run}; runs served together "
                "need one")
    size, reference_size = (ImageSize.of(c["image_size"], f"{r}: image_size")
                            for r, c in ((run, config), (reference_run, reference)))
    if size != reference_size:
        return (f"{run}: was trained at {size.recorded} px and {reference_run} at {reference_size.recorded} px; "
                "runs served together need one input size")
    return None


def load_served(name: str, run: str | Path, config: dict[str, Any], backbone: VisionTransformer) -> ServedMethod:
    """A finished run as a task named ``name``: on ``backbone`` itself where its method reads the frozen trunk, else
    on its own copy (LoRA wraps its layers, full and BitFit load weights into it; the shared trunk stays as loaded)."""
    shares_trunk = method_class(config["method"]).reads.frozen
    method, _ = load_run(run, backbone if shares_trunk else copy.deepcopy(backbone))
    return ServedMethod(name, method, config.get("classes"))


def on_device(method: Method, device: torch.device) -> Method:
    """``method`` in eval mode on ``device`` (a frozen-trunk method's own modules only: the trunk is the server's).
    Its backbone is never set aside meanwhile: a live folder builds its next server from the tasks that the
    current one is answering with, in another thread."""
    if not method.reads.frozen:
        return method.to(device).eval()
    for name, module in method.named_children():
        if name != "backbone":
            module.to(device).eval()
    method._apply(lambda tensor: tensor.to(device), recurse=False)  # its own tensors (kept features)
    method.training = False
    return method


def serving_precision(configs: Sequence[dict[str, Any]]) -> Precision:
    """bf16 where every run was trained so, else fp32."""
    every_bf16 = all(config["train"]["precision"] == Precision.BF16.value for config in configs)
    return Precision.BF16 if every_bf16 else Precision.FP32


class MultiTaskServer:
    """Answers every frozen-backbone task from one trunk pass per image batch, and every task that adapts
    the backbone from a pass of its own backbone (which must not be the shared one)."""

    def __init__(self, backbone: VisionTransformer, tasks: Sequence[ServedMethod], image_size: int | str = 224,
                 precision: Precision = Precision.FP32, device: torch.device | str | None = None) -> None:
        names = [task.name for task in tasks]
        if not tasks:
            raise ConfigError("no task to serve")
        if len(set(names)) != len(names):
            raise ConfigError(f"two tasks are named {next(n for n in names if names.count(n) > 1)!r}")
        fingerprint = backbone_fingerprint(backbone)
        for task in tasks:
            if not task.shares_trunk and task.method.backbone is backbone:
                raise ConfigError(f"task {task.name!r}: method {task.method.name!r} adapts the backbone it was "
                                  "built on, which is the shared trunk here; build it on its own copy")
            if (task.shares_trunk and task.method.backbone is not backbone
                    and backbone_fingerprint(task.method.backbone) != fingerprint):
                raise ConfigError(f"task {task.name!r}: was built on another backbone than the one served")
        self.device = resolve_device(device)
        self.backbone = backbone.to(self.device).eval()
        self.tasks = [ServedMethod(t.name, on_device(t.method, self.device), t.classes) for t in tasks]
        self.preprocess = Preprocess.for_backbone(backbone, image_size)
        check_input_size(backbone, self.preprocess.size)
        self.backbone.set_input_size(*self.preprocess.size)
        self.precision = precision
        self.shared = [task for task in self.tasks if task.shares_trunk]
        self.with_layers = any(task.method.reads.with_layers for task in self.shared)
        self.rows = MergedRows(self.shared)
        self.named = {task.name: task for task in self.tasks}
        self.subsets: OrderedDict[tuple[str, ...], MergedRows] = OrderedDict()  # the last few subsets' rows
        self.subsets_lock = threading.Lock()

    @classmethod
    def from_runs(cls, backbone_source: str | Path | VisionTransformer | None, runs: Sequence[str | Path],
                  device: torch.device | str | None = None, precision: Precision | None = None) -> MultiTaskServer:
        """Serve finished runs (tasks named after their folders) on one backbone (default: the first run's).

        Each run that adapts the backbone gets its own copy of it. ``precision`` defaults to bf16 (trunk and
        task modules in bfloat16 autocast) where every run was trained so, else fp32.
        """
        runs = [Path(run) for run in runs]
        if not runs:
            raise ConfigError("no run to serve")
        resolved = [Path(run).resolve() for run in runs]
        times_given = Counter(resolved)
        for run, path in zip(runs, resolved):
            if times_given[path] > 1:
                raise ConfigError(f"{run}: given twice")
        configs = [read_run_config(run) for run in runs]
        for run, config in zip(runs, configs):
            if (mismatch := run_mismatch(run, config, runs[0], configs[0])) is not None:
                raise ConfigError(mismatch)
        trained = configs[0]["backbone"]
        backbone = load_backbone(backbone_source if backbone_source is not None else trained["source"],
                                 model_name=trained.get("model_name") if backbone_source is None else None)
        names = [path.name for path in resolved]
        times_named = Counter(names)
        names = [name if times_named[name] == 1 else str(run) for name, run in zip(names, runs)]
        tasks = [load_served(name, run, config, backbone) for name, run, config in zip(names, runs, configs)]
        return cls(backbone, tasks, configs[0]["image_size"], precision or serving_precision(configs), device)

    def selected(self, names: Sequence[str] | None = None) -> tuple[list[ServedMethod], MergedRows]:
        """The tasks named (in the served order; all where None) and the merged rows of those sharing the trunk:
        built for a subset, and kept for the last few subsets asked for."""
        if names is None:
            return self.tasks, self.rows
        for name in names:
            if name not in self.named:
                raise ConfigError(f"unknown task {name!r} (served: {', '.join(self.named)})")
        wanted = set(names)
        chosen = [task for task in self.tasks if task.name in wanted]
        if len(chosen) == len(self.tasks):
            return self.tasks, self.rows
        key = tuple(task.name for task in chosen)
        with self.subsets_lock:
            rows = self.subsets.pop(key, None)
            if rows is None:
                rows = MergedRows([task for task in chosen if task.shares_trunk])
            self.subsets[key] = rows  # the most recent last
            while len(self.subsets) > 1 and (len(self.subsets) > SUBSETS_KEPT
                                             or sum(map(len, self.subsets)) > len(self.tasks)):
                self.subsets.popitem(last=False)
        return chosen, rows

    @torch.no_grad()
    def predict(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits (float32, on the CPU) of every task, or of the ``tasks`` named (at the cost of those only), for a
        batch of preprocessed images."""
        chosen, rows = self.selected(tasks)
        shared = [task for task in chosen if task.shares_trunk]
        images = to_device(images, self.device)
        if shared:
            with_layers = any(task.method.reads.with_layers for task in shared)
            # rounded to the feature cache's storage dtype, as in training and `querytune eval`
            features = to_device(extract_features(self.backbone, images, with_layers, precision=self.precision),
                                 self.device, self.precision)
        logits = {}
        with self.precision.autocast(self.device):
            from_rows = rows(features, self.backbone) if rows.sets else {}
            for task in chosen:
                if not task.shares_trunk:
                    logits[task.name] = task.method(images).float().cpu()
                    continue
                answer = from_rows[task.name] if task.name in from_rows else task.method(features)
                logits[task.name] = answer.float().cpu()
        return logits

    def answer(self, images: Tensor, topk: int = 1, with_logits: bool = False) -> list[dict[str, Any]]:
        """:meth:`records` of a preprocessed batch."""
        return self.records(self.predict(images), topk, with_logits)

    def records(self, logits: dict[str, Tensor], topk: int = 1, with_logits: bool = False) -> list[dict[str, Any]]:
        """Per image, for each task in ``logits`` (as :meth:`predict` gives them): the top class (name where known),
        label and probability; with ``topk`` > 1 also the ``topk`` best as a list under "top"; with
        ``with_logits`` the logits."""
        if topk < 1:
            raise ConfigError(f"topk must be at least 1 (got {topk})")
        best = {name: values.softmax(-1).topk(min(topk, values.shape[-1]), dim=-1) for name, values in logits.items()}
        records = []
        for i in range(len(next(iter(logits.values())))):
            predictions = {}
            for task in self.tasks:
                if task.name not in logits:
                    continue
                top = [{"class": task.classes[label] if task.classes else label, "label": label,
                        "probability": probability}
                       for probability, label in zip(best[task.name].values[i].tolist(),
                                                     best[task.name].indices[i].tolist())]
                predictions[task.name] = {**top[0], **({"top": top} if topk > 1 else {}),
                                          **({"logits": logits[task.name][i].tolist()} if with_logits else {})}
            records.append({"predictions": predictions})
        return records

    def __call__(self, images: Image.Image | str | Path | Sequence[Image.Image | str | Path], topk: int = 1,
                 with_logits: bool = False) -> list[dict[str, Any]]:
        """Records as :meth:`answer` writes them for PIL images or image files (one or a list; a file's
        record also names its path)."""
        items = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
        if not items:
            return []
        batch = torch.stack([self.preprocess(item if isinstance(item, Image.Image) else load_image(Path(item)))
                             for item in items])
        records = self.answer(batch, topk, with_logits)
        return [{"path": str(item), **record} if not isinstance(item, Image.Image) else record
                for item, record in zip(items, records)]

    def predict_files(self, paths: Sequence[Path], batch_size: int = 32, workers: int = 0, topk: int = 1,
                      with_logits: bool = False, skip_bad: bool = False) -> Iterator[dict[str, Any]]:
        """One record per image file, as :meth:`answer` writes them, with its path first. A file that cannot be
        read is a one-line :class:`DataError` naming it; with ``skip_bad`` its record is ``{"path", "error"}``
        and the other files are answered."""
        loader = torch.utils.data.DataLoader(_ImageFiles(paths, self.preprocess, skip_bad), batch_size=batch_size,
                                             num_workers=workers, collate_fn=_readable_batch)
        done = 0
        for images, errors in iterate_loader(loader):
            answers = iter(self.answer(images, topk, with_logits) if images is not None else [])
            for error in errors:
                path = str(paths[done])
                done += 1
                yield {"path": path, "error": error} if error is not None else {"path": path, **next(answers)}


class _ImageFiles(torch.utils.data.Dataset):
    """Each file's preprocessed image; with ``skip_bad``, a file that cannot be read gives its one-line error
    in its place instead of stopping the loader."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, skip_bad: bool = False) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor | str:
        try:
            return self.preprocess(load_image(self.paths[index]))
        except DataError as error:
            if not self.skip_bad:
                raise
            return str(error)


def _readable_batch(items: list[Tensor | str]) -> tuple[Tensor | None, list[str | None]]:
    """The batch's readable images stacked (None if there is none), and each item's error (None if it was read)."""
    images = [item for item in items if isinstance(item, Tensor)]
    return torch.stack(images) if images else None, [item if isinstance(item, str) else None for item in items]


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files as given, and the images in given folders (recursively, sorted, hidden ones skipped)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(
                path for path in item.rglob("*")
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                and not any(part.startswith(".") for part in path.relative_to(item).parts)
            )
            if not images:
                raise DataError(f"{item}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            found.extend(images)
        elif item.is_file():
            found.append(item)  # whether it decodes is checked when it is read
        else:
            kind = special_kind(item)
            raise DataError(f"{item}: {kind}, not an image or folder" if kind else f"{item}: no such image or folder")
    return found
