"""``querytune info | methods | measure``: what a backbone is, what the methods take, what a step costs."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ..options import ImageSize
from ..settings import RunSpec, Runtime
from ..trunk.precision import Precision
from .app import app
from .flags import image_size_option, setting_help
from .printing import print_backbone, print_methods, print_metrics

BackboneOpt = typer.Option(..., "--backbone", "-b", help=setting_help(RunSpec, "backbone"))
ModelNameOpt = typer.Option(None, "--model-name", help=setting_help(RunSpec, "model_name"))
ImageSizeOpt = image_size_option()


@app.command()
def measure(
    method: str = typer.Option(..., "--method", "-m", help="a method, or vqt-naive (VQT the published way)"),
    backbone: str = BackboneOpt,
    batch_size: int = typer.Option(32),
    image_size: str = ImageSizeOpt,
    num_classes: int = typer.Option(10),
    precision: Precision = typer.Option(Precision.FP32, "--precision", help="bf16: the trunk and the step in "
                                        "bfloat16 autocast; fp16: the step in float16 autocast"),
    device: Optional[str] = typer.Option(None, help=setting_help(Runtime, "device")),
    as_json: bool = typer.Option(False, "--json", help="one JSON line instead of a table"),
) -> None:
    """Measure one training step: trainable parameters, adapter bytes, activation bytes saved for
    backward, peak memory of training versus inference, step time."""
    from ..measure import measure_method
    from ..trunk.device import resolve_device

    result = measure_method(method, backbone, batch_size, ImageSize.of(image_size), precision, resolve_device(device),
                            num_classes)
    if as_json:
        print(json.dumps(result))
    else:
        print_metrics(result)


@app.command()
def info(backbone: str = BackboneOpt, model_name: Optional[str] = ModelNameOpt,
         image_size: str = ImageSizeOpt) -> None:
    """Print a backbone's architecture, parameter count, native input size and its tokens at --image-size."""
    from ..backbones import load_backbone

    size = ImageSize.of(image_size)  # before the model loads: a typo costs no load
    print_backbone(load_backbone(backbone, model_name=model_name), size)


@app.command()
def methods() -> None:
    """List the methods: what each reads from the trunk, its options and their defaults."""
    print_methods()
