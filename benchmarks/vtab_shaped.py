"""A VTAB-1k-shaped suite: the 19 tasks' names, groups, class counts and split sizes, rendered images.

    python benchmarks/vtab_shaped.py --out /tmp/vtab-shaped                 # the real sizes (~390,000 images)
    python benchmarks/vtab_shaped.py --out /tmp/vtab-shaped-small --scale 0.1
    querytune bench --data /tmp/vtab-shaped ...                              # what it is for

Accuracy on it means nothing; disk, trunk passes and time do. The suite is for measuring what a
bench over all of VTAB-1k costs (the images it decodes, the trunk passes it makes, the seconds it
takes) without the real data: the images are cheap deterministic renders, keyed by the label so
that a trained model can learn something, and nothing like the real tasks' images.

What it writes, in the layout of NOAH's ``get_vtab1k.py`` (and SSF's ``vtab-1k/<folder>``), which
``querytune.data`` reads as a VTAB-1k task folder:

    OUT/groups.txt                          ``<task> <group>`` lines, read by ``querytune.suite.discover_tasks``
    OUT/<task>/images/<split>/<i:06d>.jpg   for the splits train800, val200 and test
    OUT/<task>/train800.txt, val200.txt, test.txt
                                            ``images/<split>/<i:06d>.jpg <label>`` per line
    OUT/<task>/train800val200.txt           the train800 lines, then the val200 lines: the same
                                            image files listed again, no copies

The groups go in OUT/groups.txt and not in a ``group.txt`` per task folder (which
``discover_tasks`` would also read): a task folder's ``.txt`` files are its split lists, so a
``group.txt`` there would be a split named "group" that does not parse.

Names, groups and class counts are those of ../shared/docs/recipes-vtab1k.md, section 1 (folder
names from NOAH, class counts as VQT, SynQT and NOAH agree, groups from VPT's VTAB_SETUP.md). The
sizes are train800 = 800, val200 = 200 and the VTAB-1k test splits (TFDS, as VPT/NOAH use them),
in ``TASKS`` below.

``--scale S`` sizes each split ``max(min(C, n), round(n * S))``, where n is the split's real
size and C the task's class count: the real size at S = 1; a split never drops below C images
where its real size is at least C, so that every class still appears in it at a small scale (the
labels of a split are its indices modulo C, shuffled, so any split of at least C images holds every
class, as evenly as its size allows). Only val200 of SUN397 (200 images, 397 classes) lacks
classes, as the real one does; train800 holds every class of every task, so a split's class count
(the largest label in any of the task's lists, plus one) is always C.

Images are ``--image-size`` pixels square (32 by default): the bench resizes every image to the
backbone's input size anyway, so what is measured (decoding, resizing, trunk passes) hardly
depends on it, while the disk does: a 32 px JPEG is under 1 KB, which keeps the suite a few
hundred MB at scale 1. Writing is a plain loop in one process; the figures for this machine are in
docs/benchmarks.md ("VTAB-1k-shaped suite").
"""

from __future__ import annotations

import argparse
import colorsys
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 85

# (folder, group, classes, test size): the 19 VTAB-1k tasks, in the order of
# ../shared/docs/recipes-vtab1k.md. Test sizes: VTAB-1k test splits (TFDS, as VPT/NOAH use them).
TASKS: tuple[tuple[str, str, int, int], ...] = (
    ("caltech101", "natural", 102, 6084),
    ("cifar", "natural", 100, 10000),
    ("dtd", "natural", 47, 1880),
    ("oxford_flowers102", "natural", 102, 6149),
    ("oxford_iiit_pet", "natural", 37, 3669),
    ("svhn", "natural", 10, 26032),
    ("sun397", "natural", 397, 21750),
    ("patch_camelyon", "specialized", 2, 32768),
    ("eurosat", "specialized", 10, 5400),
    ("resisc45", "specialized", 45, 6300),
    ("diabetic_retinopathy", "specialized", 5, 42670),
    ("clevr_count", "structured", 8, 15000),
    ("clevr_dist", "structured", 6, 15000),
    ("dmlab", "structured", 6, 22735),
    ("kitti", "structured", 4, 711),
    ("dsprites_loc", "structured", 16, 73728),
    ("dsprites_ori", "structured", 16, 73728),
    ("smallnorb_azi", "structured", 18, 12150),
    ("smallnorb_ele", "structured", 9, 12150),
)
TRAIN800, VAL200 = 800, 200
# The splits with images of their own; train800val200 lists train800's and val200's.
IMAGE_SPLITS = ("train800", "val200", "test")


def split_sizes(classes: int, test: int, scale: float) -> dict[str, int]:
    """The images of each split of a task at ``scale`` (see the module docstring for the rule)."""
    sizes = {}
    for split, real in (("train800", TRAIN800), ("val200", VAL200), ("test", test)):
        sizes[split] = max(min(classes, real), round(real * scale))
    sizes["train800val200"] = sizes["train800"] + sizes["val200"]
    return sizes


def label_templates(classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One picture per class, (classes, size, size, 3) uint8: a background of the class's hue with a
    brighter square at a class-keyed place, so that the label shows in colour and in position."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    templates = np.empty((classes, size, size, 3), np.float32)
    side = max(size // 4, 2)
    for label in range(classes):
        hue = (label * 0.618034) % 1.0  # golden-ratio steps: neighbouring labels get distant hues
        base = np.array(colorsys.hsv_to_rgb(hue, 0.6, 0.7), np.float32) * 255
        tilt = rng.uniform(-40, 40, 3).astype(np.float32)
        image = base + tilt * (xx[..., None] if label % 2 else yy[..., None])
        cells = max(size // side, 1)
        top, left = divmod(label % (cells * cells), cells)
        image[top * side:(top + 1) * side, left * side:(left + 1) * side] = 255 - base
        templates[label] = image
    return templates


def render_split(folder: Path, split: str, labels: np.ndarray, templates: np.ndarray,
                 rng: np.random.Generator) -> tuple[list[str], int]:
    """Write the split's images; return its list lines and the bytes written."""
    (folder / "images" / split).mkdir(parents=True)
    shifts = rng.integers(-2, 3, (len(labels), 2))
    offsets = rng.normal(0, 12, (len(labels), 3)).astype(np.float32)
    lines, written = [], 0
    for index, label in enumerate(labels.tolist()):
        image = np.roll(templates[label], tuple(shifts[index]), axis=(0, 1)) + offsets[index]
        relative = f"images/{split}/{index:06d}.jpg"
        path = folder / relative
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)
        written += path.stat().st_size
        lines.append(f"{relative} {label}")
    return lines, written


def write_task(out: Path, name: str, classes: int, test: int, scale: float, image_size: int,
               seed: int) -> tuple[int, int]:
    """Write one task folder: images first, then its lists (so a listed image always exists).
    Returns (images, bytes)."""
    folder = out / name
    folder.mkdir()
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    templates = label_templates(classes, image_size, rng)
    sizes = split_sizes(classes, test, scale)
    lists: dict[str, list[str]] = {}
    images = written = 0
    for split in IMAGE_SPLITS:
        labels = rng.permutation(np.arange(sizes[split]) % classes)
        lists[split], nbytes = render_split(folder, split, labels, templates, rng)
        images += len(labels)
        written += nbytes
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        text = "\n".join(lines) + "\n"
        (folder / f"{split}.txt").write_text(text)
        written += len(text)
    return images, written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vtab_shaped.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the suite folder to write (must be absent or empty)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every split's size by this (> 0; default 1: the real sizes)")
    parser.add_argument("--image-size", type=int, default=32,
                        help="image side in pixels (default 32: small on disk; the bench resizes anyway)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the renders and label orders (default 0)")
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    if args.image_size < 4:
        parser.error(f"--image-size must be at least 4, got {args.image_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "exists and is not a folder"
        print(f"vtab_shaped.py: error: {out} {what}; refusing to overwrite it", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    images = written = 0
    for name, _group, classes, test in TASKS:
        task_images, task_bytes = write_task(out, name, classes, test, args.scale, args.image_size, args.seed)
        images += task_images
        written += task_bytes
        print(f"  {name:<22} {task_images:>7,} images  {task_bytes / 1e6:8.1f} MB", flush=True)
    # Last, so that a suite cut short names no task it lacks.
    groups = "".join(f"{name} {group}\n" for name, group, _, _ in TASKS)
    (out / "groups.txt").write_text(groups)
    seconds = time.perf_counter() - start
    print(f"{out}: {len(TASKS)} tasks, {images:,} images, {(written + len(groups)) / 1e6:.1f} MB "
          f"(file bytes), {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
