"""Memory and speed of every method, measured side by side in one run.

    python benchmarks/vqt_memory_speed.py                      # all methods, shared DINOv2-S/14, 224 px, batch 32
    python benchmarks/vqt_memory_speed.py --methods vqt,vqt-naive,full,linear --epoch-images 1000
    python benchmarks/vqt_memory_speed.py --full-run            # also: 100 cached VQT epochs, timed end to end

Part 1, one training step per method at the same batch (``querytune measure`` in a
fresh process per method): trainable parameters, bytes one task stores (its
adapter), activation bytes saved for backward (counted with
``torch.autograd.graph.saved_tensors_hooks``, parameters excluded), peak memory of
the training step and of one inference forward (process RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU) and step time.

Part 2, VQT epochs over ``--epoch-images`` images: uncached (trunk every epoch)
versus building the feature cache once and reading it; with ``--compile MODES`` the
cached epoch again with the training step through ``torch.compile`` in each mode.

Nothing here is a test: figures depend on the machine and its load. Compare ratios
printed by one run, never numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from querytune.measure import measure_method_isolated
from querytune.settings import RunSpec, Runtime
from querytune.trunk.precision import Precision

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_BACKBONE = SHARED / "weights" / "dinov2-small-imgfocus"
DEFAULT_TASK = SHARED / "data" / "vtab1k-mini" / "cifar10"
MiB = 2**20


def print_step_table(rows: list[dict]) -> None:
    header = (f"{'method':<16}{'trainable':>12}{'adapter MiB':>13}{'saved MiB':>12}{'train peak':>12}"
              f"{'infer peak':>12}{'train/infer':>12}{'step s':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<16}  failed: {row['error']}")
            continue
        print(f"{row['method']:<16}{row['trainable_params']:>12,}{row['adapter_bytes'] / MiB:>13.2f}"
              f"{row['saved_bytes'] / MiB:>12.1f}{row['train_peak_bytes'] / MiB:>12.0f}"
              f"{row['inference_peak_bytes'] / MiB:>12.0f}"
              f"{row['train_peak_bytes'] / row['inference_peak_bytes']:>12.2f}"
              f"{row['step_seconds']:>9.2f}")


def print_ratios(rows: list[dict]) -> None:
    by_name = {row["method"]: row for row in rows if "error" not in row}
    print()
    for method in ("vqt", "synqt", "memory"):
        if method not in by_name:
            continue
        for other in ("vqt-naive", "full"):
            if other in by_name and by_name[other]["saved_bytes"]:
                ratio = by_name[method]["saved_bytes"] / by_name[other]["saved_bytes"]
                print(f"saved-for-backward {method} / {other}: {ratio:.3f}")
        print(f"peak memory of a {method} training step / inference forward: "
              f"{by_name[method]['train_peak_bytes'] / by_name[method]['inference_peak_bytes']:.2f}")


def time_vqt_epochs(backbone_path: Path, task: Path, epoch_images: int, image_size: int, precision: Precision,
                    device: str,
                    workers: int, cache_root: str | None, placements: tuple[str, ...] = ("host",),
                    compile_modes: tuple[str, ...] = ()) -> dict:
    """Seconds of one VQT epoch over the task's first ``epoch_images`` training images with the trunk run live
    and with the features read from a fresh cache in each of ``placements`` (best of two after a warm-up
    epoch; on a GPU the live epoch is warmed up too), and the seconds the cache took to build. Each of
    ``compile_modes`` adds the cached epoch of the first placement with the step compiled in that mode
    (``epoch_seconds_cached_<placement>_<mode>``) and its warm-up epoch, compilation included
    (``first_epoch_seconds_<mode>``)."""
    from dataclasses import replace

    from querytune import load_backbone
    from querytune.data import Preprocess, open_split
    from querytune.methods import build_method
    from querytune.train import Member, TrainConfig, fit
    from querytune.trunk.cache import Building, CacheKey, open_or_build_cache
    from querytune.trunk.sources import CachedFeatureBatches, ImageBatches, LiveFeatureBatches

    where = torch.device(device)
    backbone = load_backbone(backbone_path)
    images = open_split(task, "train800val200")
    images = replace(images, items=images.items[:epoch_images])
    preprocess = Preprocess.for_backbone(backbone, image_size)
    method = build_method("vqt", backbone, images.num_classes)
    cfg = TrainConfig.for_method(type(method), {"epochs": 1, "precision": precision.value})

    def epoch_seconds(source, warm_up: bool = True, compile_mode: str = "off") -> float:
        if warm_up:  # workers, page cache, GPU kernels, compilation
            started = time.perf_counter()
            fit([Member(cfg, method)], source, where, show_progress=False, compile_mode=compile_mode)
            if compile_mode != "off":
                result[f"first_epoch_seconds_{compile_mode}"] = time.perf_counter() - started
        return min(fit([Member(cfg, method)], source, where, show_progress=False,
                       compile_mode=compile_mode)[0].train_seconds for _ in range(1 + warm_up))

    live = LiveFeatureBatches(ImageBatches(images, preprocess, workers, where.type == "cuda"), backbone, True, where,
                              precision)
    result: dict = {"images": len(images.items), "precision": precision.value, "backbone": str(backbone_path)}
    result["epoch_seconds_live"] = epoch_seconds(live, warm_up=where.type == "cuda")
    with tempfile.TemporaryDirectory(dir=cache_root) as root:
        started = time.perf_counter()
        cache = open_or_build_cache(Path(root), CacheKey(backbone, images, preprocess, True, precision),
                                    Building(device=where, workers=workers, show_progress=False))
        result["cache_build_seconds"] = time.perf_counter() - started
        for placement in placements:
            source = CachedFeatureBatches(cache, True, precision, where, placement)
            result[f"epoch_seconds_cached_{placement}"] = epoch_seconds(source)
            for mode in compile_modes if placement == placements[0] else ():
                result[f"epoch_seconds_cached_{placement}_{mode}"] = epoch_seconds(source, compile_mode=mode)
    return result


def print_compiled_epochs(timing: dict, placement: str, compile_modes: tuple[str, ...]) -> None:
    """The cached epoch with the step compiled in each mode against the eager one (``time_vqt_epochs``)."""
    eager = timing[f"epoch_seconds_cached_{placement}"]
    for mode in compile_modes:
        compiled = timing[f"epoch_seconds_cached_{placement}_{mode}"]
        print(f"  cached epoch ({placement}), step compiled ({mode}): {compiled:8.3f} s   -> eager / compiled = "
              f"{eager / compiled:.2f}x (first epoch, compiling included: "
              f"{timing[f'first_epoch_seconds_{mode}']:.1f} s)")


def epoch_timing(args: argparse.Namespace) -> None:
    """VQT epochs over the task's first ``epoch_images`` training images: live trunk vs feature cache."""
    from querytune.trunk.device import default_workers

    compile_modes = tuple(args.compile.split(",")) if args.compile else ()
    timing = time_vqt_epochs(args.backbone, args.task, args.epoch_images, args.image_size, Precision(args.precision),
                             args.device, default_workers(), args.cache_root, compile_modes=compile_modes)
    uncached, cached = timing["epoch_seconds_live"], timing["epoch_seconds_cached_host"]
    build_seconds = timing["cache_build_seconds"]
    print(f"\nVQT epoch over {timing['images']} images ({args.precision}):")
    print(f"  uncached (trunk every epoch): {uncached:8.1f} s")
    print(f"  building the cache once:      {build_seconds:8.1f} s")
    print(f"  cached epoch:                 {cached:8.2f} s   -> uncached / cached = {uncached / cached:.1f}x")
    print(f"  100 epochs: cache build + 100 cached epochs = {build_seconds + 100 * cached:.0f} s "
          f"(uncached: {100 * uncached:.0f} s)")
    print_compiled_epochs(timing, "host", compile_modes)


def time_full_run(backbone: Path, task: Path, epochs: int, image_size: int, precision: Precision, device: str | None,
                  workers: int | None, cache_root: str | None) -> dict:
    """``querytune train --method vqt`` with a fresh cache, timed end to end: its metrics and ``total_seconds``."""
    from querytune import train_run

    with tempfile.TemporaryDirectory(dir=cache_root) as root:
        started = time.perf_counter()
        metrics = train_run(RunSpec(method="vqt", backbone=backbone, data=task, image_size=image_size),
                            Path(root) / "run", train={"epochs": epochs, "precision": precision.value},
                            runtime=Runtime(cache=Path(root) / "cache", device=device, workers=workers, progress=False))
        return {**metrics, "total_seconds": time.perf_counter() - started}


def full_run(args: argparse.Namespace) -> None:
    """``querytune train --method vqt`` for 100 epochs with a fresh cache, timed end to end."""
    metrics = time_full_run(args.backbone, args.task, 100, args.image_size, Precision(args.precision), args.device,
                            None, args.cache_root)
    total = metrics["total_seconds"]
    print(f"\nfull run: 100 VQT epochs on {metrics['task']} incl. caching train and test: {total:.0f} s "
          f"({total / 60:.1f} min; the 100 epochs {metrics['train_seconds']:.0f} s), "
          f"test accuracy {metrics['test_accuracy']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK)
    parser.add_argument("--methods", default="linear,vqt,vqt-naive,full")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="fp32",
                        help="bf16: the trunk and the step in bfloat16 autocast; fp16: the step in float16 autocast")
    parser.add_argument("--epoch-images", type=int, default=1000, help="0 skips the epoch timing")
    parser.add_argument("--full-run", action="store_true", help="also time 100 cached VQT epochs end to end")
    parser.add_argument("--compile", default="", help="also time the cached epoch with the step compiled in these "
                        "torch.compile modes, e.g. default,reduce-overhead")
    parser.add_argument("--cache-root", default=None, help="where temporary caches go (default: the system's)")
    args = parser.parse_args()

    for path in (args.backbone, args.task):
        if not path.exists():
            sys.exit(f"{path} not found: pass --backbone/--task (the defaults read ../shared)")
    if args.cache_root is not None:
        Path(args.cache_root).mkdir(parents=True, exist_ok=True)
    print(f"device {args.device}, backbone {args.backbone.name}, batch {args.batch}, {args.image_size} px, "
          f"{args.precision}, torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    rows = [measure_method_isolated(method, args.backbone, args.batch, args.image_size, Precision(args.precision),
                                    args.device)
            for method in args.methods.split(",")]
    print_step_table(rows)
    print_ratios(rows)
    if args.epoch_images:
        epoch_timing(args)
    if args.full_run:
        full_run(args)


if __name__ == "__main__":
    main()
