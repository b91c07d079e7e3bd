"""Cut VTAB-1k task folders to a few training images, for the small-data study (docs/small-data.md).

    python benchmarks/small_data.py --suite ../shared/data/vtab1k-mini --images 100 --out /tmp/vtab1k-mini-100

writes ``OUT/<task>/`` for every task of the suite (or those of ``--tasks``): train800val200 cut to
``--images`` images, train800 and val200 shrunk in proportion (drawn at random with ``--seed``), test
unchanged, and links to the task's images and classes.txt (nothing is copied). ``OUT`` is then a suite
that ``querytune bench --suite OUT`` and ``querytune train --data OUT/<task>`` read like the original;
the command it prints runs the frozen-trunk methods on it, with and without ``--search``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from querytune.data.cuts import cut_lists, write_task

FROZEN_METHODS = "linear,head2toe,vqt,synqt,memory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", type=Path, required=True, help="a folder of VTAB-1k task folders")
    parser.add_argument("--images", type=int, required=True, help="images of the cut train800val200")
    parser.add_argument("--out", type=Path, required=True, help="where the cut suite goes (outside the repository)")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task folder of the suite)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images kept")
    args = parser.parse_args()
    names = args.tasks.split(",") if args.tasks else sorted(p.name for p in args.suite.iterdir()
                                                            if (p / "train800val200.txt").is_file())
    for name in names:
        lists = cut_lists(args.suite / name, args.images, args.seed)
        folder = write_task(args.suite / name, args.out, lists)
        print(f"{folder}: train800 {len(lists['train800'])}, val200 {len(lists['val200'])}, "
              f"test {len(lists['test'])}")
    print("run the frozen-trunk methods on it, at their protocols and with the search:")
    for search in ("", " --search"):
        print(f"  querytune bench --suite {args.out} --groups benchmarks/vtab1k-mini-groups.txt "
              f"--methods {FROZEN_METHODS} --backbone BACKBONE --out {args.out}-bench{search.replace(' --', '-')} "
              f"--seeds 3{search}")


if __name__ == "__main__":
    main()
