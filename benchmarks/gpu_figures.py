"""The figures of ``benchmarks/gpu_check.sh``, one part per call, each written as JSON.

    python benchmarks/gpu_figures.py random-vit --out /tmp/vit-b16.safetensors
    python benchmarks/gpu_figures.py measure --backbone B --methods linear,vqt,full --batch 64 --out measure.json
    python benchmarks/gpu_figures.py epochs --backbone B --task T --out epochs.json
    python benchmarks/gpu_figures.py full-run --backbone B --task T --cache-root DIR --out full-run.json

``measure``: one training step per method (``querytune measure`` in this process: on a
GPU peaks are allocator statistics), saved-for-backward bytes and peak memory of a
step against an inference forward, side by side. ``epochs``: one VQT epoch with the
features in GPU memory, streamed from the memory-mapped cache, and computed live.
``epochs --placements device --compile default,reduce-overhead``: the GPU-resident
epoch eager and with the training step through ``torch.compile`` in each mode.
``full-run``: ``querytune train --method vqt`` for 100 epochs with a fresh cache,
caching train and test included, timed end to end. Each part prints what it writes.
Nothing here is a test: compare ratios within one run, never numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from vqt_memory_speed import print_compiled_epochs, time_full_run, time_vqt_epochs  # this folder's sibling

from querytune.backbones import save_backbone
from querytune.backbones.vit import VisionTransformer, ViTConfig
from querytune.measure import measure_method_isolated
from querytune.trunk.precision import Precision

MiB = 2**20


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(), "device": device}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def random_vit(args: argparse.Namespace) -> None:
    """A randomly initialised ViT-B/16 at 224 px (timm's vit_base_patch16_224 shapes) saved as a checkpoint."""
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                        name="vit_base_patch16_224 (random)"))
    save_backbone(model, args.out)
    print(f"random ViT-B/16 -> {args.out}")


def measure(args: argparse.Namespace) -> dict:
    rows = []
    for method in args.methods.split(","):
        row = measure_method_isolated(method, args.backbone, args.batch, args.image_size, Precision(args.precision),
                                      args.device)
        rows.append(row)
        if "error" in row:
            print(f"{method:<16} failed: {row['error']}", flush=True)
            continue
        print(f"{method:<16}{row['trainable_params']:>12,} params  saved {row['saved_bytes'] / MiB:8.1f} MiB  "
              f"peak train {row['train_peak_bytes'] / MiB:8.0f} MiB  "
              f"inference {row['inference_peak_bytes'] / MiB:8.0f} MiB"
              f"  train/inference {row['train_peak_bytes'] / row['inference_peak_bytes']:5.2f}  "
              f"step {1000 * row['step_seconds']:7.1f} ms", flush=True)
    by_name = {row["method"]: row for row in rows if "error" not in row}
    ratios = {}
    for method in ("vqt", "synqt", "memory", "linear"):
        if method in by_name and "full" in by_name:
            ratios[f"saved {method} / full"] = by_name[method]["saved_bytes"] / by_name["full"]["saved_bytes"]
            ratios[f"step seconds full / {method}"] = by_name["full"]["step_seconds"] / by_name[method]["step_seconds"]
        if method in by_name:
            ratios[f"peak train / inference {method}"] = (by_name[method]["train_peak_bytes"]
                                                          / by_name[method]["inference_peak_bytes"])
    for name, value in ratios.items():
        print(f"  {name}: {value:.3f}")
    return {"backbone": str(args.backbone), "batch": args.batch, "image_size": args.image_size,
            "precision": args.precision, "rows": rows, "ratios": ratios}


def epochs(args: argparse.Namespace) -> dict:
    """One VQT epoch over the task's training images: features in GPU memory, streamed, live."""
    compile_modes = tuple(args.compile.split(",")) if args.compile else ()
    result = time_vqt_epochs(args.backbone, args.task, args.epoch_images, args.image_size, Precision(args.precision),
                             args.device, args.workers, args.cache_root, placements=tuple(args.placements.split(",")),
                             compile_modes=compile_modes)
    resident = result["epoch_seconds_cached_device"]
    streamed = result.get("epoch_seconds_cached_host")
    print(f"VQT epoch over {result['images']} images: GPU-resident cache {resident:.3f} s, "
          + (f"streamed {streamed:.3f} s, " if streamed is not None else "")
          + f"live trunk {result['epoch_seconds_live']:.3f} s (live / resident "
          f"{result['epoch_seconds_live'] / resident:.1f}x); building the cache {result['cache_build_seconds']:.1f} s")
    print_compiled_epochs(result, "device", compile_modes)
    return result


def full_run(args: argparse.Namespace) -> dict:
    metrics = time_full_run(args.backbone, args.task, args.epochs, args.image_size, Precision(args.precision),
                            args.device, args.workers, args.cache_root)
    print(f"{args.epochs} VQT epochs on {metrics['task']} ({args.backbone}), caching train and test included: "
          f"{metrics['total_seconds']:.1f} s (the epochs {metrics['train_seconds']:.1f} s), "
          f"test accuracy {metrics['test_accuracy']:.3f}, features {metrics['feature_placement']}")
    return {"backbone": str(args.backbone), "epochs": args.epochs, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("random-vit", "measure", "epochs", "full-run"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backbone", type=Path)
    parser.add_argument("--task", type=Path)
    parser.add_argument("--methods", default="linear,vqt,full")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--epoch-images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cache-root", default=None)
    parser.add_argument("--placements", default="device,host", help="epochs: where the cached features live, "
                        "the first one GPU memory")
    parser.add_argument("--compile", default="", help="epochs: also the resident epoch compiled in these modes")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.part == "random-vit":
        random_vit(args)
        return
    result = {"measure": measure, "epochs": epochs, "full-run": full_run}[args.part](args)
    args.out.write_text(json.dumps({**result, "environment": environment(args.device)}, indent=1, default=str))


if __name__ == "__main__":
    main()
