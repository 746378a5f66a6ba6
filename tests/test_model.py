"""Panoptic model: output contract (h = 8·H/14), decoder taps, coordinate features, layer-decay groups, training step."""

from __future__ import annotations

import math

import pytest
import torch

from genpan.train.model.decoder import SharedDecoder, coordinate_features
from genpan.train.model.layer_decay import param_groups_layer_decay
from genpan.train.model.panoptic import ModelConfig, build_model, default_layers, tiny_cpu_config


def small_config(**overrides) -> ModelConfig:
    values = dict(arch="custom", embed_dim=24, depth=3, num_heads=2, img_size=56, decoder_width=16, num_classes=5)
    return tiny_cpu_config(**{**values, **overrides})


@pytest.mark.parametrize("H, W", [(56, 56), (42, 98), (112, 70)])
def test_output_shapes(H, W):
    model = build_model(small_config(depth_head=True)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, H, W))
    h, w = 8 * H // 14, 8 * W // 14
    assert set(out) == {"sem", "inst", "depth"}
    assert out["sem"].shape == (2, 5, h, w)
    assert out["inst"].shape == (2, 16, h, w)
    assert out["depth"].shape == (2, 1, h, w)
    assert out["depth"].min() >= 0 and out["depth"].max() <= 1


def test_inst_channels_and_no_depth_head():
    model = build_model(small_config(inst_channels=160, coord_features=False, pos_embed_init="trunc_normal"))
    out = model(torch.rand(1, 3, 28, 42))
    assert set(out) == {"sem", "inst"}
    assert out["inst"].shape == (1, 160, 16, 24)


def test_default_and_explicit_layers():
    assert default_layers(12) == [3, 6, 9, 12]  # paper 5.1, ViT-B
    assert default_layers(24) == [5, 12, 18, 24]  # paper 5.1, ViT-L
    assert default_layers(6) == [2, 3, 5, 6]  # evenly spaced, ending at the last block
    assert default_layers(8) == [2, 4, 6, 8]
    assert ModelConfig(arch="vit_large").tapped_layers == [5, 12, 18, 24]
    model = build_model(small_config(layers=[1, 3]))
    assert model.block_indices == [0, 2]
    assert model.decoder.up[0][0].in_channels == 2 * 24 + 16  # 2 taps + 4L coordinate channels
    with pytest.raises(ValueError, match="model.layers"):
        small_config(layers=[0, 4])


def test_decoder_reads_the_tapped_blocks():
    model = build_model(small_config(layers=[1, 3])).eval()
    x = torch.rand(1, 3, 42, 42)
    seen = {}
    model.decoder.register_forward_hook(lambda mod, args, out: seen.update(z=args[0]))
    with torch.no_grad():
        model(x)
        maps = model.backbone.get_intermediate_layers(model.normalize(x), [0, 2], reshape=True, norm=True)
    torch.testing.assert_close(seen["z"], torch.cat(maps, dim=1))


def test_uint8_and_float_inputs_agree():
    model = build_model(small_config()).eval()
    img = torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        a = model(img)
        b = model(img.float() / 255)
    torch.testing.assert_close(a["sem"], b["sem"])
    # normalisation is (x − ImageNet mean) / std per channel
    normed = model.normalize(img.float() / 255)
    torch.testing.assert_close(normed[0, 1], (img[0, 1].float() / 255 - 0.456) / 0.224)


def test_coordinate_features_match_formula():
    h, w, harmonics = 3, 5, 2
    feats = coordinate_features(h, w, harmonics)
    assert feats.shape == (1, 4 * harmonics, h, w)
    for y in range(h):
        for x in range(w):
            u, v = 2 * (x + 0.5) / w - 1, 2 * (y + 0.5) / h - 1
            want = []
            for p in (u, v):
                for level in range(harmonics):
                    want += [math.sin(2**level * math.pi * p), math.cos(2**level * math.pi * p)]
            torch.testing.assert_close(feats[0, :, y, x], torch.tensor(want), atol=1e-6, rtol=0)


def test_decoder_upsamples_by_eight():
    for kernel in (2, 4):
        dec = SharedDecoder(in_channels=12, width=32, kernel_size=kernel, coord_harmonics=0)
        assert dec(torch.randn(2, 12, 3, 5)).shape == (2, 32, 24, 40)
    with pytest.raises(ValueError, match="kernel_size"):
        SharedDecoder(in_channels=12, kernel_size=3)


def test_layer_decay_groups_match_hand_computation():
    model = build_model(small_config())  # depth 3: layer ids 0 (embeddings), 1..3 (blocks), 4 (rest)
    decay, lr, wd = 0.5, 1e-3, 0.05
    groups = param_groups_layer_decay(model, lr, wd, decay)
    found = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {  # name: (lr scale = 0.5^(4 − layer id), weight decay)
        "backbone.pos_embed": (1 / 16, 0.0),
        "backbone.cls_token": (1 / 16, 0.0),
        "backbone.patch_embed.proj.weight": (1 / 16, wd),
        "backbone.patch_embed.proj.bias": (1 / 16, 0.0),
        "backbone.blocks.0.attn.qkv.weight": (1 / 8, wd),
        "backbone.blocks.0.attn.qkv.bias": (1 / 8, 0.0),
        "backbone.blocks.1.ls1.gamma": (1 / 4, 0.0),
        "backbone.blocks.1.norm2.weight": (1 / 4, 0.0),
        "backbone.blocks.2.mlp.fc1.weight": (1 / 2, wd),
        "backbone.norm.weight": (1.0, 0.0),
        "decoder.up.0.0.weight": (1.0, wd),
        "decoder.up.0.1.weight": (1.0, 0.0),  # GroupNorm
        "heads.sem.proj.weight": (1.0, wd),
        "heads.inst.proj.bias": (1.0, 0.0),
    }
    for name, (scale, weight_decay) in expected.items():
        group = found[id(named[name])]
        assert group["lr"] == pytest.approx(lr * scale), name
        assert group["lr_scale"] == pytest.approx(scale), name
        assert group["weight_decay"] == weight_decay, name
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(id(p) for g in groups for p in g["params"])  # each exactly once
    assert id(model.backbone.mask_token) not in found  # frozen: never used without masking
    torch.optim.AdamW(groups, lr=lr)


def test_forward_backward_and_step_on_cpu():
    torch.manual_seed(0)
    model = build_model(small_config(depth_head=True, drop_path_rate=0.1)).train()
    opt = torch.optim.AdamW(param_groups_layer_decay(model, 1e-3, 0.05, 0.6))
    x = torch.rand(2, 3, 42, 56)
    out = model(x)
    loss = sum(v.float().pow(2).mean() for v in out.values())
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    before = model.heads["sem"].proj.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.heads["sem"].proj.weight)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(small_config())
    ckpt = build_model(small_config(grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 28, 28)
    for model in (plain, ckpt):
        model.train()
        sum(v.sum() for v in model(x).values()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_load_backbone(tmp_path):
    source = build_model(small_config())
    path = tmp_path / "backbone.pth"
    torch.save(source.backbone.state_dict(), path)
    model = build_model(small_config())
    model.load_backbone(path)
    torch.testing.assert_close(model.backbone.pos_embed, source.backbone.pos_embed)
    with pytest.raises(ValueError, match="missing key register_tokens"):
        build_model(small_config(num_register_tokens=4)).load_backbone(path)
    with pytest.raises(FileNotFoundError):
        model.load_backbone(tmp_path / "absent.pth")


@pytest.mark.parametrize(
    "field, value",
    [
        ("arch", "vit_huge"),
        ("pos_embed_init", "zeros"),
        ("img_size", 100),
        ("num_classes", 0),
    ],
)
def test_bad_config_values_name_the_option(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        ModelConfig(**{field: value})
