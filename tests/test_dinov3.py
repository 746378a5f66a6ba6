"""DINOv3 ViT: parity with transformers' DINOv3ViTModel, official and Hugging Face loading, sizes, RoPE options,
the panoptic model on a DINOv3 backbone, export, and a few training steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genpan.train.model import build_model, tiny_cpu_config
from genpan.train.model.dinov3 import (
    ARCHS,
    PUBLISHED_PARAMS_M,
    DinoV3VisionTransformer,
    RopePositionEmbedding,
    dinov3_arch,
    hf_to_official,
    load_dinov3_checkpoint,
    load_dinov3_hf,
)
from genpan.train.model.panoptic import ModelConfig

transformers = pytest.importorskip("transformers")

DIM, DEPTH, HEADS = 32, 3, 2  # head width 16: RoPE needs a multiple of 4
SIZES = [(64, 64), (48, 80)]  # square and non-square patch grids (4×4, 3×5)


def hf_model(gated: bool = False, registers: int = 4):
    """A random transformers DINOv3ViTModel of tiny size, eval mode (no RoPE coordinate augmentation)."""
    config = transformers.DINOv3ViTConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=128 if gated else 4 * DIM,  # gated: 2/3 of 6·32 = 128
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        num_register_tokens=registers,
        patch_size=16,
        image_size=64,
    )
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(config).eval()
    with torch.no_grad():  # LayerScale and biases away from their init, so a swapped key would show
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def our_model(gated: bool = False, registers: int = 4) -> DinoV3VisionTransformer:
    ffn = dict(ffn_ratio=6, ffn_layer="swiglu") if gated else dict(ffn_ratio=4)
    return DinoV3VisionTransformer(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, n_storage_tokens=registers, **ffn).eval()


def official_file(tmp_path, hf, gated: bool = False):
    """The HF weights renamed to the official layout (plus the RoPE periods official files carry), saved as .pth."""
    state = hf_to_official(hf.state_dict(), gated)
    state["rope_embed.periods"] = 100.0 ** (torch.arange(4) / 4)  # base^(4k/d), d = 16
    path = tmp_path / "dinov3_tiny_pretrain.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("gated", [False, True])
def test_parity_with_transformers(tmp_path, gated):
    hf = hf_model(gated)
    path, state = official_file(tmp_path, hf, gated)
    vit = our_model(gated)
    load_dinov3_checkpoint(vit, path)
    assert set(vit.state_dict()) == set(state)
    assert "blocks.0.attn.qkv.bias_mask" in state and "storage_tokens" in state
    for H, W in SIZES:
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            ref = hf(pixel_values=x, output_hidden_states=True)
            ours = vit.forward_features(x)
            maps = vit.get_intermediate_layers(x, n=[0, 1, 2], reshape=True, norm=True)
        tokens = ref.last_hidden_state
        torch.testing.assert_close(ours["x_norm_clstoken"], tokens[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours["x_norm_regtokens"], tokens[:, 1:5], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours["x_norm_patchtokens"], tokens[:, 5:], atol=1e-5, rtol=1e-5)
        for i, got in enumerate(maps):  # hidden_states[0] is the embedding, [i + 1] block i's output
            want = hf.norm(ref.hidden_states[i + 1])[:, 5:].reshape(2, H // 16, W // 16, DIM).permute(0, 3, 1, 2)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_loads_a_hugging_face_directory(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    vit = our_model()
    load_dinov3_hf(vit, tmp_path / "hf")
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-5)


def test_hugging_face_config_mismatch_is_named(tmp_path):
    hf_model(registers=0).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="config num_register_tokens: 0 in config.json vs 4 in the model"):
        load_dinov3_hf(our_model(), tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dinov3_hf(our_model(), tmp_path)


def test_loading_errors_name_every_key(tmp_path):
    _, state = official_file(tmp_path, hf_model())
    del state["blocks.1.ls2.gamma"]
    state["local_cls_norm.weight"] = torch.ones(DIM)
    state["storage_tokens"] = torch.zeros(1, 5, DIM)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    vit = our_model()
    before = vit.cls_token.detach().clone()
    with pytest.raises(ValueError) as err:
        load_dinov3_checkpoint(vit, path)
    msg = str(err.value)
    assert "missing key blocks.1.ls2.gamma" in msg
    assert "unexpected key local_cls_norm.weight" in msg
    assert f"shape mismatch storage_tokens: checkpoint (1, 5, {DIM}) vs model (1, 4, {DIM})" in msg
    assert str(path) in msg
    assert torch.equal(vit.cls_token, before)  # nothing copied on failure
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_dinov3_checkpoint(vit, tmp_path / "nowhere.pth")


def test_official_key_layout_of_the_released_sizes():
    with torch.device("meta"):
        vitl, vith, vit7b = dinov3_arch("vitl16"), dinov3_arch("vith16plus"), dinov3_arch("vit7b16")
    keys = vitl.state_dict()
    for key in ("cls_token", "storage_tokens", "mask_token", "rope_embed.periods", "patch_embed.proj.weight",
                "blocks.23.attn.qkv.bias_mask", "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight", "norm.bias"):
        assert key in keys, key
    assert tuple(keys["mask_token"].shape) == (1, 1024) and tuple(keys["rope_embed.periods"].shape) == (16,)
    assert tuple(vith.state_dict()["blocks.0.mlp.w1.weight"].shape) == (5120, 1280)
    assert "blocks.0.attn.qkv.bias" not in vit7b.state_dict() and "local_cls_norm.weight" in vit7b.state_dict()


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_parameter_counts_match_the_published_figures(name):
    with torch.device("meta"):  # no memory, no init: fast even for 7B
        vit = dinov3_arch(name)
    count = sum(p.numel() for p in vit.parameters())
    published = PUBLISHED_PARAMS_M[name] * 1e6
    # the figures are rounded to 2-3 digits (S: 21.6M published as 21M, L: 303M as 300M); 7B's 6,716M is exact
    assert abs(count - published) / published < 0.035, (name, count)


def test_rope_matches_formula_and_options():
    rope = RopePositionEmbedding(32, 2, base=100.0).eval()  # head width 16, 4 periods
    sin, cos = rope(2, 3)
    coords = np.array([[(2 * (r + 0.5) / 2 - 1), (2 * (c + 0.5) / 3 - 1)] for r in range(2) for c in range(3)])
    periods = 100.0 ** (np.arange(4) / 4)
    angles = 2 * np.pi * coords[:, :, None] / periods  # 6 2 4
    angles = np.tile(angles.reshape(6, 8), 2)
    np.testing.assert_allclose(sin.numpy(), np.sin(angles), atol=1e-6)
    np.testing.assert_allclose(cos.numpy(), np.cos(angles), atol=1e-6)
    # "max": both axes divided by the longer side, so a 2×4 grid's rows span only half of [-1, 1]
    rows = RopePositionEmbedding(32, 2, normalize_coords="max").coordinates(2, 4, torch.device("cpu"))[:, 0]
    torch.testing.assert_close(rows.unique(), torch.tensor([-0.75, -0.25]))
    periods = RopePositionEmbedding(32, 2, base=None, min_period=0.5, max_period=8.0).periods
    torch.testing.assert_close(periods, 0.5 * 16.0 ** torch.linspace(0, 1, 4))  # geometric, 0.5 → 8
    # coordinate augmentation only in training mode
    aug = RopePositionEmbedding(32, 2, shift_coords=0.5, jitter_coords=1.5, rescale_coords=2.0)
    aug.eval()
    torch.testing.assert_close(aug(3, 3)[0], rope(3, 3)[0])
    aug.train()
    assert not torch.allclose(aug(3, 3)[0], rope(3, 3)[0])


def tiny_dinov3_config(**overrides) -> ModelConfig:
    values = dict(backbone="dinov3_custom", embed_dim=32, depth=3, num_heads=2, decoder_width=16, num_classes=5,
                  pos_embed_init="trunc_normal", depth_head=True)
    return tiny_cpu_config(**{**values, **overrides})


def test_config_resolves_the_backbone_defaults():
    cfg = ModelConfig(backbone="dinov3_vitl16")
    assert (cfg.patch_size, cfg.num_register_tokens, cfg.img_size) == (16, 4, 224)
    assert cfg.tapped_layers == [5, 12, 18, 24]
    assert ModelConfig(backbone="dinov3_vitb16").tapped_layers == [3, 6, 9, 12]
    assert ModelConfig(backbone="dinov3_vith16plus").tapped_layers == [8, 16, 24, 32]
    v2 = ModelConfig(arch="vit_large")
    assert (v2.patch_size, v2.num_register_tokens, v2.img_size) == (14, 0, 518)
    with pytest.raises(ValueError, match="model.backbone"):
        ModelConfig(backbone="dinov3_vitq16")
    with pytest.raises(ValueError, match="dinov3_custom"):
        ModelConfig(backbone="dinov3_custom")
    with pytest.raises(ValueError, match="pos_embed_init"):
        ModelConfig(backbone="dinov3_vits16", pos_embed_init="sincos")


def test_train_config_wants_sizes_in_patches():
    from genpan.train.config import load_train_config

    with pytest.raises(ValueError, match="multiples of the backbone's patch 16"):
        load_train_config("train/configs/dinov3_tiny_cpu.toml", ["--data.size=[112,120]"])
    load_train_config("train/configs/dinov3_tiny_cpu.toml", ["--data.size=[112,128]"])


@pytest.mark.parametrize("H, W", [(64, 64), (48, 96)])
def test_panoptic_model_on_dinov3(H, W):
    model = build_model(tiny_dinov3_config())
    out = model(torch.rand(2, 3, H, W))
    assert out["sem"].shape == (2, 5, H // 2, W // 2)  # 8·H/16
    assert out["inst"].shape == (2, 16, H // 2, W // 2)
    assert out["depth"].shape == (2, 1, H // 2, W // 2)
    (out["sem"].mean() + out["inst"].pow(2).mean() + out["depth"].mean()).backward()
    backbone = model.backbone
    assert backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert backbone.storage_tokens.grad.abs().sum() > 0
    assert backbone.mask_token.grad is None


def test_panoptic_load_backbone_dispatches(tmp_path):
    hf = hf_model()
    path, _ = official_file(tmp_path, hf)
    hf.save_pretrained(tmp_path / "hf")
    cfg = tiny_dinov3_config(embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    for source in (path, tmp_path / "hf"):
        model = build_model(cfg)
        model.load_backbone(source)
        torch.testing.assert_close(model.backbone.cls_token, hf.embeddings.cls_token)


def test_layer_decay_puts_storage_tokens_with_the_embeddings():
    from genpan.train.model.layer_decay import param_groups_layer_decay

    model = build_model(tiny_dinov3_config())
    groups = param_groups_layer_decay(model, 1e-3, 0.05, 0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    group = by_param[id(model.backbone.storage_tokens)]
    assert group["name"] == "layer0_no_decay"


# float32 tolerance as for DINOv2 (tests/test_export.py)
MAX_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def exported_dinov3(tmp_path_factory):
    from genpan.eval.export import export_onnx, export_program
    from genpan.eval.exported import ExportPredictor

    torch.manual_seed(0)
    model = build_model(tiny_dinov3_config(embed_dim=64, depth=2, num_heads=2, img_size=112)).eval()
    predictor = ExportPredictor(model)
    folder = tmp_path_factory.mktemp("export3")
    pt2 = folder / "model.pt2"
    torch.export.save(export_program(predictor), str(pt2))
    onnx_path = None
    try:
        import onnxscript  # noqa: F401

        onnx_path = export_onnx(predictor, folder / "model.onnx")
    except ImportError:
        pass
    return model, predictor.output_names, pt2, onnx_path


EXPORT_SIZES = [(112, 112), (64, 176)]  # square and non-square, neither the example's size


@pytest.mark.parametrize("size", EXPORT_SIZES)
def test_torch_export_parity(exported_dinov3, size):
    model, names, pt2, _ = exported_dinov3
    module = torch.export.load(str(pt2)).module()
    x = torch.rand(3, 3, *size)
    with torch.no_grad():
        eager, got = model(x), module(x)
    for name, out in zip(names, got):
        assert out.shape == eager[name].shape == (3, eager[name].shape[1], size[0] // 2, size[1] // 2)
        assert (eager[name] - out).abs().max().item() < MAX_ABS_DIFF, name


@pytest.mark.parametrize("size", EXPORT_SIZES)
def test_onnx_parity(exported_dinov3, size):
    ort = pytest.importorskip("onnxruntime")
    model, names, _, onnx_path = exported_dinov3
    if onnx_path is None:
        pytest.skip("onnxscript not installed")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        eager = model(x)
    for name, out in zip(names, session.run(names, {"images": x.numpy()})):
        assert out.shape == tuple(eager[name].shape)
        assert np.abs(eager[name].numpy() - out).max() < MAX_ABS_DIFF, name


def test_fit_size_uses_the_patch():
    from genpan.eval.predict import fit_size

    assert fit_size(480, 640, 112, 16) == (112, 144)  # 149.3 → 144, the nearest multiple of 16
    assert fit_size(480, 640, 112) == (112, 154)  # DINOv2 default unchanged


def test_tiny_dinov3_trains_a_few_steps(tmp_path):
    from test_data import write_synthetic_shards

    from genpan.train.config import load_train_config
    from genpan.train.trainer import METRICS_NAME, Trainer, read_metrics

    shards = write_synthetic_shards(tmp_path / "shards", num_images=2, per_shard=2, min_size=64, max_size=64)
    overrides = [
        f"--data.shards={shards}", f"--run.out={tmp_path / 'run'}", "--data.num_workers=0", "--data.micro_batch=2",
        "--optim.batch_size=2", "--data.size=[64,64]", "--data.resampled=false", "--data.shuffle_buffer=1",
        "--data.shuffle_initial=1", "--model.embed_dim=32", "--model.depth=2", "--model.num_heads=2",
        "--model.decoder_width=16", "--run.progress=false", "--run.threads=1", "--run.log_every=1",
        "--schedule.max_steps=3", "--schedule.warmup_steps=0", "--run.ckpt_every=0",
    ]
    trainer = Trainer(load_train_config("train/configs/dinov3_tiny_cpu.toml", overrides))
    trainer.fit()
    metrics = read_metrics(tmp_path / "run" / METRICS_NAME)
    assert len(metrics) == 3 and all(np.isfinite(r["loss_total"]) for r in metrics)


@pytest.mark.parametrize("name", ["dinov3_stage1", "dinov3_stage2", "dinov3_stage3", "dinov3_cityscapes"])
def test_recipe_configs_load(name):
    from genpan.train.config import load_train_config

    cfg = load_train_config(f"train/configs/{name}.toml")
    assert cfg.model.backbone == "dinov3_vitl16" and cfg.model.patch_size == 16
    assert cfg.model.tapped_layers == [5, 12, 18, 24]
    assert all(s % 16 == 0 for s in cfg.data.size)
