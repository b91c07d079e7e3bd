"""What checking a feature-cache entry's checksums costs, next to a cached VQT epoch over it.

    python benchmarks/cache_checksums.py                        # shared DINOv2-S/14, dtd10, 128 images, 224 px
    python benchmarks/cache_checksums.py --images 1000 --device cuda

Builds the entry once (its shards' sha256 computed as they are written), then times in
one run: checking every shard against its checksum (a read and a hash of the whole
entry, what ``open_or_build_cache`` does the first time an entry is opened for
training) and one cached VQT epoch over the same images (best of two after a warm-up,
features memory-mapped; on a GPU also with the features in GPU memory). The entry's
files are in the page cache when checked, the best case for the check; from disk it
costs more. The ratio decides whether entries are checked on every open or once
(see :mod:`querytune.trunk.cache`).

Nothing here is a test: compare the ratios printed by one run, never numbers across runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=str(SHARED / "weights" / "dinov2-small-imgfocus"))
    parser.add_argument("--task", type=Path, default=SHARED / "data" / "vtab1k-mini" / "dtd10")
    parser.add_argument("--images", type=int, default=128, help="the first N images of train800val200")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-root", default=None, help="where the entry is built (default: a temporary folder)")
    args = parser.parse_args()

    from querytune import load_backbone
    from querytune.data import Preprocess, open_split
    from querytune.methods import build_method
    from querytune.train import Member, TrainConfig, fit
    from querytune.trunk.cache import Building, CacheKey, FeatureCache, ensure_cache, human_size, verify_entry
    from querytune.trunk.device import default_workers
    from querytune.trunk.sources import CachedFeatureBatches

    where = torch.device(args.device)
    backbone = load_backbone(args.backbone)
    images = open_split(args.task, "train800val200")
    images = replace(images, items=images.items[: args.images])
    preprocess = Preprocess.for_backbone(backbone, args.image_size)
    method = build_method("vqt", backbone, images.num_classes)
    cfg = TrainConfig.for_method(type(method), {"epochs": 1})
    if args.cache_root:
        Path(args.cache_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.cache_root) as root:
        started = time.perf_counter()
        path, _ = ensure_cache(Path(root), CacheKey(backbone, images, preprocess),
                               Building(device=where, workers=default_workers(), show_progress=False))
        build_seconds = time.perf_counter() - started
        cache = FeatureCache.open(path)
        check_seconds = min(timed(lambda: verify_entry(path, show_progress=False)) for _ in range(2))
        placements = ("host", "device") if where.type == "cuda" else ("host",)
        epochs = {}
        for placement in placements:
            source = CachedFeatureBatches(cache, True, device=where, placement=placement)
            fit([Member(cfg, method)], source, where, show_progress=False)  # warm-up: page cache, kernels
            epochs[placement] = min(fit([Member(cfg, method)], source, where, show_progress=False)[0].train_seconds
                                    for _ in range(2))
    print(f"entry: {len(images.items)} images, {human_size(cache.nbytes())}, {args.image_size} px, on {where}")
    print(f"  building it (sha256 included):      {build_seconds:8.2f} s")
    print(f"  checking its checksums (page cache): {check_seconds:8.2f} s")
    for placement, seconds in epochs.items():
        print(f"  cached VQT epoch ({placement:>6}):         {seconds:8.2f} s   -> check / epoch = "
              f"{check_seconds / seconds:.2f}")


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
