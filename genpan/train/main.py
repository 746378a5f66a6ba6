"""Train the panoptic model (paper 5.1): one process on a CPU, or many under torchrun.

One process (CPU or one GPU):
    python train/main.py --config train/configs/tiny_cpu.toml
    python train/main.py --config train/configs/tiny_cpu.toml --optim.lr=1e-3 --run.out=runs/try2

One node, 8 GPUs (DDP, nccl):
    torchrun --standalone --nproc_per_node=8 train/main.py --config train/configs/stage1.toml \
        --backbone-weights dinov2_vitl14_pretrain.pth

Two nodes, 8 GPUs each (c10d rendezvous; run the same command on both nodes, HOST = node 0's address):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=stage1 \
        train/main.py --config train/configs/stage1.toml --backbone-weights dinov2_vitl14_pretrain.pth

Two CPU processes (gloo; what the tests run):
    torchrun --standalone --nproc_per_node=2 train/main.py --config train/configs/tiny_cpu.toml

The next stage starts from the previous stage's weights; a killed run continues where its last checkpoint was:
    torchrun ... train/main.py --config train/configs/stage2.toml --init-from runs/stage1/final.pt
    torchrun ... train/main.py --config train/configs/stage1.toml --resume

Outputs under run.out: config.resolved.toml, metrics.jsonl (step, every loss term, lr, images/s),
checkpoints/step-N/ (atomic, checksummed; the newest two kept), final.pt (model weights + config).
run.out must be on a filesystem every node sees.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from genpan.config import ConfigError, parse_args_with_overrides


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Train the generalist panoptic model. Any config value can be overridden as "
        "--section.key=value (e.g. --optim.lr=1e-3 --data.micro_batch=4 --run.out=runs/x); see train/config.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="TOML config (train/configs/*.toml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in run.out from its newest intact checkpoint (exactly: weights, "
                        "optimizer, schedule, RNG and data position)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from another run's model weights (final.pt or a checkpoints/step-N folder); "
                        "optimizer and schedule start fresh")
    parser.add_argument("--backbone-weights", type=Path, default=None,
                        help="official backbone weights loaded into the encoder: DINOv2 dinov2_vit*14[_reg4]_pretrain.pth; "
                             "DINOv3 (model.backbone = dinov3_*) dinov3_vit*16*_pretrain_*.pth or a Hugging Face model directory")
    return parse_args_with_overrides(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        from genpan.train.config import load_train_config
        from genpan.train.trainer import Trainer

        cfg = load_train_config(args.config, overrides)
        for flag, path in (("--init-from", args.init_from), ("--backbone-weights", args.backbone_weights)):
            if path is not None and not path.exists():
                raise FileNotFoundError(f"{flag}: {path} does not exist")
        trainer = Trainer(cfg, resume=args.resume, init_from=args.init_from, backbone_weights=args.backbone_weights)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except pickle.UnpicklingError as exc:  # weights_only=True refused a file: not a plain tensor checkpoint
        print(f"error: refusing to load a checkpoint that is not plain tensors and containers ({str(exc).splitlines()[0]})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
