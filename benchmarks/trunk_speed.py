"""The frozen trunk's speed against Hugging Face ``transformers`` and onnxruntime, timed in one run.

    python benchmarks/trunk_speed.py                 # DINOv2-S/14 (shared) and a random ViT-B/16, batch 1 and 32
    python benchmarks/trunk_speed.py --quick         # a dry run: DINOv2-S, batch 1 and 4, few rounds
    python benchmarks/trunk_speed.py --threads 1     # on a busy machine
    python benchmarks/trunk_speed.py --profile       # also: the operators of one trunk forward (torch.profiler)
    python benchmarks/trunk_speed.py --compile       # also: the pooled trunk under torch.compile (inductor)
    python benchmarks/trunk_speed.py --kernels       # also: the trunk's linear layers under each library's GEMM

Per backbone, batch and precision, four contestants run the same weights on the same images at 224 px,
alternately in one loop (one batch each per round, so that load on the machine falls on all alike):

- ``querytune``: :func:`querytune.trunk.features.extract_features` with the pooled feature only (what a
  linear probe, ``predict`` and ``serve`` of a class-token method pay);
- ``querytune+layers``: the same with every block's normalised tokens (what the feature cache stores);
- ``HF``: ``transformers``' ``Dinov2Model`` / ``ViTModel`` with SDPA attention (bf16: under autocast);
- ``onnxruntime``: querytune's trunk exported to ONNX the way ``querytune export --format onnx`` does
  (TorchScript-based exporter), fp32 only;
- ``compiled`` (with ``--compile``): the pooled trunk under ``torch.compile`` (inductor, static shapes,
  ``freezing``: weights folded in as constants and prepacked, linear + GELU fused), compiled anew for each
  batch size; its compile seconds and the number of images after which it has paid them back are printed.

With ``--kernels``, each distinct linear layer of the trunk (its weight shape, at the batch's token rows) is
timed alone in float32 under torch's ``addmm`` (what every contestant's eager trunk calls), oneDNN with the
weight prepacked for the batch (what inductor's ``freezing`` uses) and onnxruntime's ``MatMul`` + ``Add``: where
they run at one rate, no choice of kernel makes the fp32 trunk faster.

The float32 (and, where the CPU computes it natively, bfloat16) matmul rate is measured in the same
process; ``of matmul`` is the trunk's matmul arithmetic per second against it. Figures depend on the
machine and its load: compare the ratios one run prints, never numbers across runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from querytune.backbones import load_backbone
from querytune.backbones.vit import VisionTransformer
from querytune.trunk.features import extract_features, held_weights
from querytune.trunk.precision import Precision, native_bf16

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BACKBONE = REPO.parent / "shared" / "weights" / "dinov2-small-imgfocus"
IMAGE_SIZE = 224


def hf_dinov2(folder: Path) -> nn.Module:
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()


def hf_random_vit_b16() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=16, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, attn_implementation="sdpa")
    return ViTModel(config, add_pooling_layer=False).eval()


def trunk_gflop(backbone: VisionTransformer, batch: int) -> float:
    """Multiply-add arithmetic (GFLOP, 2 per multiply-add) of one trunk forward over ``batch`` images:
    patch embedding, and per block the qkv, output, MLP projections and the attention's two products."""
    config = backbone.config
    dim, patches = config.embed_dim, config.num_tokens(IMAGE_SIZE) - config.num_prefix_tokens
    tokens = config.num_tokens(IMAGE_SIZE)
    mlp = 3 * config.mlp_hidden if config.swiglu else 2 * config.mlp_hidden
    per_block = tokens * dim * (3 * dim + dim + mlp) + 2 * tokens * tokens * dim
    macs = patches * dim * config.in_chans * config.patch_size**2 + config.depth * per_block
    return 2 * macs * batch / 1e9


def matmul_gflops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """This process's matmul rate in ``dtype`` (GFLOP/s), best of repeated 1024-square products."""
    n = 1024
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


class TrunkGraph(nn.Module):
    """Images -> the pooled feature in float32, through :func:`extract_features` (what is exported)."""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return extract_features(self.backbone, images, with_layers=False, dtype=torch.float32).pooled


def onnx_session(backbone: VisionTransformer, folder: Path) -> Callable[[torch.Tensor], object]:
    """querytune's trunk exported as ``export --format onnx`` does it, run by onnxruntime on as many threads
    as torch uses."""
    import onnxruntime

    file = folder / f"{backbone.config.name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TrunkGraph(backbone).eval(), (torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE),), str(file),
                          input_names=["images"], output_names=["pooled"],
                          dynamic_axes={"images": {0: "batch"}, "pooled": {0: "batch"}}, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images.numpy()})


def compiled_trunk(backbone: VisionTransformer, precision: Precision) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pooled trunk of :func:`extract_features` under ``torch.compile`` with inductor's ``freezing``
    (inference only: the frozen weights become constants, prepacked for the CPU's matmul kernels)."""
    trunk = precision.trunk
    if trunk.autocast_dtype is not None:
        backbone = held_weights(backbone, trunk.autocast_dtype)

    def pooled(images: torch.Tensor) -> torch.Tensor:
        with trunk.autocast(images.device):
            return backbone.pool(backbone.run_blocks(backbone.embed(images)))

    compiled = torch.compile(pooled, dynamic=False, options={"freezing": True})

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return compiled(images)

    return run


def gemm_runners(weight: torch.Tensor, bias: torch.Tensor, rows: int) -> dict[str, Callable[[torch.Tensor], object]]:
    """One linear layer in float32 under torch's ``addmm``, oneDNN with the weight prepacked for ``rows`` rows,
    and onnxruntime's ``MatMul`` + ``Add``."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    out_features, in_features = weight.shape
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, out_features])],
        [numpy_helper.from_array(weight.t().contiguous().numpy(), "w"), numpy_helper.from_array(bias.numpy(), "b")])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = onnxruntime.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                           .SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {"addmm": lambda x: nn.functional.linear(x, weight, bias),
            "oneDNN packed": lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""),
            "onnxruntime": lambda x: session.run(None, {"x": x.numpy()})}


def linear_kernels(backbone: VisionTransformer, batch: int, rounds: int) -> None:
    """GFLOP/s of each distinct linear layer of the trunk at ``batch`` images' token rows, float32, under each
    of :func:`gemm_runners`."""
    rows = batch * backbone.config.num_tokens(IMAGE_SIZE)
    shapes = sorted({tuple(m.weight.shape) for m in backbone.modules() if isinstance(m, nn.Linear)})
    for out_features, in_features in shapes:
        runners = gemm_runners(torch.randn(out_features, in_features), torch.randn(out_features), rows)
        seconds = time_alternately(runners, torch.randn(rows, in_features), rounds)
        gflop = 2 * rows * in_features * out_features / 1e9
        print(f"  linear {in_features}->{out_features} at {rows} rows: "
              + ", ".join(f"{name} {gflop / value:.1f}" for name, value in seconds.items()) + " GFLOP/s", flush=True)


def contestants(backbone: VisionTransformer, hf: nn.Module, precision: Precision,
                onnx: Callable[[torch.Tensor], object] | None,
                compiled: Callable[[torch.Tensor], object] | None) -> dict[str, Callable[[torch.Tensor], object]]:
    autocast = precision.autocast_dtype is not None

    def hf_forward(images: torch.Tensor) -> object:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return hf(pixel_values=images).last_hidden_state

    found: dict[str, Callable[[torch.Tensor], object]] = {
        "querytune": lambda images: extract_features(backbone, images, False, precision=precision),
        "querytune+layers": lambda images: extract_features(backbone, images, True, precision=precision),
        "HF": hf_forward,
    }
    if onnx is not None:
        found["onnxruntime"] = onnx
    if compiled is not None:
        found["compiled"] = compiled
    return found


def first_call_seconds(run: Callable[[torch.Tensor], object], images: torch.Tensor) -> float:
    started = time.perf_counter()
    run(images)
    return time.perf_counter() - started


def compile_columns(rate: dict[str, float], compile_seconds: float) -> str:
    """The compiled trunk against the eager one: speed ratio, compile seconds, and the images after which the
    compiled trunk has made up its compile time (``never`` where it is not faster)."""
    saved_per_image = 1 / rate["querytune"] - 1 / rate["compiled"]
    break_even = f"{compile_seconds / saved_per_image:.0f}" if saved_per_image > 0 else "never"
    speedup = rate["compiled"] / rate["querytune"]
    return f"{rate['compiled']:>10.1f}{speedup:>8.2f}{compile_seconds:>10.1f}{break_even:>12}"


def time_alternately(runners: dict[str, Callable[[torch.Tensor], object]], images: torch.Tensor,
                     rounds: int) -> dict[str, float]:
    """Median seconds per batch of each runner, one call each per round after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(rounds + 1):
        for name, run in runners.items():
            started = time.perf_counter()
            run(images)
            if round_index:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def profile_trunk(backbone: VisionTransformer, images: torch.Tensor, precision: Precision, with_layers: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    extract_features(backbone, images, with_layers, precision=precision)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        extract_features(backbone, images, with_layers, precision=precision)
    print(f"\nprofile: {backbone.config.name}, batch {len(images)}, {precision}, layers {with_layers}")
    print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE, help="a Hugging Face DINOv2 folder")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--no-vit-b", action="store_true", help="leave out the random ViT-B/16")
    parser.add_argument("--quick", action="store_true", help="DINOv2-S only, batch 1 and 4, 2 rounds")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also the pooled trunk under torch.compile")
    parser.add_argument("--kernels", action="store_true", help="also the trunk's linear layers under each GEMM")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    rounds = 2 if args.quick else args.rounds
    precisions = [Precision.FP32] + ([Precision.BF16] if native_bf16(torch.device("cpu")) else [])

    models = [("DINOv2-S/14", hf_dinov2(args.backbone))]
    if not (args.quick or args.no_vit_b):
        models.append(("ViT-B/16 (random)", hf_random_vit_b16()))
    rates = {precision: matmul_gflops(precision.autocast_dtype or torch.float32) for precision in precisions}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {IMAGE_SIZE} px; matmul rate: "
          + ", ".join(f"{precision} {rate:.0f} GFLOP/s" for precision, rate in rates.items())
          + ("" if len(precisions) > 1 else " (no native bfloat16: fp32 rows only)"))
    header = (f"{'backbone':<19}{'prec':>5}{'batch':>6}{'querytune':>11}{'+layers':>9}{'HF':>8}{'onnxrt':>8}"
              f"{'qt/HF':>7}{'qt/ort':>8}{'layers/HF':>10}{'of matmul':>10}"
              + (f"{'compiled':>10}{'cmp/qt':>8}{'compile s':>10}{'break-even':>12}" if args.compile else ""))
    print(f"img/s, median of {rounds} alternating rounds\n{header}\n{'-' * len(header)}")
    with tempfile.TemporaryDirectory() as folder:
        for label, hf in models:
            backbone = load_backbone(hf, image_size=IMAGE_SIZE)
            onnx = onnx_session(backbone, Path(folder))
            for precision in precisions:
                for batch in batches:
                    compiled = compiled_trunk(backbone, precision) if args.compile else None
                    runners = contestants(backbone, hf, precision, onnx if precision is Precision.FP32 else None,
                                          compiled)
                    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
                    # the compiled trunk's first call compiles it: less one eager forward, its compile time
                    compile_seconds = 0.0
                    if compiled is not None:
                        compile_seconds = first_call_seconds(compiled, images) - first_call_seconds(
                            runners["querytune"], images)
                    seconds = time_alternately(runners, images, rounds)
                    rate = {name: batch / value for name, value in seconds.items()}
                    ort = rate.get("onnxruntime")
                    versus_ort = f"{rate['querytune'] / ort:.2f}" if ort else "-"
                    achieved = trunk_gflop(backbone, batch) / seconds["querytune"]
                    print(f"{label:<19}{precision.value:>5}{batch:>6}{rate['querytune']:>11.1f}"
                          f"{rate['querytune+layers']:>9.1f}{rate['HF']:>8.1f}"
                          f"{f'{ort:.1f}' if ort else '-':>8}{rate['querytune'] / rate['HF']:>7.2f}"
                          f"{versus_ort:>8}"
                          f"{rate['querytune+layers'] / rate['HF']:>10.2f}{achieved / rates[precision]:>10.0%}"
                          + (compile_columns(rate, compile_seconds) if compiled is not None else ""), flush=True)
                    if args.kernels and precision is Precision.FP32:  # the kernels are float32: once per batch
                        linear_kernels(backbone, batch, rounds)
            if args.profile:
                for precision in precisions:
                    profile_trunk(backbone, torch.randn(max(batches), 3, IMAGE_SIZE, IMAGE_SIZE), precision, True)


if __name__ == "__main__":
    main()
