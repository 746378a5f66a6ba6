"""eval/predict.py's pipeline: post-processing of a batch overlaps the next batch's forward pass, gets
whole batches, gives the files a serial loop gives, and a failure in a worker stops the run and a rerun
completes it to the uninterrupted JSON."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_predict import CATEGORIES

import genpan.eval.predict as predict
from genpan.eval.postprocess import ideal_outputs, postprocess, resize_id_map
from genpan.eval.predict import Backend, InferenceMeta, Settings, folder_source, run_prediction
from genpan.train.model import tiny_cpu_config

SIZE = 56  # input short side: 56 × 84 in, 32 × 48 out


class DiscOracle(Backend):
    """Ideal outputs of a sky with one disc whose place is written in the image's first pixel, so every
    image has its own outputs and they do not depend on the batch it came in."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        h, w = batch.shape[2] * 8 // 14, batch.shape[3] * 8 // 14
        sems, insts = [], []
        for image in batch:
            pan = np.full((h, w), 1000, np.int32)
            cv2.circle(pan, (int(round(image[0, 0, 0] * 255)) % w, int(round(image[1, 0, 0] * 255)) % h), 5, 2000, -1)
            segments = [{"id": 1000, "category_id": 101, "iscrowd": 0}, {"id": 2000, "category_id": 1, "iscrowd": 0}]
            sem, inst = ideal_outputs(pan, segments, {1: 0, 101: 1}, {1}, 2)
            sems.append(sem)
            insts.append(inst)
        return {"sem": np.stack(sems), "inst": np.stack(insts)}


def _folder(root: Path, count: int) -> Path:
    root.mkdir()
    for i in range(count):
        img = np.full((SIZE, 84, 3), 90, np.uint8)
        img[:4, :4] = (10 + 3 * i, 8 + 2 * i, 0)[::-1]  # BGR on disk: R = disc x, G = disc y
        cv2.imwrite(str(root / f"im{i:02d}.png"), img)
    return root


def _meta() -> InferenceMeta:
    return InferenceMeta(tiny_cpu_config(num_classes=2), CATEGORIES, SIZE)


def test_pipeline_equals_a_serial_loop_at_any_batch_size(tmp_path, monkeypatch):
    source = folder_source(_folder(tmp_path / "photos", 7))
    seen: list[tuple[str, tuple[int, ...]]] = []
    batched = predict.postprocess_outputs

    def spy(sem, inst, *args):
        seen.append((threading.current_thread().name, tuple(sem.shape)))
        return batched(sem, inst, *args)

    monkeypatch.setattr(predict, "postprocess_outputs", spy)
    texts = []
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        run = run_prediction(DiscOracle(), _meta(), source, Settings(out, "pred", batch_size=batch, progress=False))
        assert run.predicted == 7
        texts.append(run.json_path.read_text())
    assert texts[0] == texts[1]
    assert all(name != threading.main_thread().name for name, _ in seen)  # never on the main thread
    assert [shape[0] for _, shape in seen] == [1] * 7 + [3, 3, 1]  # whole batches, (B, C, h, w)
    data = json.loads(texts[0])
    oracle = DiscOracle()
    for item, ann in zip(source.items, data["annotations"], strict=True):
        img = predict.read_rgb(item.path)
        out = oracle(predict.to_batch([img]))
        pan, segments = resize_id_map(*postprocess(out["sem"][0], out["inst"][0], [1, 101], {0}), img.shape[:2])
        assert ann["segments_info"] == json.loads(json.dumps(segments))
        from genpan.coco_panoptic import read_panoptic_png

        assert np.array_equal(read_panoptic_png(tmp_path / "b3" / "panoptic_pred" / ann["file_name"]), pan)


def test_postprocessing_overlaps_the_next_forward_pass(tmp_path, monkeypatch):
    """Post-processing of batch k waits for the forward pass of batch k+1 to start: a serial loop would
    wait here for ever (the timeout), the pipeline goes on."""
    source = folder_source(_folder(tmp_path / "photos", 4))
    started = [threading.Event() for _ in range(5)]
    overlapped: list[bool] = []

    class Marking(DiscOracle):
        def __call__(self, batch):
            started[self.calls].set()
            return super().__call__(batch)

    batched = predict.postprocess_outputs
    count = iter(range(1, 5))

    def waiting(sem, inst, *args):
        k = next(count)
        if k < 4:  # the last batch has no successor
            overlapped.append(started[k].wait(timeout=20))
        return batched(sem, inst, *args)

    monkeypatch.setattr(predict, "postprocess_outputs", waiting)
    run_prediction(Marking(), _meta(), source, Settings(tmp_path / "out", "pred", batch_size=1, progress=False))
    assert overlapped == [True, True, True]


def test_a_failing_worker_stops_the_run_and_a_rerun_completes_it(tmp_path, monkeypatch):
    source = folder_source(_folder(tmp_path / "photos", 9))
    whole = run_prediction(DiscOracle(), _meta(), source, Settings(tmp_path / "whole", "pred", batch_size=2, progress=False))
    batched = predict.postprocess_outputs
    calls = iter(range(100))

    def failing(sem, inst, *args):
        if next(calls) == 2:
            raise RuntimeError("post-processing broke")
        return batched(sem, inst, *args)

    monkeypatch.setattr(predict, "postprocess_outputs", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="post-processing broke"):
        run_prediction(DiscOracle(), _meta(), source, Settings(out, "pred", batch_size=2, progress=False))
    assert not (out / "panoptic_pred.json").exists()
    records = list((out / ".state_pred").glob("*.png.json"))
    assert 0 < len(records) < 9
    for record in records:  # a record only beside its PNG
        assert (out / "panoptic_pred" / record.name.removesuffix(".json")).is_file()
    monkeypatch.setattr(predict, "postprocess_outputs", batched)
    again = run_prediction(DiscOracle(), _meta(), source, Settings(out, "pred", batch_size=2, progress=False))
    assert again.resumed == len(records) and again.predicted == 9 - len(records)
    assert again.json_path.read_text() == whole.json_path.read_text()
