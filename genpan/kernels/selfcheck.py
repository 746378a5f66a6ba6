"""Start-up self-check of the fused loss kernels on the device and dtype a run trains with.

The kernels are tested against the PyTorch reference under Triton's interpreter on the CPU; a GPU
compiles them anew for its own architecture and Triton release. So before a run relies on them, the
fused forward and backward are compared with the reference on a small random batch on the actual
device and dtype, with the tolerances of tests/test_kernels_interpreted.py: forward rtol 1e-5;
gradients rtol 1e-5 (fp32) or 2^-7 (bf16: one rounding of the fp32 result) plus atol 1e-5·max|g_ref|.

    python kernels/check.py                  # CUDA, fp32 and bf16: a table, exit 1 on any failure
    TRITON_INTERPRET=1 python kernels/check.py --device cpu
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

BF16_GRAD_RTOL = 2.0**-7
FORWARD_RTOL = 1e-5
Kernel = Callable[..., tuple[Tensor, Tensor]]


def _inst_inputs(device: torch.device, dtype: torch.dtype, n_harm: int = 2) -> tuple:
    g = torch.Generator().manual_seed(0)
    B, H, W = 2, 13, 23  # three 128-pixel tiles, the last partial, straddling rows
    pred = torch.randn(B, 4 * n_harm, H, W, generator=g)
    u, v = torch.rand(B, H, W, generator=g) * 2 - 1, torch.rand(B, H, W, generator=g) * 2 - 1
    crowd = torch.rand(B, H, W, generator=g) > 0.85
    valid = (torch.rand(B, H, W, generator=g) > 0.4) & ~crowd
    dist = torch.rand(B, H, W, generator=g) * 6
    on = [t.to(device) for t in (pred, u, v, valid, crowd, dist)]
    return (on[0].to(dtype), *on[1:], n_harm, 4.0, 0.05)


def _sem_inputs(device: torch.device, dtype: torch.dtype, C: int = 19) -> tuple:
    g = torch.Generator().manual_seed(1)
    B, H, W = 2, 5, 17
    logits = torch.randn(B, C, H, W, generator=g) * 3
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) > 0.8] = 255
    dist = torch.rand(B, H, W, generator=g) * 6
    return (logits.to(device, dtype), labels.to(device), dist.to(device), 4.0, 0.05)


def _compare(name: str, fused: Kernel, reference: Kernel, args: tuple, grad_rtol: float) -> str | None:
    """None when `fused` matches `reference` on `args` (first = prediction), else the reason."""
    x = args[0].detach().requires_grad_()
    x_ref = args[0].detach().float().requires_grad_()
    a, b = fused(x, *args[1:])
    a_ref, b_ref = reference(x_ref, *args[1:])
    (g,) = torch.autograd.grad(0.7 * a - 1.3 * b, x)  # grad_output ≠ 1 on both outputs
    (g_ref,) = torch.autograd.grad(0.7 * a_ref - 1.3 * b_ref, x_ref)
    for label, got, want in (("forward (loss)", a, a_ref), ("forward (TV)", b, b_ref)):
        if not torch.allclose(got.float(), want.float(), rtol=FORWARD_RTOL, atol=1e-7):
            return f"{name} {label}: {got.item():.8g} vs reference {want.item():.8g}"
    atol = 1e-5 * g_ref.abs().max().item() + 1e-12
    if g.dtype != x.dtype or g.shape != x.shape:
        return f"{name} backward: gradient {g.dtype} {tuple(g.shape)}, expected {x.dtype} {tuple(x.shape)}"
    err = (g.float() - g_ref).abs() - (atol + grad_rtol * g_ref.abs())
    if not torch.isfinite(g).all() or err.max().item() > 0:
        worst = (g.float() - g_ref).abs().max().item()
        return f"{name} backward: gradient off by up to {worst:.3g} (tolerance rtol {grad_rtol:.3g}, atol {atol:.3g})"
    return None


def check_kernels(device: torch.device | str, dtype: torch.dtype, inst_kernel: Kernel | None = None,
                  sem_kernel: Kernel | None = None) -> str | None:
    """None when both fused kernels match the reference on (device, dtype), else a one-line reason.

    `inst_kernel` / `sem_kernel` replace the Triton kernels (tests inject broken ones)."""
    from genpan.train import losses as reference

    device = torch.device(device)
    grad_rtol = BF16_GRAD_RTOL if dtype == torch.bfloat16 else 1e-5
    try:
        if inst_kernel is None:
            from genpan.kernels.inst_loss import fused_inst_pe_tv as inst_kernel
        if sem_kernel is None:
            from genpan.kernels.sem_loss import fused_sem_ce_tv as sem_kernel
        return (_compare("instance kernel", inst_kernel, reference.inst_pe_tv, _inst_inputs(device, dtype), grad_rtol)
                or _compare("semantic kernel", sem_kernel, reference.sem_ce_tv, _sem_inputs(device, dtype), grad_rtol))
    except Exception as exc:  # a compile error, a launch failure, an unsupported device: all mean "don't use them"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}"[:300]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare the fused Triton loss kernels with the PyTorch reference on a device.")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (needs TRITON_INTERPRET=1 set before start)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes (default float32,bfloat16)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; use --device cpu with TRITON_INTERPRET=1 to check under the interpreter", file=sys.stderr)
        return 2
    failures = 0
    print("| device | dtype | result |\n|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip(), None)
        if not isinstance(dtype, torch.dtype):
            print(f"error: unknown dtype {name!r}", file=sys.stderr)
            return 2
        reason = check_kernels(args.device, dtype)
        failures += reason is not None
        print(f"| {args.device} | {name.strip()} | {'ok' if reason is None else 'FAIL: ' + reason} |")
    print(f"RESULT kernel_selfcheck_failures={failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
