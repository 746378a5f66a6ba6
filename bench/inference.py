"""Inference speed: eager PyTorch vs the `torch.export` program vs onnxruntime, images/s.

CPU: the tiny CPU config and ViT-S (decoder 256, 133 classes) at 224² and 448², batch 1, random weights.
With CUDA: ViT-L at 644² in bf16, eager vs the exported program (onnxruntime here is the CPU build).
Each timing is the best of --repeats runs of --iters forward passes after a warm-up. Ends with
`RESULT onnx_over_eager=<ratio>`: the geometric mean over the CPU cases of onnxruntime's images/s over eager's.

    python bench/inference.py                   # all CPU cases (+ the GPU case when CUDA is present)
    python bench/inference.py --quick           # tiny config at 224² only
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from genpan.eval.export import export_onnx, export_program
from genpan.eval.exported import ExportPredictor
from genpan.train.model import ModelConfig, build_model, tiny_cpu_config


def best_rates(fns: dict[str, Callable[[], object]], batch: int, iters: int, repeats: int,
               sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Images/s of each function: the fastest of `repeats` timed runs of `iters` calls, after a warm-up call.

    The runs are interleaved (a, b, c, a, b, c, ...) so that load from other processes hits every contender alike.
    """
    best = dict.fromkeys(fns, math.inf)
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch * iters / t for name, t in best.items()}


def cpu_case(name: str, cfg: ModelConfig, size: int, iters: int, repeats: int, folder: Path) -> dict[str, float]:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    predictor = ExportPredictor(model)
    x = torch.rand(1, 3, size, size)
    program = export_program(predictor).module()
    onnx_path = export_onnx(predictor, folder / f"{name}.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    with torch.inference_mode():
        rates = best_rates(
            {"eager": lambda: model(x), "export": lambda: program(x), "onnx": lambda: session.run(None, feed)}, 1, iters, repeats
        )
        diff = max(float(np.abs(a.numpy() - b).max()) for a, b in zip(predictor(x), session.run(None, feed)))
    print(f"{name:6s} {size:4d}²  eager {rates['eager']:7.2f}  export {rates['export']:7.2f}  onnx {rates['onnx']:7.2f} img/s"
          f"  onnx/eager {rates['onnx'] / rates['eager']:.2f}  max|Δ| {diff:.1e}", flush=True)
    return rates


def gpu_case(iters: int, repeats: int) -> None:
    """ViT-L/14 at 644² in bf16 on CUDA: eager vs the exported program (batch 4)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit_large", num_classes=133, img_size=518)
    model = build_model(cfg).eval().cuda().to(torch.bfloat16)
    predictor = ExportPredictor(model)
    x = torch.rand(4, 3, 644, 644, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        program = torch.export.export(predictor, (x,), dynamic_shapes=None).module()
    sync = torch.cuda.synchronize
    with torch.inference_mode():
        rates = best_rates({"eager": lambda: model(x), "export": lambda: program(x)}, 4, iters, repeats, sync)
    eager, exported = rates["eager"], rates["export"]
    print(f"vit_l   644²  bf16 cuda  eager {eager:7.2f}  export {exported:7.2f} img/s  export/eager {exported / eager:.2f}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/inference.py", description="images/s of eager vs torch.export vs onnxruntime")
    parser.add_argument("--quick", action="store_true", help="only the tiny config at 224²")
    parser.add_argument("--iters", type=int, default=3, help="forward passes per timed run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the CUDA case even when CUDA is present")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("tiny", tiny_cpu_config(num_classes=133), 224)]
    if not args.quick:
        vit_s = ModelConfig(arch="vit_small", num_classes=133, img_size=518)
        cases += [("tiny", tiny_cpu_config(num_classes=133), 448), ("vit_s", vit_s, 224), ("vit_s", vit_s, 448)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch 1, best of {args.repeats}×{args.iters}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, size in cases:
            rates = cpu_case(name, cfg, size, args.iters, args.repeats, Path(tmp))
            ratios.append(rates["onnx"] / rates["eager"])
    if torch.cuda.is_available() and not args.no_gpu:
        gpu_case(args.iters * 3, args.repeats)
    print(f"RESULT onnx_over_eager={math.exp(np.mean(np.log(ratios))):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
