"""DINOv2 ViT: official key layout, strict loading, pos-embed interpolation, intermediate layers, block numerics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genpan.train.model.layers import Attention, Block, SwiGLUFFN, swiglu_hidden_dim
from genpan.train.model.pretrained import load_dinov2_checkpoint
from genpan.train.model.vit import (
    DinoVisionTransformer,
    interpolate_patch_pos_embed,
    sincos_pos_embed_2d,
    vit_base,
    vit_custom,
    vit_giant2,
    vit_large,
    vit_small,
)

DIM, DEPTH, HEADS, PATCH, IMG = 32, 3, 2, 14, 70  # native grid 5×5


def official_state_dict(dim: int, depth: int, patch: int, img: int, registers: int, swiglu_hidden: int = 0):
    """Random tensors under the key names and shapes of a released DINOv2 checkpoint, written out by hand."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    grid = img // patch
    sd = {
        "cls_token": rnd(1, 1, dim),
        "pos_embed": rnd(1, 1 + grid * grid, dim),
        "mask_token": rnd(1, dim),
        "patch_embed.proj.weight": rnd(dim, 3, patch, patch),
        "patch_embed.proj.bias": rnd(dim),
        "norm.weight": 1 + rnd(dim),
        "norm.bias": rnd(dim),
    }
    if registers:
        sd["register_tokens"] = rnd(1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": 1 + rnd(dim),
                b + "norm1.bias": rnd(dim),
                b + "attn.qkv.weight": rnd(3 * dim, dim),
                b + "attn.qkv.bias": rnd(3 * dim),
                b + "attn.proj.weight": rnd(dim, dim),
                b + "attn.proj.bias": rnd(dim),
                b + "ls1.gamma": 1 + rnd(dim),
                b + "norm2.weight": 1 + rnd(dim),
                b + "norm2.bias": rnd(dim),
                b + "ls2.gamma": 1 + rnd(dim),
            }
        )
        if swiglu_hidden:
            sd.update(
                {
                    b + "mlp.w12.weight": rnd(2 * swiglu_hidden, dim),
                    b + "mlp.w12.bias": rnd(2 * swiglu_hidden),
                    b + "mlp.w3.weight": rnd(dim, swiglu_hidden),
                    b + "mlp.w3.bias": rnd(dim),
                }
            )
        else:
            sd.update(
                {
                    b + "mlp.fc1.weight": rnd(4 * dim, dim),
                    b + "mlp.fc1.bias": rnd(4 * dim),
                    b + "mlp.fc2.weight": rnd(dim, 4 * dim),
                    b + "mlp.fc2.bias": rnd(dim),
                }
            )
    return sd


def tiny_vit(registers: int = 0, **kwargs) -> DinoVisionTransformer:
    return vit_custom(DIM, DEPTH, HEADS, patch_size=PATCH, img_size=IMG, num_register_tokens=registers, **kwargs)


@pytest.mark.parametrize("registers", [0, 4])
def test_loads_official_key_layout(tmp_path, registers):
    sd = official_state_dict(DIM, DEPTH, PATCH, IMG, registers)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(sd, path)
    vit = tiny_vit(registers)
    load_dinov2_checkpoint(vit, path)
    own = vit.state_dict()
    assert set(own) == set(sd)
    for key, value in sd.items():
        assert torch.equal(own[key], value), key
    out = vit.forward_features(torch.randn(2, 3, IMG, IMG))
    assert out["x_norm_regtokens"].shape == (2, registers, DIM)
    assert out["x_norm_patchtokens"].shape == (2, 25, DIM)


def test_strict_check_names_every_mismatch(tmp_path):
    sd = official_state_dict(DIM, DEPTH, PATCH, IMG, registers=0)
    del sd["blocks.1.ls2.gamma"]
    sd["head.weight"] = torch.zeros(3)
    sd["pos_embed"] = torch.zeros(1, 1 + 37 * 37, DIM)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    vit = tiny_vit()
    before = vit.pos_embed.detach().clone()
    with pytest.raises(ValueError) as err:
        load_dinov2_checkpoint(vit, path)
    msg = str(err.value)
    assert "missing key blocks.1.ls2.gamma" in msg
    assert "unexpected key head.weight" in msg
    assert f"shape mismatch pos_embed: checkpoint (1, 1370, {DIM}) vs model (1, 26, {DIM})" in msg
    assert str(path) in msg
    assert torch.equal(vit.pos_embed, before)  # nothing copied on failure


def test_registers_in_checkpoint_but_not_in_model_are_named(tmp_path):
    path = tmp_path / "reg.pth"
    torch.save(official_state_dict(DIM, DEPTH, PATCH, IMG, registers=4), path)
    with pytest.raises(ValueError, match="unexpected key register_tokens"):
        load_dinov2_checkpoint(tiny_vit(registers=0), path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_dinov2_checkpoint(tiny_vit(), tmp_path / "nowhere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pth"):
        load_dinov2_checkpoint(tiny_vit(), junk)


def keys_cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_loop(grid: np.ndarray, out_hw: tuple[int, int], inv_scale: tuple[float, float]) -> np.ndarray:
    """Slow bicubic resampling (Keys a = −0.75, half-pixel centres, edge clamp) of grid (M, M, D)."""
    m = grid.shape[0]
    out = np.zeros((*out_hw, grid.shape[2]))
    for oy in range(out_hw[0]):
        sy = (oy + 0.5) * inv_scale[0] - 0.5
        for ox in range(out_hw[1]):
            sx = (ox + 0.5) * inv_scale[1] - 0.5
            y0, x0 = math.floor(sy), math.floor(sx)
            for dy in range(-1, 3):
                for dx in range(-1, 3):
                    w = keys_cubic(sy - (y0 + dy)) * keys_cubic(sx - (x0 + dx))
                    out[oy, ox] += w * grid[min(max(y0 + dy, 0), m - 1), min(max(x0 + dx, 0), m - 1)]
    return out


@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_pos_embed_interpolation_matches_slow_bicubic(offset):
    m, dim, out_hw = 5, 3, (7, 9)
    patch_pos = torch.randn(1, m * m, dim, dtype=torch.float64)
    got = interpolate_patch_pos_embed(patch_pos, out_hw, antialias=False, offset=offset)
    # offset mode: the scale (n + 0.1)/M defines the sampling positions; size mode: n/M
    inv = tuple(m / (n + offset) for n in out_hw)
    want = bicubic_loop(patch_pos[0].reshape(m, m, dim).numpy(), out_hw, inv)
    np.testing.assert_allclose(got[0].reshape(*out_hw, dim).numpy(), want, atol=1e-5)


def test_native_grid_is_identity():
    vit = tiny_vit(registers=4)  # antialias + size mode
    patch_pos = vit.pos_embed[:, 1:].detach()
    same = interpolate_patch_pos_embed(patch_pos, (5, 5), antialias=True, offset=0.0)
    torch.testing.assert_close(same, patch_pos, atol=1e-6, rtol=0)
    # at the native size the forward pass adds the stored table itself
    x = torch.randn(1, 3, IMG, IMG)
    tokens = vit.prepare_tokens_with_masks(x)
    patches = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    torch.testing.assert_close(tokens[:, 5:], patches)
    torch.testing.assert_close(tokens[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[:, 0])
    torch.testing.assert_close(tokens[:, 1:5], vit.register_tokens)  # registers carry no position


@pytest.mark.parametrize("registers", [0, 4])
def test_non_square_input(registers):
    vit = tiny_vit(registers).eval()
    x = torch.randn(2, 3, 42, 98)  # 3 × 7 patches
    feats = vit.forward_features(x)
    assert feats["x_norm_patchtokens"].shape == (2, 21, DIM)
    maps = vit.get_intermediate_layers(x, 2, reshape=True)
    assert [tuple(m.shape) for m in maps] == [(2, DIM, 3, 7)] * 2
    # a constant table stays constant under every resampling mode, down- and up-scaling
    const = torch.full((1, 25, 4), 0.7)
    for hw in [(3, 7), (2, 2), (9, 4)]:
        out = interpolate_patch_pos_embed(const, hw, vit.interpolate_antialias, vit.interpolate_offset)
        torch.testing.assert_close(out, torch.full((1, hw[0] * hw[1], 4), 0.7))


def test_input_not_multiple_of_patch_is_refused():
    with pytest.raises(AssertionError, match="not a multiple of the patch size 14"):
        tiny_vit()(torch.randn(1, 3, 70, 71))


def test_get_intermediate_layers_shapes_and_norm():
    vit = tiny_vit(registers=4).eval()
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        last2 = vit.get_intermediate_layers(x, 2, reshape=False, norm=False)
        listed = vit.get_intermediate_layers(x, [0, 2], reshape=True, norm=True, return_class_token=True)
        feats = vit.forward_features(x)
        maps = vit.intermediate_layers(x, [2, 0])
    assert [tuple(t.shape) for t in last2] == [(2, 24, DIM)] * 2
    assert [tuple(t[0].shape) for t in listed] == [(2, DIM, 4, 6)] * 2
    assert tuple(listed[0][1].shape) == (2, DIM)
    # norm=True is the final LayerNorm, written out by hand, of the raw tokens
    raw = last2[1]
    mean, var = raw.mean(-1, keepdim=True), raw.var(-1, unbiased=False, keepdim=True)
    by_hand = (raw - mean) / torch.sqrt(var + 1e-6) * vit.norm.weight + vit.norm.bias
    normed_last = listed[1][0].flatten(2).transpose(1, 2)
    torch.testing.assert_close(normed_last, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normed_last, feats["x_norm_patchtokens"])
    torch.testing.assert_close(maps[0], listed[1][0])  # order as asked
    torch.testing.assert_close(maps[1], listed[0][0])
    with pytest.raises(ValueError, match="block index 3 out of range"):
        vit.intermediate_layers(x, [3])


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=24, num_heads=3)
    x = torch.randn(2, 7, 24)
    W, b = attn.qkv.weight, attn.qkv.bias
    out = torch.zeros(2, 7, 24)
    for h in range(3):  # head h owns rows h·8..h·8+7 of each of the q, k, v blocks of qkv
        rows = slice(h * 8, (h + 1) * 8)
        q = x @ W[0:24][rows].T + b[0:24][rows]
        k = x @ W[24:48][rows].T + b[24:48][rows]
        v = x @ W[48:72][rows].T + b[48:72][rows]
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)
        out[:, :, rows] = weights @ v
    want = out @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_swiglu_block_matches_formula():
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, ffn_layer="swiglufused", layerscale_init=0.5)
    with torch.no_grad():
        block.ls2.gamma.uniform_(0.2, 2.0)
    x = torch.randn(3, 5, 16)
    hidden = block.mlp.w3.in_features
    y = x + block.ls1.gamma * block.attn(F.layer_norm(x, (16,), block.norm1.weight, block.norm1.bias, 1e-6))
    z = F.layer_norm(y, (16,), block.norm2.weight, block.norm2.bias, 1e-6)
    w12, b12 = block.mlp.w12.weight, block.mlp.w12.bias
    gate = z @ w12[:hidden].T + b12[:hidden]
    value = z @ w12[hidden:].T + b12[hidden:]
    ffn = (gate * torch.sigmoid(gate) * value) @ block.mlp.w3.weight.T + block.mlp.w3.bias
    torch.testing.assert_close(block(x), y + block.ls2.gamma * ffn, atol=1e-5, rtol=1e-5)


def test_giant_like_swiglu_keys(tmp_path):
    hidden = (int(4 * 48 * 2 / 3) + 7) // 8 * 8  # DINOv2 SwiGLUFFNFused width: 2/3 of 4·dim, multiple of 8
    assert swiglu_hidden_dim(4 * 48) == hidden == 128
    vit = vit_custom(48, 2, 3, patch_size=PATCH, img_size=IMG, ffn_layer="swiglufused", num_register_tokens=4)
    assert isinstance(vit.blocks[0].mlp, SwiGLUFFN)
    sd = vit.state_dict()
    assert tuple(sd["blocks.1.mlp.w12.weight"].shape) == (2 * hidden, 48)
    assert tuple(sd["blocks.1.mlp.w3.weight"].shape) == (48, hidden)
    assert not any(".fc1." in k or ".fc2." in k for k in sd)
    path = tmp_path / "giant_like.pth"
    torch.save(official_state_dict(48, 2, PATCH, IMG, registers=4, swiglu_hidden=hidden), path)
    load_dinov2_checkpoint(vit, path)


def test_sincos_pos_embed_formula():
    dim, grid = 16, 4
    table = sincos_pos_embed_2d(dim, grid).numpy()
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        for k in range(dim // 4):
            omega = 10000 ** (-k / (dim // 4))
            assert table[index, k] == pytest.approx(math.sin(row * omega), abs=1e-6)
            assert table[index, dim // 4 + k] == pytest.approx(math.cos(row * omega), abs=1e-6)
            assert table[index, dim // 2 + k] == pytest.approx(math.sin(col * omega), abs=1e-6)
            assert table[index, 3 * dim // 4 + k] == pytest.approx(math.cos(col * omega), abs=1e-6)
    vit = tiny_vit(pos_embed_init="sincos")
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_pos_embed_2d(DIM, 5))
    assert torch.all(vit.pos_embed[0, 0] == 0)
    with pytest.raises(ValueError, match="pos_embed_init"):
        tiny_vit(pos_embed_init="learned")


def dinov2_param_count(dim: int, depth: int, registers: int, swiglu: bool, patch: int = 14, grid: int = 37) -> int:
    """Parameter count of a DINOv2 ViT by formula: embeddings + depth × block + final norm."""
    embed = 3 * patch * patch * dim + dim + dim + (1 + grid * grid) * dim + registers * dim + dim
    if swiglu:
        h = swiglu_hidden_dim(4 * dim)
        ffn = dim * 2 * h + 2 * h + h * dim + dim
    else:
        ffn = 2 * (dim * 4 * dim) + 4 * dim + dim
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + ffn
    return embed + depth * block + 2 * dim


@pytest.mark.parametrize(
    "factory, dim, depth, swiglu, approx",
    [
        (vit_small, 384, 12, False, 21e6),
        (vit_base, 768, 12, False, 86e6),
        (vit_large, 1024, 24, False, 300e6),
        (vit_giant2, 1536, 40, True, 1.1e9),
    ],
)
@pytest.mark.parametrize("registers", [0, 4])
def test_factory_parameter_counts(factory, dim, depth, swiglu, approx, registers):
    with torch.device("meta"):  # no memory for the 1.1B weights
        vit = factory(num_register_tokens=registers)
    count = sum(p.numel() for p in vit.parameters())
    assert count == dinov2_param_count(dim, depth, registers, swiglu)
    assert abs(count - approx) / approx < 0.06  # DINOv2 paper: 21M, 86M, 300M, 1.1B
    assert tuple(vit.pos_embed.shape) == (1, 1 + 37 * 37, dim)
    assert vit.interpolate_antialias == bool(registers)
    assert vit.interpolate_offset == (0.0 if registers else 0.1)
