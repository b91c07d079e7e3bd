"""What JPEG draft-mode decoding (``Preprocess(draft=True)``) costs in accuracy and saves in decoding.

    python benchmarks/jpeg_draft.py                                  # dtd10 at 56 px, shared DINOv2-S
    python benchmarks/jpeg_draft.py --tasks dtd10,flowers102 --image-size 112

Per task, the train800 and test images are decoded and preprocessed with and without draft mode
(alternately, one pass each; decode img/s and the mean absolute pixel difference after preprocessing),
put through the trunk for the pooled feature, and a linear probe (multinomial logistic regression,
full-batch L-BFGS, the same weight decay for both) is trained on train800 and scored on test. Draft
mode only applies where a JPEG is at least twice the input size, so a small input size is where it
changes the most pixels (dtd10 is 256 px: 1/4 scale at 56 px, 1/2 at 112 px).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from querytune.backbones import load_backbone
from querytune.data import ImageDataset, Preprocess, open_split
from querytune.trunk.features import extract_features

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def preprocessed(task: Path, split: str, preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The split's images preprocessed, their labels, and the decode + preprocess rate (img/s)."""
    dataset = ImageDataset(open_split(task, split), preprocess)
    started = time.perf_counter()
    pairs = [dataset[index] for index in range(len(dataset))]
    rate = len(pairs) / (time.perf_counter() - started)
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs]), rate


def pooled(backbone, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    return torch.cat([extract_features(backbone, part, with_layers=False).pooled.float()
                      for part in images.split(batch)])


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   weight_decay: float = 1e-4) -> float:
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    classes = int(train_labels.max()) + 1
    weight = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = train @ weight + bias
        value = torch.nn.functional.cross_entropy(logits, train_labels) + weight_decay * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(1) == test_labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", type=Path, default=SHARED / "weights" / "dinov2-small-imgfocus")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "vtab1k-mini")
    parser.add_argument("--tasks", default="dtd10")
    parser.add_argument("--image-size", type=int, default=56)
    args = parser.parse_args()
    backbone = load_backbone(args.backbone, image_size=args.image_size)
    print(f"{'task':<12}{'px':>4}{'draft':>7}{'decode img/s':>14}{'pixel diff':>12}{'probe acc':>11}")
    for task in args.tasks.split(","):
        folder = args.data / task
        results = {}
        for draft in (False, True):
            preprocess = Preprocess.for_backbone(backbone, args.image_size, draft=draft)
            train, train_labels, rate = preprocessed(folder, "train800", preprocess)
            test, test_labels, _ = preprocessed(folder, "test", preprocess)
            results[draft] = (train, rate)
            accuracy = probe_accuracy(pooled(backbone, train), train_labels, pooled(backbone, test), test_labels)
            difference = (train - results[False][0]).abs().mean() * torch.tensor(preprocess.std).mean() * 255
            print(f"{task:<12}{args.image_size:>4}{'on' if draft else 'off':>7}{rate:>14.0f}"
                  f"{float(difference):>12.2f}{accuracy:>11.1%}", flush=True)


if __name__ == "__main__":
    main()
