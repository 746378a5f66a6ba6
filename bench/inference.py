"""Inference speed, two benchmarks.

`backends` (the default): eager PyTorch vs the `torch.export` program vs onnxruntime, images/s.
CPU: the tiny CPU config and ViT-S (decoder 256, 133 classes) at 224² and 448², batch 1, random weights.
With CUDA: ViT-L at 644² in bf16, eager vs the exported program (onnxruntime here is the CPU build).
Each timing is the best of --repeats runs of --iters forward passes after a warm-up. Ends with
`RESULT onnx_over_eager=<ratio>`: the geometric mean over the CPU cases of onnxruntime's images/s over eager's.

`predict`: images/s of (a) the forward pass alone and (b) the whole eval/predict.py loop
(`run_prediction`: read and resize JPEGs in worker threads, forward, post-process, write the PNGs and
per-image records, assemble the JSON) on the same images at the same batch size. The JPEGs are crops of
the two real COCO val2017 photos under tests/data/coco_panoptic, re-encoded at quality 90 into a temp
folder. The weights are random, so the model's outputs are replaced after its forward pass by the
ideal outputs of a COCO-like random scene with noise (133 classes, ~20 instances, as
bench/postprocess_speed.py): post-processing then costs what it costs on a trained model's outputs.
Also timed: (c) post-processing alone (`postprocess_outputs` over the same batches' scene outputs on
the device, one thread), which says what bounds (b) when it falls short of (a).
Each figure is the best of --repeats interleaved runs after a warm-up run. Ends with
`RESULT predict_over_forward=<(b) / (a)>` (goal ≥ 0.8 on a GPU: post-processing and writing hide
behind the forward pass).

    python bench/inference.py                   # backends: all CPU cases (+ the GPU case when CUDA is present)
    python bench/inference.py --quick           # backends: tiny config at 224² only
    python bench/inference.py predict           # predict loop vs forward, CPU, tiny config at 224
    python bench/inference.py predict --device cuda --arch vit_large --size 644 --jpeg-size 644x644 --bf16
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from genpan.eval.export import export_onnx, export_program
from genpan.eval.exported import ExportPredictor
from genpan.train.model import ModelConfig, build_model, tiny_cpu_config

REPO = Path(__file__).resolve().parents[1]
COCO_SAMPLES = REPO / "tests" / "data" / "coco_panoptic"


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


def backends_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/inference.py [backends]", description="images/s of eager vs torch.export vs onnxruntime")
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


# ------------------------------------------------------------------------------------------ predict loop
def write_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """`count` JPEGs of width × height: random crops (and flips) of the real COCO samples, quality 90."""
    rng = np.random.default_rng(seed)
    photos = [cv2.imread(str(p)) for p in sorted((COCO_SAMPLES / "val2017").glob("*.jpg"))]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = photo[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA if cw > width else cv2.INTER_LINEAR)
        cv2.imwrite(str(folder / f"img{i:04d}.jpg"), crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def scene_outputs(h: int, w: int, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Outputs a trained model could give at h × w: ideal outputs of a random COCO-like scene plus noise."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from postprocess_speed import NUM_STUFF, NUM_THINGS, random_scene

    from genpan.eval.postprocess import ideal_outputs

    rng = np.random.default_rng(seed)
    pan, segs = random_scene(rng, max(h, w), 20)
    pan = pan[:h, :w]
    segs = [s for s in segs if (pan == s["id"]).any()]
    num_classes = NUM_THINGS + NUM_STUFF
    sem, inst = ideal_outputs(pan, segs, {c: c for c in range(num_classes)}, set(range(NUM_THINGS)), num_classes)
    sem = sem + rng.normal(0, 1.0, sem.shape).astype(np.float32)
    inst = inst + rng.normal(0, 0.2, inst.shape).astype(np.float32)
    return {"sem": torch.from_numpy(sem)[None].expand(batch, -1, -1, -1).contiguous(),
            "inst": torch.from_numpy(inst)[None].expand(batch, -1, -1, -1).contiguous()}


def predict_main(argv: Sequence[str] | None = None) -> int:
    from genpan.coco_panoptic import load_panoptic_json
    from genpan.eval.postprocess import PostprocessConfig
    from genpan.eval.predict import (
        InferenceMeta,
        Settings,
        TorchBackend,
        fit_size,
        folder_source,
        normalise_categories,
        postprocess_outputs,
        run_prediction,
        to_batch,
    )

    parser = argparse.ArgumentParser(prog="bench/inference.py predict",
                                     description="images/s of the forward pass alone vs the whole eval/predict.py loop")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--arch", default="tiny", help="tiny (the tiny CPU config), vit_small, vit_base, vit_large (default tiny)")
    parser.add_argument("--size", type=int, default=224, help="input short side in px, rounded to the patch (default 224)")
    parser.add_argument("--jpeg-size", default="640x480", help="W x H of the JPEGs written (default 640x480, COCO-like)")
    parser.add_argument("--images", type=int, default=16, help="images per run (default 16)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as eval/predict.py --bf16)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the fastest counts (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--model-outputs", action="store_true",
                        help="post-process the random model's own outputs instead of the scene outputs")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.jpeg_size.lower().split("x"))
    except ValueError:
        parser.error(f"--jpeg-size must be WxH, got {args.jpeg_size!r}")
    if min(args.images, args.batch_size, args.repeats, args.size, width, height) < 1:
        parser.error("--images, --batch-size, --repeats, --size and --jpeg-size must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device here", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    categories = normalise_categories(load_panoptic_json(COCO_SAMPLES / "annotations" / "panoptic_val2017.json")["categories"], "COCO")
    if args.arch == "tiny":
        cfg = tiny_cpu_config(num_classes=len(categories))
    else:
        cfg = ModelConfig(arch=args.arch, num_classes=len(categories), img_size=518)
    torch.manual_seed(0)
    meta = InferenceMeta(cfg, categories, args.size, f"random {args.arch}")
    forward = TorchBackend(build_model(cfg).eval(), args.device, args.bf16)
    in_h, in_w = fit_size(height, width, args.size, cfg.patch_size)
    out_h, out_w = in_h * 8 // cfg.patch_size, in_w * 8 // cfg.patch_size

    class SceneBackend(TorchBackend):
        """The model's forward pass, then the scene's outputs in place of the random model's."""

        def __init__(self) -> None:
            self.model, self.device, self.bf16 = forward.model, forward.device, forward.bf16
            self.scenes = {b: {k: v.to(device) for k, v in scene_outputs(out_h, out_w, b).items()}
                           for b in {args.batch_size, args.images % args.batch_size} if b}

        def forward(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
            out = super().forward(batch)
            if args.model_outputs:
                return out
            return {**out, **{k: v.clone() for k, v in self.scenes[len(batch)].items()}}

    predict_backend = SceneBackend()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_jpegs(Path(tmp) / "jpegs", args.images, width, height)
        source = folder_source(folder)
        images = [cv2.resize(cv2.imread(str(p))[..., ::-1], (in_w, in_h), interpolation=cv2.INTER_AREA)
                  for p in sorted(folder.glob("*.jpg"))]
        batches = [to_batch(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
        runs = iter(range(10**6))

        def forward_alone() -> None:
            for batch in batches:
                forward.forward(batch)
            sync()

        def postprocess_alone() -> None:  # the scene outputs of every batch, on the device, in this thread
            for batch in batches:
                out = predict_backend.scenes[len(batch)]
                with torch.inference_mode():
                    postprocess_outputs(out["sem"], out["inst"], meta.train_to_category, meta.thing_train_ids, PostprocessConfig())
            sync()

        def whole_loop() -> None:
            run = run_prediction(predict_backend, meta, source, Settings(Path(tmp) / f"out{next(runs)}", "pred",
                                 size=args.size, batch_size=args.batch_size, progress=False))
            if run.predicted != args.images:
                raise RuntimeError(f"predicted {run.predicted} of {args.images} images")
            sync()

        contenders = {"forward": forward_alone, "predict": whole_loop}
        if not args.model_outputs:
            contenders["postprocess"] = postprocess_alone
        rates = best_rates(contenders, args.images, 1, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.arch} at {in_h}x{in_w} ({args.jpeg_size} JPEGs, short side {args.size}), outputs {out_h}x{out_w}, "
          f"batch {args.batch_size}, {args.images} images, {'bf16' if args.bf16 else 'fp32'}, {name}, best of {args.repeats}")
    print(f"forward alone:         {rates['forward']:8.2f} images/s")
    print(f"whole predict loop:    {rates['predict']:8.2f} images/s"
          f"{'' if args.model_outputs else ' (post-processing the scene outputs)'}")
    if "postprocess" in rates:
        print(f"post-processing alone: {rates['postprocess']:8.2f} images/s (one thread, outputs on {device.type})")
    print(f"RESULT predict_images_per_s={rates['predict']:.3f}")
    print(f"RESULT forward_images_per_s={rates['forward']:.3f}")
    if "postprocess" in rates:
        print(f"RESULT postprocess_images_per_s={rates['postprocess']:.3f}")
    print(f"RESULT predict_over_forward={rates['predict'] / rates['forward']:.3f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        return predict_main(argv[1:])
    if argv and argv[0] == "backends":
        argv = argv[1:]
    return backends_main(argv)


if __name__ == "__main__":
    sys.exit(main())
