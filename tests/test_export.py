"""Export: the matrix form of the bicubic pos-embed resize against F.interpolate, and parity of the
`torch.export` program and the ONNX model with the eager model at two image sizes, on a small random ViT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genpan.config import to_dict
from genpan.eval.exported import ExportPredictor, bicubic_matrix
from genpan.eval.postprocess import decode_embeddings
from genpan.train.model import build_model, tiny_cpu_config

# float32 tolerance of the exported outputs vs eager: the same ops up to summation order in the pos-embed
# resize and ONNX Runtime's kernels (measured ≈ 1e-6 on logits of magnitude ≈ 1)
MAX_ABS_DIFF = 1e-4
SIZES = [(112, 112), (70, 154)]  # the native grid (pos_embed as stored) and a resized, non-square one


def small_model(**overrides):
    torch.manual_seed(0)
    cfg = tiny_cpu_config(num_classes=8, embed_dim=64, depth=2, num_heads=2, decoder_width=32, depth_head=True, **overrides)
    return build_model(cfg).eval()


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False)])
@pytest.mark.parametrize("out_size", [2, 5, 8, 11, 17])
def test_bicubic_matrix_matches_interpolate(offset, antialias, out_size):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(out_size))
    if offset:  # plain DINOv2 checkpoints request a scale factor
        ref = F.interpolate(x, scale_factor=((out_size + offset) / 8,) * 2, mode="bicubic", antialias=antialias)
    else:
        ref = F.interpolate(x, size=(out_size, out_size), mode="bicubic", antialias=antialias)
    w = bicubic_matrix(out_size, 8, offset, antialias)
    ours = torch.einsum("im,bcmn,jn->bcij", w, x, w)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("registers", [0, 4])
def test_wrapper_equals_eager(registers):
    model = small_model(num_register_tokens=registers)  # registers: the antialiased resize family
    predictor = ExportPredictor(model)
    for h, w in SIZES:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            eager, ours = model(x), predictor(x)
        for name, got in zip(predictor.output_names, ours):
            assert (eager[name] - got).abs().max().item() < MAX_ABS_DIFF, (name, h, w)


def test_in_graph_decode_equals_decode_embeddings():
    model = small_model()
    grid = 20
    x = torch.rand(2, 3, 70, 84)
    with torch.no_grad():
        eager = model(x)
        sem_id, cell, depth = ExportPredictor(model, decode_grid=grid)(x)
    for b in range(2):
        dec = decode_embeddings(eager["inst"][b], grid)  # the post-processing's own decode
        assert torch.equal(cell[b].reshape(-1), dec.b * grid + dec.a)
        assert torch.equal(sem_id[b], eager["sem"][b].argmax(dim=0))
    assert torch.allclose(depth, eager["depth"][:, 0])


def save_checkpoint(model, path):
    """A checkpoint in the trainer's `final.pt` form: weights + the TrainConfig as JSON (no category table)."""
    config = {"model": to_dict(model.cfg), "data": {"size": [112, 112]}}
    torch.save({"model": model.state_dict(), "config": json.dumps(config), "step": 0}, path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small random model saved as a checkpoint, a 3-image synthetic split, and the model exported once to .pt2
    and ONNX with its metadata (export is the slow part of this file)."""
    from genpan.coco_panoptic import load_panoptic_json
    from genpan.eval.export import export_onnx, export_program, write_artefact_meta
    from genpan.eval.predict import load_checkpoint_for_inference, normalise_categories
    from genpan.prep.synthetic import SceneConfig, generate_split

    pytest.importorskip("onnxscript")
    folder = tmp_path_factory.mktemp("export")
    split_json = generate_split(folder / "data", "val", 3, cfg=SceneConfig(min_size=96, max_size=160), progress=False)
    save_checkpoint(small_model(), folder / "final.pt")
    categories = normalise_categories(load_panoptic_json(split_json)["categories"], "test")
    model, meta = load_checkpoint_for_inference(folder / "final.pt", categories)
    predictor = ExportPredictor(model)
    pt2 = folder / "model.pt2"
    torch.export.save(export_program(predictor), str(pt2))
    onnx_path = export_onnx(predictor, folder / "model.onnx")
    for path in (pt2, onnx_path):
        write_artefact_meta(path, meta, predictor, path.suffix[1:])
    return model, predictor.output_names, pt2, onnx_path, split_json


@pytest.mark.parametrize("size", SIZES)
def test_torch_export_parity(exported, size):
    model, names, pt2, _, _ = exported
    module = torch.export.load(str(pt2)).module()
    x = torch.rand(3, 3, *size)  # a batch size other than the example's
    with torch.no_grad():
        eager, got = model(x), module(x)
    for name, out in zip(names, got):
        assert out.shape == eager[name].shape
        assert (eager[name] - out).abs().max().item() < MAX_ABS_DIFF, name


@pytest.mark.parametrize("size", SIZES)
def test_onnx_parity(exported, size):
    ort = pytest.importorskip("onnxruntime")
    model, names, _, onnx_path, _ = exported
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        eager = model(x)
    outputs = session.run(names, {"images": x.numpy()})
    for name, out in zip(names, outputs):
        assert out.shape == tuple(eager[name].shape)
        assert np.abs(eager[name].numpy() - out).max() < MAX_ABS_DIFF, name


def test_predict_backends_write_the_same_scorable_output(exported, tmp_path):
    """predict.py end to end with each backend: identical COCO panoptic output that eval/pq.py accepts."""
    from genpan.eval.pq import pq_compute
    from genpan.eval.predict import main as predict

    _, _, pt2, onnx_path, split_json = exported
    checkpoint = pt2.parent / "final.pt"
    runs = {
        "torch": ["--checkpoint", str(checkpoint)],
        "export": ["--backend", "export", "--artefact", str(pt2)],
        "onnx": ["--backend", "onnx", "--artefact", str(onnx_path)],
    }
    written = {}
    for backend, args in runs.items():
        out = tmp_path / backend
        assert predict([*args, "--coco-json", str(split_json), "--out", str(out), "--batch-size", "2", "--no-progress"]) == 0
        pred_json = out / "panoptic_val.json"
        result = pq_compute(split_json, None, pred_json, None, progress=False)  # raises on any malformed output
        assert result.summary()["All"]["n"] > 0
        written[backend] = json.loads(pred_json.read_text())["annotations"]
        assert sorted(p.name for p in (out / "depth_val").iterdir()) == sorted(a["file_name"] for a in written[backend])
    assert written["export"] == written["torch"]
    assert written["onnx"] == written["torch"]


def test_export_cli_errors(tmp_path, capsys):
    from genpan.eval.export import main

    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "config": json.dumps({"model": {"arch": "nope"}})}, bad)
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "m")]) == 2
    assert "model.arch" in capsys.readouterr().err
