"""A method's lr x wd grid trained as one stack (VQT: 20 members; masked memory: 8; SynQT: 6),
against one member alone and against separate runs, side by side in one run.

    python benchmarks/grid_speed.py                                  # DINOv2-S/14, vtab1k-mini/cifar10, CPU
    python benchmarks/grid_speed.py --method memory --threads 1
    python benchmarks/grid_speed.py --images 800 --device cuda --precision bf16 --repeats 3

Timed, one epoch each over the same cached features of the task's first ``--images`` train800
images (the order alternates over the configurations, best of ``--repeats`` after a warm-up):

    one member      the method with its default settings alone (``train.fit``)
    grid auto       the members of the method's grid as one stack (``train.fit``), every
                    member's rows (VQT's queries, memory's class tokens, SynQT's synthesized
                    queries) through each block in one call, attending by the path
                    ``rows_attention_path`` picks for the row count
    grid folded     the same stack, every block's rows with W_k and W_v folded in
    grid projected  the same stack, every block's keys and values projected once for all rows
    grid unfused    the same stack, one forward per member on the shared batch (``Method.forward_members``)

K separate runs are estimated as K x one member (the same work K times over; not run).

Then (VQT and memory) the model of one training step per path: multiply-adds (forward and backward of the rows,
the heads and the shared projections) and the bytes the step moves (the feature batch gathered
from the float16 cache, and each layer's tokens read by the attention), with what the timed epoch
reached against the machine's matmul rate and copy bandwidth, measured in the same run.

Nothing here is a test: figures depend on the machine and its load. Compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from querytune.backbones import vit
from querytune.trunk.precision import Precision

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_BACKBONE = SHARED / "weights" / "dinov2-small-imgfocus"
DEFAULT_TASK = SHARED / "data" / "vtab1k-mini" / "cifar10"
PATHS = ("auto", "folded", "projected")


@contextmanager
def unfused(method_cls: type) -> Iterator[None]:
    """Make the stack run one forward per member (the base class's ``forward_members``)."""
    from querytune.methods.base import Method

    real = method_cls.forward_members
    method_cls.forward_members = Method.forward_members
    try:
        yield
    finally:
        method_cls.forward_members = real


@contextmanager
def rows_path(path: str) -> Iterator[None]:
    """Make every ``forward_rows`` take ``path`` (``auto``: the cost model's choice)."""
    real = vit.rows_attention_path
    if path != "auto":
        vit.rows_attention_path = lambda *args: path
    try:
        yield
    finally:
        vit.rows_attention_path = real


def step_model(batch: float, tokens: int, dim: int, heads: int, layers: int, rows: int, members: int, head_in: int,
               classes: int, path: str) -> dict[str, float]:
    """Multiply-adds and bytes of one training step of ``members`` members (``rows`` rows in all; the few
    extra keys of memory tokens are left out)."""
    # per row: q, output projection and MLP (2 + 8 D^2); folded also applies W_k and W_v per row (2 D^2)
    row_dense = (12 if path == "folded" else 10) * dim * dim
    # Backward repeats each product once, for the rows' side only: the tokens and the block's weights are frozen.
    if path == "folded":
        attention = 2 * heads * tokens * dim * rows * 2  # logits and mixing per head
        token_reads = 4  # the tokens read by the two products forward and again backward
    else:
        attention = 2 * tokens * dim * dim + 2 * tokens * dim * rows * 2  # K, V once; each row's q.k and w.v
        token_reads = 2 + 2 * 3  # the tokens into K and V; K and V written, read forward and backward
    # the heads train their weights too: forward, input gradient, weight gradient
    macs = batch * (layers * (attention + 2 * row_dense * rows) + 3 * members * head_in * classes)
    features = batch * layers * tokens * dim
    moved = features * (2 + 4) + features * 4 * token_reads  # float16 gathered into float32; float32 reads
    return {"gflop": 2 * macs / 1e9, "gbytes": moved / 1e9}


def machine_limits(device: torch.device) -> dict[str, float]:
    """The machine's float32 matmul rate (GFLOP/s) and copy bandwidth (GB/s), best of 5."""
    def best(work) -> float:
        times = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            work()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        return min(times)

    n = 4096 if device.type == "cuda" else 1536
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    source = torch.randn(64 * 2**20, device=device)  # 256 MB
    target = torch.empty_like(source)
    return {"matmul_gflops": 2 * n**3 / best(lambda: a @ b) / 1e9,
            "copy_gbs": 2 * source.numel() * 4 / best(lambda: target.copy_(source)) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("vqt", "memory", "synqt"), default="vqt")
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE)
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK)
    parser.add_argument("--images", type=int, default=256, help="the first N train800 images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=1, help="timed epochs per configuration (best taken)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="fp32")
    parser.add_argument("--cache", type=Path, default=None, help="feature-cache folder (default: querytune's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (on a loaded CPU 1 avoids threads "
                                                                   "waiting on each other; default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.backbone, args.task):
        if not path.exists():
            sys.exit(f"{path} not found: pass --backbone/--task (the defaults read ../shared)")

    from querytune import load_backbone
    from querytune.data import Preprocess, open_split
    from querytune.grid import search_grid
    from querytune.methods import build_method, method_class
    from querytune.runlog import EpochLog
    from querytune.train import Member, TrainConfig, fit, rng_state, seed_everything
    from querytune.trunk.cache import Building, CacheKey, default_cache_root, open_or_build_cache
    from querytune.trunk.device import default_workers
    from querytune.trunk.sources import CachedFeatureBatches

    device = torch.device(args.device)
    backbone = load_backbone(args.backbone)
    images = open_split(args.task, "train800")
    images = replace(images, items=images.items[: args.images])
    preprocess = Preprocess.for_backbone(backbone, args.image_size)
    method_cls = method_class(args.method)
    precision = Precision(args.precision)
    base = TrainConfig.for_method(method_cls, {"epochs": 1, "precision": args.precision})
    points = search_grid(args.method, base.batch_size)
    config = backbone.config
    print(f"device {device}, backbone {args.backbone.name} (D {config.embed_dim}, {config.num_heads} heads, "
          f"{config.depth} blocks), {args.image_size} px, {len(images.items)} images, batch {base.batch_size}, "
          f"{precision}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}\n")
    key = CacheKey(backbone, images, preprocess, True, precision)
    cache = open_or_build_cache(args.cache or default_cache_root(), key,
                                Building(device=device, workers=default_workers()))
    source = CachedFeatureBatches(cache, True, precision, device)

    def one_member() -> float:
        seed_everything(base.seed)
        method = build_method(args.method, backbone, images.num_classes)
        return fit([Member(base, method)], source, device, show_progress=False)[0].train_seconds

    def grid(path: str) -> float:
        fused = nullcontext() if path != "unfused" else unfused(method_cls)
        with tempfile.TemporaryDirectory() as root, rows_path("auto" if path == "unfused" else path), fused:
            members = []
            for k, point in enumerate(points):
                cfg = replace(base, **point)
                seed_everything(cfg.seed)
                method = build_method(args.method, backbone, images.num_classes)
                (Path(root) / f"m{k}").mkdir()
                run = Path(root) / f"m{k}"
                members.append(Member(cfg, method, log=EpochLog(run), stream=rng_state(device)))
            return fit(members, source, device, show_progress=False)[0].train_seconds

    timed = {"one member": one_member, **{f"grid {path}": (lambda p=path: grid(p)) for path in (*PATHS, "unfused")}}
    for run in timed.values():  # warm-up: page cache, allocator, kernels
        run()
    seconds = {name: math.inf for name in timed}
    for _ in range(args.repeats):
        for name, run in timed.items():
            seconds[name] = min(seconds[name], run())

    one = seconds["one member"]
    tokens = config.num_tokens(args.image_size)
    rows = len(points)  # one row per layer and member (VQT's and SynQT's default T = 1; memory's class token)
    chosen = vit.rows_attention_path(rows, tokens, config.embed_dim, config.num_heads, True, False)
    print(f"{'':<22}{'members':>8}{'epoch s':>10}{'s / member':>12}{'/ one member':>14}")
    for name, value in seconds.items():
        members = 1 if name == "one member" else rows
        label = f"{name} ({chosen})" if name == "grid auto" else name
        print(f"{label:<22}{members:>8}{value:>10.2f}{value / members:>12.3f}{value / one:>14.2f}")
    print(f"{f'{rows} separate ({rows} x one)':<22}{rows:>8}{rows * one:>10.2f}{one:>12.3f}{float(rows):>14.2f}")

    if args.method == "synqt":  # its side network's work is not in the model
        return
    limits = machine_limits(device)
    steps = math.ceil(len(images.items) / base.batch_size)
    batch = len(images.items) / steps  # the mean batch of the epoch
    head_in = config.embed_dim * (1 + config.depth) if args.method == "vqt" else config.embed_dim
    print(f"\nmachine: float32 matmul {limits['matmul_gflops']:.0f} GFLOP/s, copy {limits['copy_gbs']:.1f} GB/s "
          f"(measured now)\none training step (batch {batch:g}, {tokens} tokens, {config.depth} layers):")
    print(f"{'':<22}{'rows':>6}{'GFLOP':>9}{'GB moved':>10}{'step s':>9}{'GFLOP/s':>9}{'of peak':>9}{'GB/s':>8}"
          f"{'of copy':>9}")
    for name, path, count in (("one member", "folded", 1), ("grid folded", "folded", rows),
                              ("grid projected", "projected", rows)):
        model = step_model(batch, tokens, config.embed_dim, config.num_heads, config.depth, count, count,
                           head_in, images.num_classes, path)
        step = seconds[name] / steps
        print(f"{name:<22}{count:>6}{model['gflop']:>9.1f}{model['gbytes']:>10.2f}{step:>9.2f}"
              f"{model['gflop'] / step:>9.1f}{model['gflop'] / step / limits['matmul_gflops']:>9.0%}"
              f"{model['gbytes'] / step:>8.1f}{model['gbytes'] / step / limits['copy_gbs']:>9.0%}")


if __name__ == "__main__":
    main()
