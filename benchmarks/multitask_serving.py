"""Multi-task serving: K tasks answered from one backbone pass, K = 1 to 1000, their start-up and memory.

    python benchmarks/multitask_serving.py            # K = 1, 10, 100, 1000; batch 8; median of 3
    python benchmarks/multitask_serving.py --quick    # K = 1, 10, 100; 100 run folders; one timing each

1. Time of ``MultiTaskServer.predict`` for K tasks, as a ratio to K = 1 measured in the same run (the Ks
   interleaved, round after round, so that a change in the machine's load affects all alike), for each mix
   of ``--mixes``: random (untrained) adapters on the shared backbone, cycling through the mix's methods
   (Head2Toe's heads keep a random 20 % of their features, as a trained one does). Before timing, a few
   tasks of each method are checked against their own forward.
2. Start-up: ``--runs`` random small run folders written to a temporary folder (cycling through the first
   mix), then ``MultiTaskServer.from_runs`` on them (backbone load included) and the scan of a live runs
   folder (``querytune serve --runs-dir``, backbone already loaded), in seconds.
3. Memory: the resident memory (RSS) one more VQT task takes, from a live runs folder of ``--runs``
   VQT runs against one of one run, in a fresh process.

Nothing here is a test: figures depend on the machine and its load. Compare the ratios printed by one run,
never numbers across runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from querytune import load_backbone
from querytune.backbones.vit import VisionTransformer
from querytune.methods import build_method
from querytune.methods.base import Method
from querytune.methods.registry import options_dict
from querytune.runfolder import save_adapter
from querytune.serve import MultiTaskServer, ServedMethod
from querytune.service.live import LiveRuns
from querytune.trunk.cache import backbone_fingerprint
from querytune.trunk.features import extract_features

DEFAULT_BACKBONE = Path(__file__).resolve().parents[2] / "shared" / "weights" / "dinov2-small-imgfocus"
CLASSES = 10
HEAD2TOE_KEPT = 0.2


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def random_task(method_name: str, backbone: VisionTransformer) -> Method:
    """An untrained adapter of the method (a Head2Toe keeping a random fifth of its features, as after training)."""
    method = build_method(method_name, backbone, CLASSES)
    if method_name == "head2toe":
        features = method.head.in_features
        method.keep_features(torch.randperm(features)[: int(features * HEAD2TOE_KEPT)].sort().values)
    return method.eval()


def check_against_own_forward(server: MultiTaskServer, images: torch.Tensor) -> None:
    """The first two tasks of each method answer as their own forward does."""
    logits = server.predict(images)
    features = extract_features(server.backbone, images).to("cpu")  # as the server reads them
    checked: dict[str, int] = {}
    for task in server.tasks:
        checked[task.method.name] = checked.get(task.method.name, 0) + 1
        if checked[task.method.name] <= 2:
            with torch.no_grad():
                torch.testing.assert_close(logits[task.name], task.method(features), rtol=1e-4, atol=1e-4)


def time_mix(methods: list[str], backbone: VisionTransformer, counts: list[int], images: torch.Tensor,
             repeats: int) -> None:
    tasks = [ServedMethod(f"{methods[i % len(methods)]}-{i}", random_task(methods[i % len(methods)], backbone))
             for i in range(max(counts))]
    servers = {count: MultiTaskServer(backbone, tasks[:count], images.shape[-1], device="cpu") for count in counts}
    for server in servers.values():
        check_against_own_forward(server, images)  # also the warm-up
    timings: dict[int, list[float]] = {count: [] for count in counts}
    for _ in range(repeats):
        for count, server in servers.items():
            timings[count].append(seconds(lambda server=server: server.predict(images)))
    first = statistics.median(timings[counts[0]])
    print(f"\ntasks cycle {', '.join(methods)}")
    print(f"{'K':>5}{'predict s':>11}{f'/ K={counts[0]}':>9}")
    for count in counts:
        median = statistics.median(timings[count])
        print(f"{count:>5}{median:>11.3f}{median / first:>9.2f}")


def write_random_run(folder: Path, method_name: str, backbone: VisionTransformer, source: Path,
                     image_size: int) -> None:
    """A finished run folder of a random adapter: config.json, the adapter and its checksum, metrics.json."""
    method = random_task(method_name, backbone)
    folder.mkdir(parents=True)
    config = {"method": method_name, "options": options_dict(method), "num_classes": CLASSES, "classes": None,
              "image_size": image_size,
              "backbone": {"source": str(source), "name": backbone.config.name, "model_name": None,
                           "fingerprint": backbone_fingerprint(backbone)},
              "normalisation": {"mean": list(backbone.config.mean), "std": list(backbone.config.std)},
              "train": {"precision": "fp32"}}
    (folder / "config.json").write_text(json.dumps(config))
    save_adapter(folder, method)
    (folder / "metrics.json").write_text("{}")


def write_runs(root: Path, count: int, methods: list[str], backbone_path: str, image_size: int) -> list[Path]:
    backbone = load_backbone(backbone_path)
    runs = [root / f"{methods[i % len(methods)]}-{i:04d}" for i in range(count)]
    for i, run in enumerate(runs):
        write_random_run(run, methods[i % len(methods)], backbone, Path(backbone_path), image_size)
    return runs


def startup(count: int, methods: list[str], backbone_path: str, image_size: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        runs = write_runs(Path(folder), count, methods, backbone_path, image_size)
        from_runs = seconds(lambda: MultiTaskServer.from_runs(backbone_path, runs, device="cpu"))
        live = LiveRuns(Path(folder), load_backbone(backbone_path), "cpu", say=lambda line: None)
        scan = seconds(live.scan)
        assert live.current is not None and len(live.current.tasks) == count
    print(f"\nstart-up with {count} run folders ({', '.join(methods)}): MultiTaskServer.from_runs {from_runs:.2f} s "
          f"(backbone load included), live runs folder scan {scan:.2f} s")


def resident_kb() -> int:
    """The process's RSS in kB, after handing the heap's free memory back to the system (glibc's malloc_trim), so
    that what a batch's activations took and freed does not count."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def vqt_task_memory(count: int, backbone_path: str, image_size: int) -> None:
    """The RSS of a live runs folder of ``count`` VQT runs against one of one, measured in fresh processes."""
    with tempfile.TemporaryDirectory() as folder:
        write_runs(Path(folder) / "many", count, ["vqt"], backbone_path, image_size)
        write_runs(Path(folder) / "one", 1, ["vqt"], backbone_path, image_size)
        resident = {}
        for name in ("one", "many"):
            result = subprocess.run([sys.executable, __file__, "--rss-of", str(Path(folder) / name),
                                     "--backbone", backbone_path, "--image-size", str(image_size)],
                                    check=True, capture_output=True, text=True)
            resident[name] = [int(kb) for kb in result.stdout.split()[-2:]]
    for when, one, many in zip(("loaded", "after a batch"), *resident.values()):
        print(f"\nresident memory, {when}: {one / 1024:.0f} MB with 1 VQT run, {many / 1024:.0f} MB with {count}: "
              f"{(many - one) / (count - 1) / 1024:.3f} MB per added VQT task", end="")
    print()


def rss_of(folder: str, backbone_path: str, image_size: int) -> None:
    """Print the RSS (kB) of a live runs folder's server once loaded, and after a first batch."""
    live = LiveRuns(Path(folder), load_backbone(backbone_path), "cpu", say=lambda line: None)
    live.scan()
    assert live.current is not None
    loaded = resident_kb()
    live.current.predict(torch.randn(8, 3, image_size, image_size))
    print(loaded, resident_kb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=str(DEFAULT_BACKBONE))
    parser.add_argument("--mixes", default="memory+vqt+linear+head2toe,linear",
                        help="frozen-backbone methods cycled over the tasks, '+' between methods, ',' between mixes")
    parser.add_argument("--tasks", default="1,10,100,1000", help="the values of K")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1000, help="run folders for start-up and memory (0: skip)")
    parser.add_argument("--quick", action="store_true", help="K up to 100, 100 run folders, one timing each")
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)  # the child process of the memory measurement
    args = parser.parse_args()
    if args.rss_of:
        return rss_of(args.rss_of, args.backbone, args.image_size)
    if args.quick:
        args.tasks, args.runs, args.repeats = "1,10,100", 100, 1

    counts = [int(k) for k in args.tasks.split(",")]
    mixes = [mix.split("+") for mix in args.mixes.split(",")]
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    print(f"{backbone.config.name}, {args.image_size} px, batch {args.batch_size}, CPU fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for methods in mixes:
        time_mix(methods, backbone, counts, images, args.repeats)
    if args.runs:
        startup(args.runs, mixes[0], args.backbone, args.image_size)
        vqt_task_memory(args.runs, args.backbone, args.image_size)


if __name__ == "__main__":
    main()
