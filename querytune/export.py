"""``querytune export``: a finished run as files that other tools load, each folder with a model card.

Formats (``FORMATS``):

- ``peft``: a LoRA run as ``adapter_config.json`` + ``adapter_model.safetensors`` for the PEFT
  library, on the run's Hugging Face backbone as ``AutoModelForImageClassification``. The method
  maps its adapter onto PEFT's (:meth:`Method.to_peft`, where ``peft_exportable``: LoRA only); the
  head is PEFT's ``modules_to_save`` classifier: Hugging Face's ViT/DeiT classifier reads the
  normalised class token, as ours does; DINOv2's reads [class token, mean patch token], so our head
  weight is padded with zeros for the second half. The export checks that the PEFT model reproduces
  the run's logits before writing. A run on a timm or querytune checkpoint (no transformers model to
  attach to) is refused, as is every method without a PEFT equivalent, and a backbone whose model type
  has no transformers classifier reading the run's feature (``PEFT_MODEL_TYPES`` do: ViT, DeiT, MSN,
  DINOv2; CLIP and SigLIP average the patch tokens; MAE, DINOv3 and the bare vision towers have none).
- ``merged``: ``model.safetensors``, one timm-named state dict (LoRA's update, SSF's scales and
  shifts or BitFit's biases merged into the backbone, or the fully fine-tuned weights) plus
  ``head.weight``/``head.bias``, position embeddings resampled to the run's input size, its ViT
  config in the metadata; it loads into a plain ViT with strict keys
  (:func:`querytune.backbones.load_backbone`, or a timm model of that architecture). Methods that
  add tokens or branches a plain ViT lacks are refused, and so are the RoPE families (EVA-02, DINOv3), which
  timm holds as its ``Eva`` models under other names.
- ``onnx``: ``model.onnx``, the inference graph from preprocessed images (batch, 3, S, S) to logits:
  one run, or several frozen-backbone runs in one graph with one trunk pass and an output per task,
  computed as :class:`querytune.serve.MultiTaskServer` does (float32).

Every export folder holds ``README.md`` (a model card from the runs' config.json and metrics.json)
and ``export.json`` (what was exported, from which run files). The folder is built under a
temporary name and renamed into place, so it appears whole or not at all; into an empty folder
given, which keeps its mode (a read-only one refuses the export), its files move, ``export.json``
last. Files get the umask's mode (0644 under umask 022), whatever library writes them. Exporting the same
runs in the same format into the same folder again is a no-op; any other content there is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .backbones import load_backbone
from .backbones.loading import CONFIG_METADATA_KEY
from .backbones.vit import VisionTransformer, ViTConfig
from .errors import CheckpointError, ConfigError, one_line
from .files import remove_stale_temporaries, temporary_path, umask_modes
from .methods.base import Method
from .methods.registry import method_class
from .options import ImageSize
from .run import load_run
from .runfolder import read_metrics, read_run_config
from .serve import MultiTaskServer
from .trunk.features import Features, extract_features
from .trunk.precision import Precision
from .version import __version__

FORMATS = ("peft", "merged", "onnx")
# Hugging Face model types whose AutoModelForImageClassification reads the final normalised class token (DINOv2's
# also the mean patch token), as the run's head does; CLIP's and SigLIP's classifiers average the patch tokens,
# MAE, DINOv3 and the vision towers have none
PEFT_MODEL_TYPES = ("vit", "deit", "vit_msn", "dinov2", "dinov2_with_registers")
MANIFEST = "export.json"


@dataclass
class Exported:
    """What :func:`export_runs` did: the folder, its files and whether they were already there."""

    out: Path
    files: list[str]
    unchanged: bool


def export_runs(run_folders: Sequence[str | Path], format: str, out: str | Path) -> Exported:
    """Export the finished runs in ``run_folders`` as ``format`` into the new folder ``out`` (see the module
    docstring).

    Every check (format, runs, methods, the out folder) comes before anything is written.
    """
    runs, out = [Path(run) for run in run_folders], Path(out)
    if format not in FORMATS:
        raise ConfigError(f"--format {format}: unknown; choose one of {', '.join(FORMATS)}")
    if not runs:
        raise ConfigError("no run to export")
    if len(runs) > 1 and format != "onnx":
        raise ConfigError(f"--format {format} exports one run; only --format onnx takes several "
                          "(frozen-backbone runs served together)")
    configs = [_finished_run_config(run) for run in runs]
    for run, config in zip(runs, configs):
        _check_method(run, config, format)
    if format == "onnx" and len(runs) > 1:
        for run, config in zip(runs, configs):
            if not method_class(config["method"]).reads.frozen:
                raise ConfigError(f"{run}: method {config['method']!r} changes the backbone's features, so it "
                                  "cannot share a trunk pass with other runs; export it alone")
    manifest = {"format": format, "runs": [_run_identity(run) for run in runs]}
    if _already_exported(out, manifest):
        return Exported(out, sorted(path.name for path in out.iterdir()), unchanged=True)

    writers: dict[str, Callable[[list[Path], Path], None]] = {
        "peft": _write_peft, "merged": _write_merged, "onnx": _write_onnx}
    if out.parent.is_dir():
        remove_stale_temporaries(out.parent)  # e.g. the folder of an export that was killed
    tmp = temporary_path(out)
    try:
        tmp.mkdir(parents=True)
        writers[format](runs, tmp)
        umask_modes(tmp)
        (tmp / "README.md").write_text(model_card(runs, configs, format))
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "querytune_version": __version__}, indent=2) + "\n")
        if out.is_dir():  # an empty folder given keeps its mode and owner: its files move in, the manifest last
            for file in sorted(tmp.iterdir(), key=lambda path: path.name == MANIFEST):
                os.replace(file, out / file.name)
        else:
            os.replace(tmp, out)
    except OSError as error:
        raise CheckpointError(f"{out}: cannot write the export ({error.strerror or one_line(error)})") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out, sorted(path.name for path in out.iterdir()), unchanged=False)


# ---------------------------------------------------------------- checks


def _finished_run_config(run: Path) -> dict[str, Any]:
    if not (run / "config.json").is_file():
        raise CheckpointError(f"{run}: not a querytune run folder (no config.json)")
    if not (run / "metrics.json").is_file():
        raise CheckpointError(f"{run}: an unfinished run (no metrics.json yet); export it once training has ended")
    return read_run_config(run)


def _check_method(run: Path, config: dict[str, Any], format: str) -> None:
    method = config["method"]
    cls = method_class(method)
    if format == "peft" and not cls.peft_exportable:
        instead = "--format merged or onnx" if cls.not_mergeable is None else "--format onnx"
        raise ConfigError(f"{run}: method {method!r} has no PEFT equivalent (only LoRA runs export to PEFT); "
                          f"use {instead}")
    if format == "merged" and cls.not_mergeable is not None:
        raise ConfigError(f"{run}: method {method!r} cannot be merged into plain ViT weights ({cls.not_mergeable}); "
                          "use --format onnx")


def _run_identity(run: Path) -> dict[str, str]:
    """What an export is made of: a run folder and digests of the files that decide its contents."""
    digests = {name: hashlib.sha256((run / name).read_bytes()).hexdigest()
               for name in ("config.json", "adapter.safetensors")}
    return {"run": str(run.resolve()), **digests}


def _already_exported(out: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``out`` holds this very export; False when it is absent or empty; else an error."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file, not an export folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    try:
        saved = json.loads((out / MANIFEST).read_text())
        saved = {"format": saved["format"], "runs": saved["runs"]}
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{out}: exists, is not empty and is not a querytune export folder") from error
    if saved == manifest:
        return True
    held, wanted = (f"{m['format']} of {', '.join(str(run.get('run')) for run in m['runs'])}"
                    for m in (saved, manifest))
    difference = f"not {wanted}" if held != wanted else "made before these runs' files last changed"
    raise CheckpointError(f"{out}: holds another export ({held}, {difference}); choose another --out")


def _optional(module: str, extra: str) -> Any:
    """Import an optional dependency, or say which extra provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"--format {extra} needs {module}: pip install 'querytune[{extra}]'") from error


# ---------------------------------------------------------------- merged


def _write_merged(runs: list[Path], folder: Path) -> None:
    method, config = load_run(runs[0])
    if method.backbone.config.rope:
        raise ConfigError(f"{runs[0]}: its backbone has rotary position embeddings (EVA-02, DINOv3), which timm holds "
                          "as its Eva models under other names than a timm ViT's; use --format onnx")
    write_merged(method, config["image_size"], folder / "model.safetensors")


def write_merged(method: Method, image_size: int | str, path: Path) -> None:
    """``method``'s backbone as plain ViT weights (LoRA, SSF, BitFit, fine-tuning in effect) and its head, the
    position embeddings resampled to a square ``image_size``; at a non-square one they stay at the backbone's
    native grid, the size its config records (the ViT resamples them to each input at run time)."""
    adapted = method.backbone
    config = ViTConfig.from_dict(adapted.config.to_dict())
    with torch.device("meta"):
        names = list(VisionTransformer(config).state_dict())
    size = ImageSize.of(image_size)
    plain = load_backbone(_plain_vit(config, {name: _effective(adapted, name) for name in names}),
                          image_size=size if size.square else None)
    state = {name: tensor.detach().contiguous() for name, tensor in plain.state_dict().items()}
    if config.global_pool:  # timm's name for the final norm of a global-pool model
        state = {("fc_norm" + name[len("norm"):] if name.startswith("norm.") else name): t for name, t in state.items()}
    head = method.head
    assert isinstance(head, nn.Linear), "the mergeable methods end in one linear head"
    state.update({"head.weight": head.weight.detach().contiguous(), "head.bias": head.bias.detach().contiguous()})
    save_file(state, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(plain.config.to_dict())})


def _effective(module: nn.Module, name: str) -> Tensor:
    """The tensor a plain ViT's parameter ``name`` takes in ``module``: LoRA's and SSF's wrapped modules
    answer ``weight`` (and SSF's ``bias``) with their merged values, so the attribute path of the plain
    name reads it."""
    *path, attribute = name.split(".")
    for part in path:
        module = getattr(module, part)
    return getattr(module, attribute).detach().clone()


def _plain_vit(config: ViTConfig, state: dict[str, Tensor]) -> VisionTransformer:
    with torch.device("meta"):
        model = VisionTransformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


# ---------------------------------------------------------------- peft


def _write_peft(runs: list[Path], folder: Path) -> None:
    _optional("peft", "peft")
    transformers = _optional("transformers", "peft")
    method, config = load_run(runs[0])
    source = config["backbone"]["source"]
    try:
        hf_config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{runs[0]}: its backbone {source} is not a Hugging Face transformers model, which "
                              "PEFT adapters attach to; use --format merged") from error
    if hf_config.model_type not in PEFT_MODEL_TYPES:
        instead = "--format onnx" if method.backbone.config.rope else "--format merged or onnx"
        raise ConfigError(f"{runs[0]}: its backbone is a Hugging Face {hf_config.model_type!r} model, for which "
                          "transformers has no image classifier reading the run's feature (PEFT export takes "
                          f"{', '.join(PEFT_MODEL_TYPES)}); use {instead}")
    classes = config.get("classes") or [str(label) for label in range(config["num_classes"])]
    hf_config.num_labels = config["num_classes"]
    hf_config.id2label = dict(enumerate(classes))
    hf_config.label2id = {name: label for label, name in enumerate(classes)}
    with _quiet(transformers):
        model = transformers.AutoModelForImageClassification.from_pretrained(source, config=hf_config,
                                                                             dtype=torch.float32)
        peft_model = method.to_peft(model, modules_to_save=["classifier"]).eval()
        _set_peft_head(peft_model, method)
        _check_same_logits(method, peft_model, config["image_size"], runs[0])
        peft_model.save_pretrained(str(folder))


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Without transformers' progress bars, deprecation notes and load report, which lists the classifier
    as newly initialised: it is, until the run's head is copied into it."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _set_peft_head(peft_model: Any, method: Method) -> None:
    """Copy the run's head into the PEFT model's classifier (one of its ``modules_to_save``)."""
    classifier = peft_model.base_model.model.classifier.modules_to_save["default"]
    head = method.head
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        classifier.weight.zero_()  # DINOv2's classifier also reads the mean patch token: its weights stay 0
        classifier.weight[:, : head.in_features].copy_(head.weight)
        classifier.bias.copy_(head.bias)


def _check_same_logits(method: Method, peft_model: Any, image_size: int | str, run: Path) -> None:
    images = torch.randn(2, 3, *ImageSize.of(image_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = method(images)
        theirs = peft_model(pixel_values=images, interpolate_pos_encoding=True).logits
    difference = (ours - theirs).abs().max().item()
    if difference > 1e-4 * max(1.0, ours.abs().max().item()):
        raise CheckpointError(f"{run}: the PEFT model of its backbone does not reproduce the run's logits (max abs "
                              f"difference {difference:.3g}); not exported")


# ---------------------------------------------------------------- onnx


class ImageGraph(nn.Module):
    """Preprocessed images -> the logits of one run of a method that adapts the backbone."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method
        self.backbone = method.backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.method(images)


class ServedGraph(nn.Module):
    """Preprocessed images -> every task's logits from one frozen trunk pass, as
    :meth:`MultiTaskServer.predict` computes them in float32 (features rounded to float16 first)."""

    def __init__(self, server: MultiTaskServer) -> None:
        super().__init__()
        self.backbone = server.backbone
        self.names = [task.name for task in server.tasks]
        self.methods = nn.ModuleList(task.method for task in server.tasks)
        self.rows = server.rows
        self.with_layers = server.with_layers

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        trunk = extract_features(self.backbone, images, self.with_layers)
        features = Features(trunk.pooled.float(), trunk.layers.float() if trunk.layers is not None else None)
        from_rows = self.rows(features, self.backbone)
        return tuple(from_rows[name] if name in from_rows else method(features)
                     for name, method in zip(self.names, self.methods))


def onnx_graph(runs: Sequence[Path]) -> tuple[nn.Module, list[str], ImageSize]:
    """The module to export for ``runs``, its output names (the task names) and its input size.

    The position embeddings are resampled to the input size once, here (as the ViT would on every
    call), so that the graph holds no interpolation."""
    configs = [read_run_config(run) for run in runs]
    size = ImageSize.of(configs[0]["image_size"])
    graph: ImageGraph | ServedGraph
    if len(runs) == 1 and not method_class(configs[0]["method"]).reads.frozen:
        graph, names = ImageGraph(load_run(runs[0])[0]), [runs[0].resolve().name]
    else:
        server = MultiTaskServer.from_runs(None, runs, device="cpu", precision=Precision.FP32)
        graph, names = ServedGraph(server), [task.name for task in server.tasks]
    load_backbone(graph.backbone, image_size=size)
    return graph.eval(), names, size


def _write_onnx(runs: list[Path], folder: Path) -> None:
    """The graph for the runs' input size with a dynamic batch axis, by torch's TorchScript-based exporter:
    it works offline, needs only ``onnx``, and took 1.5 s where the torch.export-based one (``dynamo=True``)
    took 30 s on a tiny ViT (torch 2.13, 2 CPU cores); both gave the same outputs to 2e-6."""
    _optional("onnx", "onnx")
    graph, names, size = onnx_graph(runs)
    images = torch.zeros(2, 3, *size)
    batch_axes = {name: {0: "batch"} for name in ["images", *names]}
    try:
        with warnings.catch_warnings():  # the tracer's notes that the input size is fixed, as intended
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (images,), str(folder / "model.onnx"), input_names=["images"],
                              output_names=names, dynamic_axes=batch_axes, dynamo=False)
    except Exception as error:  # the exporter raises its own types, with pages of diagnostics
        raise CheckpointError(f"{', '.join(map(str, runs))}: the ONNX export failed ({type(error).__name__}: "
                              f"{one_line(error)[:300]})") from error


# ---------------------------------------------------------------- model card


def _accuracy(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """(split, accuracy) of the evaluation a run ended with."""
    split = metrics.get("eval_split")
    value = metrics.get(f"{split}_accuracy")
    return (split, value) if split and value is not None else None


_LOADING = {
    "peft": """```python
import torch
from peft import PeftModel
from transformers import AutoModelForImageClassification

# float32: the run's precision (transformers would otherwise keep a float16 checkpoint in float16)
base = AutoModelForImageClassification.from_pretrained("{base}", num_labels={num_classes}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, "path/to/this/folder").eval()
logits = model(pixel_values=images, interpolate_pos_encoding=True).logits
```""",
    "merged": """```python
from safetensors.torch import load_file
from querytune import load_backbone

backbone = load_backbone("model.safetensors")           # strict timm keys; the head is set aside
head = load_file("model.safetensors")                   # head.weight, head.bias
logits = backbone(images) @ head["head.weight"].T + head["head.bias"]
```
A timm ViT of the same architecture (`num_classes={num_classes}`, {timm_size}) loads the file
with `load_state_dict(..., strict=True)` as well.""",
    "onnx": """```python
import onnxruntime
session = onnxruntime.InferenceSession("model.onnx")
outputs = session.run(None, {{"images": images}})       # float32 (batch, 3, {height}, {width})
```
Outputs, in order: {outputs} (logits, computed in float32).""",
}


def model_card(runs: Sequence[Path], configs: Sequence[dict[str, Any]], format: str) -> str:
    """A hub-ready README.md: what was trained, how well it did, and how to load the files."""
    first = configs[0]
    source = first["backbone"]["source"]
    on_hub = not Path(source).exists()  # a hub name, which the hub's metadata may link to
    tasks = [run.resolve().name for run in runs]
    lines = ["---", f"library_name: {'peft' if format == 'peft' else 'querytune'}"]
    if on_hub:
        lines.append(f"base_model: {source}")
    lines += ["pipeline_tag: image-classification", "tags:", "- querytune", *[f"- {c['method']}" for c in configs],
              "---", "", f"# {' + '.join(tasks)}: {', '.join(sorted({c['method'] for c in configs}))} "
              f"on {first['backbone']['name']}", "",
              f"Exported by querytune {__version__} as `{format}` from {len(runs)} finished run"
              f"{'s' if len(runs) > 1 else ''}.", "",
              "| task | method | classes | accuracy | trainable parameters | epochs |", "|---|---|---|---|---|---|"]
    for task, run, config in zip(tasks, runs, configs):
        metrics = read_metrics(run)
        accuracy = _accuracy(metrics)
        shown = f"{100 * accuracy[1]:.2f}% ({accuracy[0]})" if accuracy else "not evaluated"
        lines.append(f"| {config.get('task') or task} | {config['method']} | {config['num_classes']} | {shown} | "
                     f"{metrics.get('trainable_params', 0):,} | {metrics.get('epochs', '?')} |")
    lines += ["", "## Classes", ""]
    for task, config in zip(tasks, configs):
        classes = config.get("classes") or [str(label) for label in range(config["num_classes"])]
        lines.append(f"- **{task}**: {', '.join(map(str, classes))}")
    normalisation = first.get("normalisation") or {}
    size = ImageSize.of(first["image_size"])
    timm_size = (f"`img_size={size.height}`" if size.square else "`img_size` the backbone's native size, "
                 f"`dynamic_img_size=True` for {size} input")
    shape = f"{size.height} x {size.width} px" + ("" if size.square else " (height x width)")
    lines += ["", "## Input", "",
              f"RGB images resized (bicubic, no crop) to {shape}, scaled "
              f"to [0, 1] and normalised with mean {normalisation.get('mean')} and std {normalisation.get('std')}.", "",
              "## Backbone", "", f"`{source}` ({first['backbone']['name']}), weights fingerprint "
              f"`{first['backbone']['fingerprint']}`.", "", "## How to load", "",
              _LOADING[format].format(base=source, num_classes=first["num_classes"], timm_size=timm_size,
                                      height=size.height, width=size.width,
                                      outputs=", ".join(f"`{task}`" for task in tasks)), ""]
    return "\n".join(lines)
