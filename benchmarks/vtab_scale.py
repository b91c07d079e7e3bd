"""What a bench over the VTAB-1k-shaped suite costs: disk, trunk passes, and the evaluation in one pass.

    python benchmarks/vtab_shaped.py --out /tmp/shaped --scale 0.02
    python benchmarks/vtab_scale.py --suite /tmp/shaped --out /tmp/shaped-bench --image-size 112

Runs ``querytune bench`` (the Python API, as the command line does) with ``--search --seeds 3`` on the
suite, with a kept feature cache, and prints, measured in this one run:

- disk written (the cache's bytes) over the bytes of the training splits' features (goal 1.0);
- images through the trunk (counted at the patch embedding) over the suite's distinct images
  (train800val200 and test of every task; goal 1.0: each passes the trunk once);
- the wall time of evaluating every final run of the first ``--alone-tasks`` tasks together
  (``eval_runs``: one pass of the test split) against evaluating each of them alone (``eval_run``).

With ``--plan-only`` it prints the bench's plan (``Bench.plan``) and exits: the figures at the
suite's scale for the backbone given, e.g. a random ViT-B/16 (``--random-vit-b16``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", type=Path, required=True, help="a suite written by vtab_shaped.py")
    parser.add_argument("--out", type=Path, required=True, help="the bench's report folder (absent or empty)")
    parser.add_argument("--backbone", default=str(SHARED / "weights" / "dinov2-small-imgfocus"))
    parser.add_argument("--random-vit-b16", action="store_true", help="a random ViT-B/16 (vit_base_patch16_224's "
                        "shape) instead of --backbone")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--methods", default="linear,vqt,synqt,memory")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", help="only these tasks of the suite, 'a,b' (default: all)")
    parser.add_argument("--alone-tasks", type=int, default=2, help="tasks whose runs are also evaluated alone")
    parser.add_argument("--plan-only", action="store_true")
    return parser.parse_args()


def random_vit_b16(folder: Path) -> Path:
    from querytune.backbones import save_backbone
    from querytune.backbones.vit import VisionTransformer, ViTConfig

    path = folder / "vit-b16-random.safetensors"
    config = ViTConfig(name="vit_base_patch16_224 (random)", image_size=224, patch_size=16, embed_dim=768, depth=12,
                       num_heads=12)
    save_backbone(VisionTransformer(config), path)
    return path


def main() -> None:
    args = parse_args()
    import torch

    from querytune.backbones.vit import PatchEmbed
    from querytune.bench import Bench
    from querytune.data import open_split
    from querytune.run import eval_run, eval_runs
    from querytune.settings import BenchSpec, Runtime
    from querytune.trunk.cache import human_size

    with tempfile.TemporaryDirectory() as scratch:
        backbone = str(random_vit_b16(Path(scratch))) if args.random_vit_b16 else args.backbone
        cache = args.out / "cache"
        spec = BenchSpec(suite=str(args.suite), backbone=backbone, out=str(args.out), methods=args.methods.split(","),
                         seeds=args.seeds, search=True, image_size=args.image_size,
                         tasks=args.tasks.split(",") if args.tasks else None)
        bench = Bench(spec, Runtime(cache=str(cache), progress=False))
        print(f"suite {args.suite}, backbone {backbone}, {args.image_size} px, methods {args.methods}, --search "
              f"--seeds {args.seeds}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        plans = bench.plan()
        for plan in plans:
            print(plan.line())
        suite_images = sum(plan.images["train800val200"] + plan.images["test"] for plan in plans)
        print(f"plan: {human_size(sum(p.cache_bytes for p in plans))} to cache, "
              f"{sum(p.trunk_images for p in plans):,} images through the trunk ({suite_images:,} in the suite), "
              f"{sum(p.cells for p in plans):,} runs to train")
        if args.plan_only:
            return

        through = [0]
        real = PatchEmbed.forward

        def counted(self: PatchEmbed, images: torch.Tensor) -> torch.Tensor:
            through[0] += images.shape[0]
            return real(self, images)

        PatchEmbed.forward = counted  # type: ignore[method-assign]
        started = time.perf_counter()
        results = bench.run()
        bench_seconds = time.perf_counter() - started
        PatchEmbed.forward = real  # type: ignore[method-assign]
        failed = [r for r in results if r.get("error")]
        written = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        training = sum(f.stat().st_size for entry in cache.iterdir() if "-train800val200-" in entry.name
                       for f in entry.rglob("*") if f.is_file())
        print(f"\nbench: {len(results)} cells ({len(failed)} failed) in {bench_seconds:.0f} s")
        print(f"disk written {human_size(written)} / training splits' features {human_size(training)} = "
              f"{written / training:.2f}")
        print(f"images through the trunk {through[0]:,} / images in the suite {suite_images:,} = "
              f"{through[0] / suite_images:.2f}")

        runtime = Runtime(progress=False)  # the test split live, as the bench evaluates it
        for task in bench.selected[: args.alone_tasks]:
            runs = sorted((args.out / "runs" / task.name).glob("*/seed*"))
            started = time.perf_counter()
            eval_runs(runs, task.path, "test", runtime)
            together = time.perf_counter() - started
            started = time.perf_counter()
            for run in runs:
                eval_run(run, task.path, "test", runtime)
            alone = time.perf_counter() - started
            images = len(open_split(task.path, "test"))
            print(f"evaluation of {task.name}'s {len(runs)} runs on test ({images} images): together {together:.1f} s, "
                  f"each alone {alone:.1f} s: {alone / together:.1f}x")


if __name__ == "__main__":
    main()
