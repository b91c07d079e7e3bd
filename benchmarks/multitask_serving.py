"""Multi-task serving: K tasks answered from one backbone pass versus K separate passes.

    python benchmarks/multitask_serving.py            # K = 1, 2, 4, 8; batch 16; median of 5
    python benchmarks/multitask_serving.py --quick    # batch 2, one timing each

The tasks are random (untrained) adapters on the shared backbone at 224 px, cycling
through ``--methods`` (default: masked memory tokens, VQT, linear probe), so a set of K
tasks mixes methods as a deployment would. "one pass" is ``MultiTaskServer.predict``
over all K tasks: the trunk runs once, the memory tasks share one concatenated row
pass. "separate" is K single-task servers, each running the trunk for its task. Both
give the same logits (checked before timing).

Nothing here is a test: figures depend on the machine and its load. Compare the
ratios printed by one run, never numbers across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from querytune import load_backbone
from querytune.methods import build_method
from querytune.serve import MultiTaskServer, ServedMethod

DEFAULT_BACKBONE = Path(__file__).resolve().parents[2] / "shared" / "weights" / "dinov2-small-imgfocus"


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=str(DEFAULT_BACKBONE))
    parser.add_argument("--methods", default="memory,vqt,linear", help="frozen-backbone methods, cycled over the tasks")
    parser.add_argument("--tasks", default="1,2,4,8", help="the values of K")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batch 2, one timing each")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.repeats = 2, 1

    counts = [int(k) for k in args.tasks.split(",")]
    methods = args.methods.split(",")
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone)
    tasks = [ServedMethod(f"{methods[i % len(methods)]}-{i}", build_method(methods[i % len(methods)], backbone, 10))
             for i in range(max(counts))]
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    print(f"{backbone.config.name}, {args.image_size} px, batch {args.batch_size}, device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; tasks cycle {', '.join(methods)}")
    print(f"{'K':>3}{'one pass s':>12}{'separate s':>12}{'separate / one pass':>21}{f'one pass / K={counts[0]}':>16}")
    first = None
    for count in counts:
        together = MultiTaskServer(backbone, tasks[:count], args.image_size, device=args.device)
        apart = [MultiTaskServer(backbone, [task], args.image_size, device=args.device) for task in tasks[:count]]
        joint = together.predict(images)  # also the warm-up
        for server in apart:
            for name, logits in server.predict(images).items():
                torch.testing.assert_close(joint[name], logits, rtol=1e-4, atol=1e-4)
        # interleaved, so that a change in the machine's load affects both alike
        timings = [(seconds(lambda server=together: server.predict(images)),
                    seconds(lambda servers=apart: [s.predict(images) for s in servers]))
                   for _ in range(args.repeats)]
        one, separate = (statistics.median(column) for column in zip(*timings))
        first = first or one
        print(f"{count:>3}{one:>12.3f}{separate:>12.3f}{separate / one:>21.2f}{one / first:>16.2f}")


if __name__ == "__main__":
    main()
