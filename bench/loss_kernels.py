"""Fused Triton loss kernels against eager PyTorch and torch.compile of the reference.

For each case (instance PE+TV at the stage-1 shape 1024×16×160² and the stage-3 shape 16×16×576²;
semantic CE+TV at 16×133×576²) it measures forward+backward time (median of CUDA-event timings),
the peak memory above the inputs during one forward+backward, and the fused kernels' achieved
bandwidth = bytes they must move / time, as a fraction of the device's peak (a table by device name,
or --peak-gbs). It prints the goals (≥3× eager, ≥1.3× compile, ≥70 % of peak
bandwidth, extra memory ≤ ¼ eager) and ends with `RESULT <metric>=<value>` lines.

Bytes counted for the fused path (the floor for an unfused-free implementation): forward reads the
prediction and the per-pixel targets once; backward reads them again and writes the gradient once
(semantic: plus 3 fp32 statistics per pixel written in forward and read in backward).

Without CUDA it says so, runs a small correctness smoke check of the kernels under the Triton
interpreter against the reference, and exits 0.

    python bench/loss_kernels.py                 # all cases, bf16 predictions
    python bench/loss_kernels.py --dtype fp32 --cases inst_stage3 --iters 20
"""

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Peak DRAM bandwidth in GB/s by a substring of torch.cuda.get_device_name (first match wins).
PEAK_GBS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
)

GOALS = {"over_eager": 3.0, "over_compile": 1.3, "bandwidth_frac": 0.70, "mem_ratio": 0.25}


@dataclass(frozen=True)
class Case:
    name: str
    task: str  # "inst" | "sem"
    batch: int
    channels: int
    size: int


CASES = {
    "inst_stage1": Case("inst_stage1", "inst", 1024, 16, 160),
    "inst_stage3": Case("inst_stage3", "inst", 16, 16, 576),
    "sem_stage3": Case("sem_stage3", "sem", 16, 133, 576),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated cases to run, from {', '.join(CASES)} (default: all)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="dtype of the prediction/logits, as the trainer's bf16 autocast produces (default bf16)")
    p.add_argument("--iters", type=int, default=10, help="timed forward+backward iterations per method (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first, compile included (default 3)")
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="device peak memory bandwidth in GB/s (default: looked up by device name)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda: the benchmark; cpu: the interpreter smoke check; auto: cuda when present (default)")
    p.add_argument("--D", type=float, default=20.0, help="EDS decay D in pixels (default 20)")
    p.add_argument("--wmin", type=float, default=0.0, help="EDS floor weight (default 0)")
    args = p.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise ValueError(f"--cases: unknown case(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    if args.iters < 1 or args.warmup < 0:
        raise ValueError("--iters must be >= 1 and --warmup >= 0")
    args.cases = names
    return args


# ---------------------------------------------------------------- inputs and methods


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    B, C, S = case.batch, case.channels, case.size
    pred = torch.randn(B, C, S, S, generator=g, device=device).to(dtype)
    dist = torch.rand(B, S, S, generator=g, device=device) * 40
    if case.task == "sem":
        labels = torch.randint(0, C, (B, S, S), generator=g, device=device)
        labels[torch.rand(B, S, S, generator=g, device=device) > 0.9] = 255
        return {"pred": pred, "labels": labels, "dist": dist}
    u = torch.rand(B, S, S, generator=g, device=device) * 2 - 1
    v = torch.rand(B, S, S, generator=g, device=device) * 2 - 1
    crowd = torch.rand(B, S, S, generator=g, device=device) > 0.95
    valid = (torch.rand(B, S, S, generator=g, device=device) > 0.5) & ~crowd
    return {"pred": pred, "u": u, "v": v, "valid": valid, "ignore": crowd, "dist": dist}


def loss_fn(case: Case, method: str, D: float, wmin: float) -> Callable[[dict, torch.Tensor], tuple]:
    from genpan.train import losses as L

    if case.task == "inst":
        n_harm = case.channels // 4
        if method == "fused":
            from genpan.kernels.inst_loss import fused_inst_pe_tv as fn
        else:
            fn = L.inst_pe_tv
        if method == "compile":
            fn = torch.compile(fn, dynamic=False)
        return lambda t, x: fn(x, t["u"], t["v"], t["valid"], t["ignore"], t["dist"], n_harm, D, wmin)
    if method == "fused":
        from genpan.kernels.sem_loss import fused_sem_ce_tv as fn
    else:
        fn = L.sem_ce_tv
    if method == "compile":
        fn = torch.compile(fn, dynamic=False)
    return lambda t, x: fn(x, t["labels"], t["dist"], D, wmin)


def fwd_bwd(fn, t: dict, x: torch.Tensor) -> torch.Tensor:
    a, b = fn(t, x)
    return torch.autograd.grad(a + 0.5 * b, x)[0]


def measure(fn, t: dict, iters: int, warmup: int) -> tuple[float, int]:
    """Median forward+backward milliseconds and peak bytes allocated above the inputs."""
    x = t["pred"].detach().requires_grad_()
    for _ in range(warmup):
        fwd_bwd(fn, t, x)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(fn, t, x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fwd_bwd(fn, t, x)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), extra


def fused_bytes(case: Case, t: dict) -> int:
    """Bytes the fused forward+backward must move at least (see module docstring)."""
    pred = t["pred"]
    pix = pred.shape[0] * pred.shape[2] * pred.shape[3]
    pred_bytes = pred.numel() * pred.element_size()
    if case.task == "inst":
        aux = pix * (4 + 4 + 1 + 1 + 4)  # u, v, valid, ignore, dist
        return 2 * (pred_bytes + aux) + pred_bytes
    aux = pix * (t["labels"].element_size() + 4)  # labels, dist
    stats = pix * 3 * 4
    return 2 * (pred_bytes + aux) + pred_bytes + 2 * stats


def peak_bandwidth(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, gbs in PEAK_GBS:
        if key in name:
            return gbs
    return None


# ---------------------------------------------------------------- reports


def run_gpu(args: argparse.Namespace) -> list[tuple[str, float]]:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name, args.peak_gbs)
    print(f"device: {name}; peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbs)'}; "
          f"prediction dtype {args.dtype}")
    methods = ["fused", "eager"] + ([] if args.no_compile else ["compile"])
    results: list[tuple[str, float]] = []
    for case_name in args.cases:
        case = CASES[case_name]
        t = make_inputs(case, dtype, "cuda")
        print(f"\n{case.name}: {case.task} B={case.batch} C={case.channels} {case.size}²")
        print(f"  {'method':8} {'ms':>9} {'extra MiB':>10}")
        row = {}
        for method in methods:
            ms, extra = measure(loss_fn(case, method, args.D, args.wmin), t, args.iters, args.warmup)
            row[method] = (ms, extra)
            print(f"  {method:8} {ms:9.3f} {extra / 2**20:10.1f}")
        fused_ms, fused_mem = row["fused"]
        gbs = fused_bytes(case, t) / (fused_ms * 1e-3) / 1e9
        metrics = {"over_eager": row["eager"][0] / fused_ms, "mem_ratio": fused_mem / max(row["eager"][1], 1)}
        if "compile" in row:
            metrics["over_compile"] = row["compile"][0] / fused_ms
        print(f"  fused achieved bandwidth {gbs:.0f} GB/s", end="")
        if peak:
            metrics["bandwidth_frac"] = gbs / peak
            print(f" = {metrics['bandwidth_frac']:.1%} of peak")
        else:
            print()
        for key, value in metrics.items():
            goal = GOALS[key]
            ok = value <= goal if key == "mem_ratio" else value >= goal
            sign = "<=" if key == "mem_ratio" else ">="
            print(f"  goal {key} {sign} {goal}: {value:.3f} {'met' if ok else 'MISSED'}")
            results.append((f"{case.task}_fused_{key}_{case.name.split('_')[1]}", value))
        del t
        torch.cuda.empty_cache()
    return results


def run_cpu_smoke() -> list[tuple[str, float]]:
    """Kernels under the Triton interpreter on tiny maps against the reference (values and gradients)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported by the kernels
    from genpan.kernels.inst_loss import fused_inst_pe_tv
    from genpan.kernels.sem_loss import fused_sem_ce_tv
    from genpan.train import losses as L

    worst = 0.0
    inst, sem = Case("inst", "inst", 2, 16, 19), Case("sem", "sem", 2, 37, 11)
    for case, fused, ref in (
        (inst, lambda t, x: fused_inst_pe_tv(x, t["u"], t["v"], t["valid"], t["ignore"], t["dist"], 4, 4.0, 0.0),
         lambda t, x: L.inst_pe_tv(x, t["u"], t["v"], t["valid"], t["ignore"], t["dist"], 4, 4.0, 0.0)),
        (sem, lambda t, x: fused_sem_ce_tv(x, t["labels"], t["dist"], 4.0, 0.0),
         lambda t, x: L.sem_ce_tv(x, t["labels"], t["dist"], 4.0, 0.0)),
    ):
        t = make_inputs(case, torch.float32, "cpu")
        x = t["pred"].requires_grad_()
        values = [torch.stack(f(t, x)).detach() for f in (fused, ref)]
        grads = [fwd_bwd(f, t, x) for f in (fused, ref)]
        rel_v = ((values[0] - values[1]).abs() / values[1].abs()).max().item()
        rel_g = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
        print(f"  {case.task}: max relative error of the values {rel_v:.2e}, of the gradient {rel_g:.2e}")
        worst = max(worst, rel_v, rel_g)
    print(f"  smoke check {'passed' if worst < 1e-5 else 'FAILED'} (tolerance 1e-5)")
    return [("cpu_smoke_max_rel_err", worst)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device here")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        results = run_gpu(args)
    else:
        print("CPU: the benchmark needs a GPU; running the CPU correctness smoke check only "
              "(kernels under TRITON_INTERPRET=1 against the reference)")
        results = run_cpu_smoke()
    for key, value in results:
        print(f"RESULT {key}={value:.4g}")
    smoke_failed = any(k == "cpu_smoke_max_rel_err" and v >= 1e-5 for k, v in results)
    return 1 if smoke_failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
