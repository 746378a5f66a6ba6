"""Training-step and loader throughput.

    python bench/train_step.py                       # synthetic shards made in a temp folder
    python bench/train_step.py --shards data/shards/synthetic/train --workers 2
    python bench/train_step.py --device cuda --step-only --fsdp-steps 5   # the GPU step only, then 5 FSDP2 steps

1. images/s of one full training step (forward, all losses, backward, AdamW) for ViT-S at 224² on the CPU
   and, when CUDA is present, ViT-L at 280² under bf16 autocast with model FLOPs utilisation
   (FLOPs counted by torch.utils.flop_counter over forward + backward, against the GPU's dense bf16 peak).
   `--device cuda` (or cpu) measures only that device's step; `--fsdp-steps N` adds N steps of the same
   model wrapped as the trainer wraps it with `run.fsdp` (FSDP2 `fully_shard` per ViT block), in a
   one-process group (nccl on CUDA, gloo on CPU): images/s and peak memory.
2. the streaming loader's images/s (genpan/train/data.py: tar → shuffle → decode all fields → collate) against a
   bare loop that only decodes the JPEGs of the same shards in one process; the ratio is the last line:
   RESULT loader_over_decode=<ratio>   (goal ≥ 0.9: the loader costs no more than the decode itself).
   `--step-only` skips it.

The steps end with `RESULT <device>_train_images_per_s=`, `cuda_train_mfu=` (where the GPU's peak is
known), `fsdp_images_per_s=` and `fsdp_peak_mem_gib=` (CUDA) lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from genpan.train.augment import loss_size
from genpan.train.data import BatchStream, DataConfig, resolve_shards
from genpan.train.losses import LossConfig, compute_losses
from genpan.train.model import ModelConfig, build_model, tiny_cpu_config

# batches per worker before the loader is timed: each worker has then filled every one of its reused
# buffers (PREFETCH + 2, genpan/train/data.py) at least once, so the window is the steady state a run lives in
WARMUP_BATCHES_PER_WORKER = 8
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def random_targets(batch: int, h: int, w: int, num_classes: int, device: torch.device, gen: torch.Generator) -> dict:
    ins = torch.randint(0, 6, (batch, h, w), generator=gen).to(device)
    return {
        "sem": torch.randint(0, num_classes, (batch, h, w), generator=gen).to(device),
        "dist": (torch.rand(batch, h, w, generator=gen) * 30).to(device),
        "u": (torch.rand(batch, h, w, generator=gen) * 2 - 1).to(device),
        "v": (torch.rand(batch, h, w, generator=gen) * 2 - 1).to(device),
        "valid": ins > 0,
        "ignore": torch.zeros(batch, h, w, dtype=torch.bool, device=device),
        "ins": ins,
    }


def model_config(arch: str, size: int) -> ModelConfig:
    """`tiny` is the tiny CPU config (tests and dry runs); other names are DINOv2 sizes."""
    if arch == "tiny":
        return tiny_cpu_config(num_classes=133, img_size=size)
    return ModelConfig(arch=arch, num_classes=133, img_size=size)


def step_throughput(arch: str, size: int, batch: int, steps: int, device: torch.device, bf16: bool,
                    fsdp: bool = False) -> tuple[float, float]:
    """(images/s, FLOPs per step) of forward + losses + backward + AdamW at `size`²; with `fsdp`, the model
    sharded as the trainer shards it (FSDP2 per ViT block, then the whole), in the current process group."""
    model = build_model(model_config(arch, size)).to(device)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.backbone.blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    targets = random_targets(batch, *loss_size(size, size, model.cfg.patch_size), 133, device, gen)
    loss_cfg = LossConfig()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        compute_losses(out, targets, loss_cfg)["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    from torch.utils.flop_counter import FlopCounterMode

    flops = 0.0
    if fsdp:  # FLOPs are counted on the unsharded model; here the step is only warmed up
        step()
    else:
        with FlopCounterMode(display=False) as counter:  # also the warm-up step
            step()
        flops = float(counter.get_total_flops())
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - start), flops


def fsdp_throughput(arch: str, size: int, batch: int, steps: int, device: torch.device, bf16: bool) -> tuple[float, float]:
    """(images/s, peak GiB allocated on CUDA, else 0) of the FSDP2-sharded step in a one-process group."""
    import torch.distributed as dist

    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store.name}",
                                rank=0, world_size=1)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ips, _ = step_throughput(arch, size, batch, steps, device, bf16, fsdp=True)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        finally:
            dist.destroy_process_group()
    return ips, peak


def run_steps(args: argparse.Namespace) -> None:
    """The training-step figures of section 1 for the devices --device selects."""
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise ValueError("--device cuda but no CUDA device here")
    if args.device in ("auto", "cpu"):
        cpu = torch.device("cpu")
        ips, flops = step_throughput(args.cpu_arch, args.cpu_size, args.cpu_batch, args.cpu_steps, cpu, bf16=False)
        print(f"{args.cpu_arch} {args.cpu_size}² CPU train step: {ips:.2f} images/s (batch {args.cpu_batch}, "
              f"{flops / 1e9:.1f} GFLOP/step, {torch.get_num_threads()} threads)")
        print(f"RESULT cpu_train_images_per_s={ips:.3f}")
    if args.device == "cuda" or (args.device == "auto" and cuda):
        gpu = torch.device("cuda")
        ips, flops = step_throughput(args.gpu_arch, args.gpu_size, args.gpu_batch, args.gpu_steps, gpu, bf16=True)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        achieved = flops * ips / args.gpu_batch / 1e12
        mfu = f"{100 * achieved / peak:.1f}% of {peak:.0f} TFLOPS" if peak else "peak unknown"
        print(f"{args.gpu_arch} {args.gpu_size}² bf16 train step on {name}: {ips:.1f} images/s (batch {args.gpu_batch}), "
              f"{achieved:.1f} TFLOPS, MFU {mfu}")
        print(f"RESULT cuda_train_images_per_s={ips:.3f}")
        if peak:
            print(f"RESULT cuda_train_mfu={achieved / peak:.4f}")
    if args.fsdp_steps:
        on_gpu = args.device == "cuda" or (args.device == "auto" and cuda)
        device = torch.device("cuda" if on_gpu else "cpu")
        arch, size, batch = (args.gpu_arch, args.gpu_size, args.gpu_batch) if on_gpu else (args.cpu_arch, args.cpu_size, args.cpu_batch)
        ips, peak_gib = fsdp_throughput(arch, size, batch, args.fsdp_steps, device, bf16=on_gpu)
        memory = f", peak {peak_gib:.1f} GiB allocated" if on_gpu else ""
        print(f"{arch} {size}² FSDP2 train step, 1 process on {device.type}: {ips:.2f} images/s (batch {batch}{memory})")
        print(f"RESULT fsdp_images_per_s={ips:.3f}")
        if on_gpu:
            print(f"RESULT fsdp_peak_mem_gib={peak_gib:.2f}")


def bare_jpeg_decode(urls: list[str]) -> tuple[int, float, float]:
    """(images decoded, seconds, CPU seconds), reading the tars in order and decoding only the images."""
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png")) and member.name.count(".") == 1:
                    data = tar.extractfile(member).read()
                    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                    cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                    count += 1
    return count, time.perf_counter() - start, time.process_time() - cpu


def _process_cpu_s(pid: int) -> float:
    """utime + stime of a process from /proc (Linux); 0 where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def full_decode(urls: list[str]) -> float:
    """images/s of decoding every field (genpan.train.data.decode_sample) in one process, no pipeline."""
    import webdataset as wds

    from genpan.train.data import decode_sample

    raws = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    start = time.perf_counter()
    for raw in raws:
        decode_sample(raw)
    return len(raws) / (time.perf_counter() - start)


def loader_throughput(shards: str, workers: int, batch: int, images: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image of the workers and this process) over `images` loaded images."""
    # a long epoch: no worker restart inside the timed window
    cfg = DataConfig(shards=shards, micro_batch=batch, num_workers=workers, shuffle_buffer=64, shuffle_initial=16,
                     epoch_size=100 * images)
    stream = BatchStream(cfg, seed=0)
    for _ in range(WARMUP_BATCHES_PER_WORKER * max(workers, 1)):  # workers started, every reused buffer allocated once
        next(stream)
    pids = [w.pid for w in getattr(stream._iterator, "_workers", [])]
    cpu = sum(map(_process_cpu_s, pids)) + time.process_time()
    start, seen = time.perf_counter(), 0
    while seen < images:
        seen += len(next(stream)["key"])
    rate = seen / (time.perf_counter() - start)
    return rate, (sum(map(_process_cpu_s, pids)) + time.process_time() - cpu) / seen


def make_shards(root: Path, num_images: int, min_size: int, max_size: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_data import write_synthetic_shards

    return write_synthetic_shards(root, num_images, per_shard=32, min_size=min_size, max_size=max_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="", help="shard folder or pattern (default: 256 synthetic images in a temp folder)")
    parser.add_argument("--workers", type=int, default=2, help="loader DataLoader workers")
    parser.add_argument("--images", type=int, default=256, help="synthetic images to shard when --shards is not given")
    parser.add_argument("--min-size", type=int, default=128, help="smallest side of the synthetic images (default 128)")
    parser.add_argument("--max-size", type=int, default=256, help="largest side of the synthetic images (default 256)")
    parser.add_argument("--loader-batch", type=int, default=8, help="loader batch size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="training steps on: auto (the CPU, and the GPU when CUDA is present), cpu or cuda only")
    parser.add_argument("--cpu-arch", default="vit_small", help="model of the CPU step: a DINOv2 size or tiny (default vit_small)")
    parser.add_argument("--cpu-size", type=int, default=224, help="crop side of the CPU step (default 224)")
    parser.add_argument("--cpu-batch", type=int, default=4, help="batch of the CPU step")
    parser.add_argument("--cpu-steps", type=int, default=3, help="timed CPU steps")
    parser.add_argument("--gpu-arch", default="vit_large", help="model of the GPU step (default vit_large)")
    parser.add_argument("--gpu-size", type=int, default=280, help="crop side of the GPU step (default 280)")
    parser.add_argument("--gpu-batch", type=int, default=32, help="batch of the GPU step")
    parser.add_argument("--gpu-steps", type=int, default=10, help="timed GPU steps")
    parser.add_argument("--fsdp-steps", type=int, default=0,
                        help="also time this many FSDP2 steps in a one-process group (GPU model and batch on CUDA; default 0)")
    parser.add_argument("--step-only", action="store_true", help="only the training steps, not the loader comparison")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--skip-steps", action="store_true", help="only the loader comparison")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of the JPEG loop and the loader; the best of each counts")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.step_only:
            run_steps(args)
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            shards = args.shards or str(make_shards(Path(tmp), args.images, args.min_size, args.max_size))
            urls = resolve_shards(shards)
            if not args.skip_steps:
                run_steps(args)
            # interleaved repeats, best of each: a burst of load from elsewhere then hits one run, not the ratio
            decode_ips = loader_ips = 0.0
            jpeg_cpu = loader_cpu = float("inf")
            for _ in range(args.repeats):
                count, seconds, cpu_s = bare_jpeg_decode(urls)
                decode_ips, jpeg_cpu = max(decode_ips, count / seconds), min(jpeg_cpu, cpu_s / count)
                rate, cpu_per_image = loader_throughput(shards, args.workers, args.loader_batch, 2 * count)
                loader_ips, loader_cpu = max(loader_ips, rate), min(loader_cpu, cpu_per_image)
            fields_ips = full_decode(urls)
            print(f"bare JPEG decode: {decode_ips:.1f} images/s ({count} images, 1 process, best of {args.repeats})")
            print(f"decode of every field (image + zstd label planes + json), 1 process, no pipeline: {fields_ips:.1f} images/s")
            print(f"loader ({args.workers} workers, all fields + collate): {loader_ips:.1f} images/s")
            if 0 < loader_cpu < float("inf") and 0 < jpeg_cpu < float("inf"):  # CPU time hardly depends on the load
                loader_ms, jpeg_ms = 1e3 * loader_cpu, 1e3 * jpeg_cpu
                print(f"CPU per image: loader {loader_ms:.3f} ms (workers + this process), bare JPEG decode {jpeg_ms:.3f} ms;"
                      f" with {args.workers} free cores the loader would reach {args.workers * jpeg_ms / loader_ms:.2f}x the decode")
            print(f"RESULT loader_over_decode={loader_ips / decode_ips:.3f}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
