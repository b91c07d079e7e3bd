"""Measurements behind every efficiency claim: parameters, stored bytes, bytes saved
for backward, peak memory and step time of one training step.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and the process's peak
resident set size on a CPU (reset before each measured phase through
``/proc/self/clear_refs`` on Linux). Timings and memory are only comparable when
measured side by side in one run on one machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .methods.base import Method
from .options import ImageSize
from .trunk.device import to_device
from .trunk.features import Features, extract_features
from .trunk.precision import Precision

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def adapter_bytes(method: Method) -> int:
    """Bytes of what one task stores: its adapter (trainable state, float32)."""
    return sum(t.numel() * t.element_size() for t in method.trainable_state_dict().values())


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward while active, each storage once.

    Parameters and buffers of ``exclude`` modules are not counted: they exist whether
    or not anything is trained, so only activations are measured.
    """

    def __init__(self, *exclude: torch.nn.Module) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for m in exclude for t in (*m.parameters(), *m.buffers())}
        self._seen: dict[int, int] = {}

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @contextmanager
    def __call__(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def _rss_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


@dataclass
class PeakMemory:
    device: torch.device
    peak_bytes: int = 0


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Peak memory of the enclosed code: GPU allocations, or the process's resident set on a CPU."""
    result = PeakMemory(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size (VmHWM)
        yield result
        result.peak_bytes = _rss_peak_bytes()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_inputs(method: Method, images: Tensor, precision: Precision) -> Callable[[], Features | Tensor]:
    """What feeding the method costs per step: the live frozen trunk (no_grad) or the images."""
    if method.reads.frozen:
        return lambda: to_device(extract_features(method.backbone, images, method.reads.with_layers,
                                                  precision=precision), images.device, precision)
    return lambda: images


@dataclass
class StepCost:
    saved_bytes: int
    train_peak_bytes: int
    inference_peak_bytes: int
    step_seconds: float


def measure_step(method: Method, images: Tensor, labels: Tensor, repeats: int = 2,
                 precision: Precision = Precision.FP32) -> StepCost:
    """One training step (inputs, forward, backward, optimiser) against one inference forward, same batch."""
    device = images.device
    method.to(device)
    make_inputs = method_inputs(method, images, precision)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def train_step(meter: SavedTensorMeter | None = None) -> None:
        method.train()
        inputs = make_inputs()
        with precision.autocast(device), meter() if meter is not None else nullcontext():
            loss = F.cross_entropy(method(inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def inference() -> None:
        method.eval()
        with precision.autocast(device):
            method(make_inputs())

    train_step()  # warm-up: allocates optimiser state, which belongs to the baseline, not the peak
    meter = SavedTensorMeter(method)
    train_step(meter)
    with peak_memory(device) as inference_peak:
        inference()
    with peak_memory(device) as train_peak:
        train_step()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        train_step()
    _synchronize(device)
    step_seconds = (time.perf_counter() - started) / repeats
    return StepCost(meter.bytes, train_peak.peak_bytes, inference_peak.peak_bytes, step_seconds)


def measure_method(method_name: str, backbone_source: str | Path, batch_size: int = 32,
                   image_size: int | str | ImageSize = 224,
                   precision: Precision = Precision.FP32, device: str | torch.device = "cpu", num_classes: int = 10,
                   options: dict | None = None) -> dict:
    """One training step of a method on random images, measured in this process.

    ``NAME-naive`` (``vqt-naive``) measures the method executed the way its published code does
    (:meth:`Method.published_way`).
    """
    from .backbones import check_input_size, load_backbone
    from .methods import build_method

    device = torch.device(device)
    torch.manual_seed(0)
    # on a GPU, memory that others hold in this process is not the step's (peaks are allocator statistics)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    backbone = load_backbone(backbone_source).to(device)
    size = ImageSize.of(image_size)
    check_input_size(backbone, size)
    naive = method_name.endswith("-naive")
    method = build_method(method_name.removesuffix("-naive"), backbone, num_classes, options)
    if naive:
        published = method.published_way()
        if published is None:
            raise ConfigError(f"--method {method_name}: method {method.name!r} has no other, published way to "
                              f"run; measure --method {method.name}")
        method = published
    images = torch.randn(batch_size, 3, *size, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    cost = measure_step(method, images, labels, precision=precision)
    return {
        "method": method_name,
        "device": str(device),
        "batch_size": batch_size,
        "image_size": size.recorded,
        "precision": precision.value,
        "trainable_params": method.num_trainable_params(),
        "adapter_bytes": adapter_bytes(method),
        "saved_bytes": cost.saved_bytes,
        "train_peak_bytes": cost.train_peak_bytes - baseline,
        "inference_peak_bytes": cost.inference_peak_bytes - baseline,
        "step_seconds": cost.step_seconds,
    }


def dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for :mod:`subprocess` under which the child is killed when this process dies, however
    it dies (``kill -9`` too), so that it never runs on alone. Linux only (``prctl(PR_SET_PDEATHSIG)``, which
    fires when the thread that started the child ends: start it from a thread that lives as long as the
    process); None elsewhere."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def measure_method_isolated(method_name: str, backbone_source: str | Path, batch_size: int = 32,
                            image_size: int | str | ImageSize = 224, precision: Precision = Precision.FP32,
                            device: str | None = None, num_classes: int = 10) -> dict:
    """:func:`measure_method` such that no earlier work inflates the peak; returns ``{"method", "error"}``
    if it fails.

    On a CPU it runs in a fresh process (``querytune measure --json``) that returns freed memory to
    the system at once (``MALLOC_MMAP_THRESHOLD_``), so resident-set peaks are those of the step
    itself, and that dies with this one (:func:`dies_with_this_process`). On a GPU the allocator's
    statistics already are, so it runs in this process (a fresh one would pay the CUDA start-up for
    every method).
    """
    import json
    import os
    import subprocess
    import sys

    if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda":
        try:
            return measure_method(method_name, backbone_source, batch_size, image_size, precision, device or "cuda",
                                  num_classes)
        except Exception as error:  # reported in the bench's table, as a failed fresh process would be
            return {"method": method_name, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
        finally:
            torch.cuda.empty_cache()

    command = [sys.executable, "-m", "querytune", "measure", "--method", method_name, "--backbone",
               str(backbone_source), "--batch-size", str(batch_size), "--image-size", str(ImageSize.of(image_size)),
               "--num-classes", str(num_classes), "--precision", precision.value, "--json"]
    if device:
        command += ["--device", device]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=dies_with_this_process())
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
        return {"method": method_name, "error": lines[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])
