"""The lean trainer (genpan/train/trainer.py, genpan/train/main.py, genpan/train/schedule.py, genpan/train/config.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_data import write_synthetic_shards

from genpan.train.config import load_train_config
from genpan.train.main import main
from genpan.train.model import build_model, param_groups_layer_decay
from genpan.train.schedule import WarmupCosine, build_scheduler
from genpan.train.trainer import FINAL_NAME, METRICS_NAME, Trainer, read_metrics

torch.set_num_threads(1)
TINY = "train/configs/tiny_cpu.toml"


def tiny_overrides(shards: Path, out: Path, micro_batch: int = 2, steps: int = 4) -> list[str]:
    """A shrunken tiny_cpu model at 56² on fixed, unaugmented batches (one thread: the machine is shared)."""
    return [
        f"--data.shards={shards}", f"--run.out={out}", "--data.num_workers=0", f"--data.micro_batch={micro_batch}",
        f"--optim.batch_size={micro_batch}", "--data.size=[56,56]", "--data.scale_min=1.0", "--data.scale_max=1.0",
        "--data.flip_prob=0.0", "--data.resampled=false", "--data.shuffle_buffer=1", "--data.shuffle_initial=1",
        "--model.embed_dim=64", "--model.depth=2", "--model.num_heads=2", "--model.img_size=56",
        "--model.decoder_width=32", "--run.progress=false", "--run.threads=1", "--run.log_every=1",
        f"--schedule.max_steps={steps}", "--schedule.warmup_steps=0", "--run.ckpt_every=0",
    ]


@pytest.fixture(scope="module")
def two_image_shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("two"), num_images=2, per_shard=2, min_size=56, max_size=56)


def test_tiny_model_overfits_two_images(two_image_shards, tmp_path):
    """Loss falls ≥ 10× on two fixed images: every sem/inst term of the paper on (TV and DICE weighted 0.1,
    the paper gives no weights; at 1.0 their floors — TV at real boundaries — keep the total above 1/10)."""
    overrides = tiny_overrides(two_image_shards, tmp_path / "run", steps=500) + [
        '--tasks=["sem","inst"]', "--optim.lr=2e-3", "--optim.min_lr=2e-3", "--optim.weight_decay=0",
        "--optim.grad_clip=0", "--loss.sem_tv_weight=0.1", "--loss.inst_tv_weight=0.1", "--loss.dice_weight=0.1",
    ]
    trainer = Trainer(load_train_config(TINY, overrides))
    trainer.fit()
    metrics = read_metrics(tmp_path / "run" / METRICS_NAME)
    first = metrics[0]["loss_total"]
    last = min(r["loss_total"] for r in metrics[-20:])
    assert last * 10 <= first, f"total loss {first:.3f} → {last:.3f}"
    assert (tmp_path / "run" / FINAL_NAME).is_file()


def test_warmup_cosine_matches_formula_per_layer_group():
    model = build_model(load_train_config(TINY, ["--model.embed_dim=32", "--model.depth=2", "--model.num_heads=2"]).model)
    groups = param_groups_layer_decay(model, 1e-3, 0.05, 0.5)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    schedule = WarmupCosine(1e-3, 1e-5, warmup_steps=3, total_steps=10)
    scheduler = build_scheduler(optimizer, schedule)
    for step in range(10):
        if step < 3:
            expected = 1e-3 * (step + 1) / 3
        else:
            expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (step - 3) / 7))
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected * group["lr_scale"], rel=1e-12)
        optimizer.step()
        scheduler.step()
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]  # embeddings, block 1, block 2, head/decoder (depth 2, decay 0.5)


def test_accumulation_and_init_from(two_image_shards, tmp_path):
    run = tmp_path / "a"
    overrides = tiny_overrides(two_image_shards, run, micro_batch=1, steps=2) + ["--optim.batch_size=2"]
    trainer = Trainer(load_train_config(TINY, overrides))
    assert trainer.accum == 2
    trainer.fit()
    messages: list[str] = []
    follow = Trainer(load_train_config(TINY, tiny_overrides(two_image_shards, tmp_path / "b")),
                     init_from=run / FINAL_NAME, log=messages.append)
    saved = torch.load(run / FINAL_NAME, weights_only=True)["model"]
    for name, value in follow.raw_model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert any("init from" in m for m in messages)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_config_gives_one_line_errors(two_image_shards, tmp_path, capsys):
    base = ["--config", TINY] + tiny_overrides(two_image_shards, tmp_path / "r")
    err = _error(capsys, base + ["--optim.lrr=1"])
    assert err.startswith("error:") and "lrr" in err and "Traceback" not in err
    err = _error(capsys, base + [f"--data.shards={tmp_path / 'nowhere'}"])
    assert "nowhere" in err
    err = _error(capsys, base + ["--optim.batch_size=3"])
    assert "optim.batch_size" in err
    err = _error(capsys, base + ["--data.size=[50,56]"])
    assert "data.size" in err
    err = _error(capsys, ["--config", str(tmp_path / "missing.toml")])
    assert "missing.toml" in err
    err = _error(capsys, base + ["--init-from", str(tmp_path / "no.pt")])
    assert "no.pt" in err


def test_existing_checkpoints_need_resume(two_image_shards, tmp_path, capsys):
    overrides = tiny_overrides(two_image_shards, tmp_path / "r", steps=1)
    assert main(["--config", TINY] + overrides) == 0
    err = _error(capsys, ["--config", TINY] + overrides)
    assert "--resume" in err


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "cityscapes", "tiny_cpu"])
def test_shipped_configs_load(name):
    cfg = load_train_config(f"train/configs/{name}.toml")
    assert all(s % 14 == 0 for s in cfg.data.size)


def test_final_checkpoint_records_the_category_table_and_checks_num_classes(two_image_shards, tmp_path) -> None:
    """predict.py reads the categories from final.pt; a head size that disagrees with the shards is an error."""
    from genpan.train.data import shard_categories
    from genpan.train.main import main

    table = shard_categories(sorted(str(p) for p in two_image_shards.glob("*.tar")))
    assert table and all(len(row) == 4 for row in table)
    out = tmp_path / "run"
    args = ["--config", TINY, *tiny_overrides(two_image_shards, out, steps=1)]
    assert main(args) == 0
    final = torch.load(out / FINAL_NAME, weights_only=True)
    assert final["categories"] == table
    assert main([*args, f"--run.out={tmp_path / 'bad'}", "--model.num_classes=5"]) == 2


def test_training_from_a_pipe_url_matches_the_local_folder(tmp_path):
    """webdataset's `pipe:` opener (here `cat`; `aws s3 cp … -` in the same form) feeds training with
    loader workers; the loss curve is the local folder's, step for step."""
    shards = write_synthetic_shards(tmp_path / "shards", num_images=8, per_shard=4, min_size=56, max_size=56)
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) == 2
    curves = []
    for name, spec in [("local", str(shards)), ("pipe", f"pipe:cat {shards}/shard-{{0000..0001}}.tar")]:
        overrides = tiny_overrides(shards, tmp_path / name, steps=3) + [
            f"--data.shards={spec}", "--data.num_workers=2", "--data.resampled=true", "--data.epoch_size=8"]
        Trainer(load_train_config(TINY, overrides)).fit()
        curves.append([r["loss_total"] for r in read_metrics(tmp_path / name / METRICS_NAME)])
    assert len(curves[0]) == 3 and curves[0] == curves[1]
