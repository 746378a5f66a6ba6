"""Bad-input corpus: every case × every component that reads it → handled, quarantined with a message, or an error.

The corpus is written at run time (COCO layout, a NYUv2 .mat, an image folder; `python tests/test_bad_inputs.py DIR`
writes it to DIR, e.g. tests/data/bad, and prints the table). `test_outcome_table` runs the readers, build_shards
(whole job, on the whole corpus) and eval/pq.py (one GT JSON per case) and checks each outcome against EXPECTED; the
table it writes is in docs/reliability.md. Cells with a known bug are checked by the xfail tests at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path[0:0] = [str(REPO), str(REPO / "tests")]

from genpan.coco_panoptic import read_panoptic_png, write_panoptic_png  # noqa: E402
from genpan.eval.pq import pq_compute  # noqa: E402
from genpan.prep.manifest import MANIFEST_NAME, read_manifest  # noqa: E402
from genpan.prep.readers import Sample, SampleError, make_reader  # noqa: E402
from genpan.prep.synthetic import SceneConfig, generate_split  # noqa: E402

COMPONENTS = ("coco reader", "folder reader", "nyu_mat reader", "build_shards manifest", "eval/pq.py")
NON_UTF8 = b"caf\xe9"  # Latin-1 bytes: not decodable as UTF-8; Python sees the surrogate "\udce9"
JSON_NAME = "annotations/panoptic_train.json"

# case → component → (outcome, a fragment its message must hold); components not listed do not read that input.
EXPECTED: dict[str, dict[str, tuple[str, str]]] = {
    "truncated JPEG": {"coco reader": ("quarantined", "truncated JPEG"), "folder reader": ("quarantined", "truncated JPEG"),
                       "build_shards manifest": ("quarantined", "truncated JPEG")},
    "PNG of the wrong size": {"coco reader": ("quarantined", "but the image is"), "build_shards manifest": ("quarantined", "but the image is"),
                              "eval/pq.py": ("error", "differs from ground truth size")},
    "PNG id not in the JSON": {"coco reader": ("quarantined", "not in the JSON"), "build_shards manifest": ("quarantined", "not in the JSON"),
                               "eval/pq.py": ("error", "not in the JSON")},
    "JSON id not in the PNG": {"coco reader": ("quarantined", "not in the PNG"), "build_shards manifest": ("quarantined", "not in the PNG"),
                               "eval/pq.py": ("error", "not in the PNG")},
    "unknown category id": {"coco reader": ("quarantined", "unknown category id 999"),
                            "build_shards manifest": ("quarantined", "unknown category id 999"), "eval/pq.py": ("error", "unknown category_id 999")},
    "duplicate image id": {"coco reader": ("quarantined", "duplicate image id"), "build_shards manifest": ("quarantined", "duplicate image id"),
                           "eval/pq.py": ("error", "more than one annotation")},
    "empty segments (all void)": {"coco reader": ("handled", ""), "build_shards manifest": ("handled", ""), "eval/pq.py": ("handled", "")},
    "zero-area segment": {"coco reader": ("quarantined", "not in the PNG"), "build_shards manifest": ("quarantined", "not in the PNG"),
                          "eval/pq.py": ("error", "not in the PNG")},
    "whole-image segment": {"coco reader": ("handled", ""), "build_shards manifest": ("handled", ""), "eval/pq.py": ("handled", "")},
    "grayscale JPEG": {"coco reader": ("handled", ""), "folder reader": ("handled", ""), "build_shards manifest": ("handled", "")},
    "CMYK JPEG": {"coco reader": ("handled", ""), "folder reader": ("handled", ""), "build_shards manifest": ("handled", "")},
    "16-bit PNG label": {"coco reader": ("quarantined", "8-bit RGB"), "build_shards manifest": ("quarantined", "8-bit RGB"),
                         "eval/pq.py": ("error", "8-bit RGB")},
    "non-UTF-8 file name": {"coco reader": ("handled", ""), "folder reader": ("handled", ""), "build_shards manifest": ("handled", ""),
                            "eval/pq.py": ("handled", "")},
    "NaN depth": {"nyu_mat reader": ("handled", ""), "build_shards manifest": ("handled", "")},
    "inf depth": {"nyu_mat reader": ("handled", ""), "build_shards manifest": ("handled", "")},
    "negative depth": {"nyu_mat reader": ("handled", ""), "build_shards manifest": ("handled", "")},
}
# Cells with a known, unfixed bug (none at present); the test of each says what it guards.
KNOWN_BUGS: set[tuple[str, str]] = set()
COCO_CASES = [c for c, row in EXPECTED.items() if "coco reader" in row]
DEPTH_CASES = ("NaN depth", "inf depth", "negative depth")


# -- the corpus ----------------------------------------------------------------------------------------------
def _jpeg(array: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", array)[1].tobytes()


def _cmyk_jpeg(h: int, w: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("CMYK", (w, h), (10, 200, 30, 5)).save(buf, "JPEG")
    return buf.getvalue()


def write_coco_corpus(root: Path, with_non_utf8: bool = True) -> dict[str, list[str]]:
    """A synthetic COCO-layout split with one case per image (two for a duplicate id); returns case → keys."""
    cases = [c for c in COCO_CASES if with_non_utf8 or c != "non-UTF-8 file name"]
    generate_split(root, "train", len(cases) + 3, seed=5, cfg=SceneConfig(min_size=32, max_size=48), progress=False)
    shutil.copytree(root, root.parent / f"{root.name}_pristine", dirs_exist_ok=True)
    doc = json.loads((root / JSON_NAME).read_text())
    images, anns = doc["images"], {a["image_id"]: a for a in doc["annotations"]}
    png_dir, img_dir = root / "annotations" / "panoptic_train", root / "train"
    keys: dict[str, list[str]] = {}
    for i, case in enumerate(cases):
        image = images[i + 1]
        ann = anns[image["id"]]
        key, h, w = Path(image["file_name"]).stem, image["height"], image["width"]
        keys[case] = [key]
        jpg, png = img_dir / image["file_name"], png_dir / ann["file_name"]
        segs = ann["segments_info"]
        if case == "truncated JPEG":
            jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
        elif case == "PNG of the wrong size":
            write_panoptic_png(png, read_panoptic_png(png)[:-1])
        elif case == "PNG id not in the JSON":
            ids = read_panoptic_png(png)
            ids[:2, :2] = 4242
            write_panoptic_png(png, ids)
        elif case == "JSON id not in the PNG":
            segs.append({**segs[0], "id": 9999})
        elif case == "unknown category id":
            segs[0]["category_id"] = 999
        elif case == "duplicate image id":
            image["id"] = ann["image_id"] = images[0]["id"]  # the first image shares it; both are rejected
            keys[case].append(Path(images[0]["file_name"]).stem)
        elif case == "empty segments (all void)":
            ann["segments_info"] = []
            write_panoptic_png(png, np.zeros((h, w), np.int32))
        elif case == "zero-area segment":
            segs.append({**segs[0], "id": 7777, "area": 0, "bbox": [0, 0, 0, 0]})
        elif case == "whole-image segment":
            ann["segments_info"] = [{**segs[0], "area": h * w, "bbox": [0, 0, w, h]}]
            write_panoptic_png(png, np.full((h, w), segs[0]["id"], np.int32))
        elif case == "grayscale JPEG":
            jpg.write_bytes(_jpeg(np.full((h, w), 120, np.uint8)))
        elif case == "CMYK JPEG":
            jpg.write_bytes(_cmyk_jpeg(h, w))
        elif case == "16-bit PNG label":
            cv2.imwrite(str(png), (read_panoptic_png(png) % 65536).astype(np.uint16))
        elif case == "non-UTF-8 file name":
            name = os.fsdecode(NON_UTF8 + b"_" + key.encode() + b".jpg")  # "caf\udce9_..."; JSON writes it as \udce9
            os.rename(jpg, img_dir / name)
            image["file_name"] = name
            keys[case] = [Path(name).stem.replace("\udce9", "_")]
    (root / JSON_NAME).write_text(json.dumps(doc))
    return keys


def write_folder_corpus(root: Path) -> dict[str, str]:
    root.mkdir(parents=True)
    img = np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8)
    (root / "ok.jpg").write_bytes(_jpeg(img))
    (root / "truncated.jpg").write_bytes(_jpeg(img)[:300])
    (root / "gray.jpg").write_bytes(_jpeg(img[..., 0]))
    (root / "cmyk.jpg").write_bytes(_cmyk_jpeg(24, 32))
    (root / os.fsdecode(NON_UTF8 + b".jpg")).write_bytes(_jpeg(img))
    return {"truncated JPEG": "truncated", "grayscale JPEG": "gray", "CMYK JPEG": "cmyk", "non-UTF-8 file name": "caf_"}


def write_nyu_mat(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """A labeled-NYUv2-shaped .mat (HDF5, MATLAB's transposed layout) with NaN, +inf and negative depths."""
    rng = np.random.default_rng(1)
    n, h, w = 4, 12, 16
    depths = rng.uniform(0.5, 9.0, (n, h, w)).astype(np.float32)
    depths[1, 2:4, 3:6] = np.nan
    depths[2, 5, :] = np.inf
    depths[3, :, 7] = -1.5
    images = rng.integers(0, 255, (n, h, w, 3), np.uint8)
    with h5py.File(path, "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
    return depths, {"NaN depth": "nyu_0002", "inf depth": "nyu_0003", "negative depth": "nyu_0004"}


# -- running the components -------------------------------------------------------------------------------------
Outcome = tuple[str, str]  # ("handled" | "quarantined" | "error" | "crash", message)


def reader_outcomes(reader) -> dict[str, Outcome]:
    out = {}
    for ref in reader.refs():
        try:
            got = reader.load(ref)
        except Exception as exc:  # a reader must never raise for bad input
            out[ref.key] = ("crash", f"{type(exc).__name__}: {exc}")
            continue
        if isinstance(got, SampleError):
            out[ref.key] = ("quarantined", f"{os.path.basename(got.source_path)}: {got.reason}")
        else:
            assert isinstance(got, Sample)
            out[ref.key] = ("handled", "")
    return out


def build_outcomes(data: Path, out: Path, kind: str, extra: list[str]) -> tuple[int, str, dict[str, Outcome]]:
    """Run the whole build_shards job (in-process Ray stand-in: see tests/faults/run_prep.py) and read its manifest."""
    cmd = [sys.executable, str(REPO / "tests" / "faults" / "run_prep.py"), "--", "--config", str(REPO / "prep/configs/synthetic.toml"),
           f"--data.kind={kind}", f"--data.root={data}", f"--out={out}", "--synthetic.generate=false", "--run.progress=false",
           "--shards.samples_per_shard=4", *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    manifest = read_manifest(out / MANIFEST_NAME) if result.returncode == 0 else None
    rows = {}
    for row in manifest.samples if manifest else []:
        rows[row.key] = ("handled", "") if row.status == "ok" else ("quarantined", f"{os.path.basename(row.source_path)}: {row.error}")
    return result.returncode, result.stdout + result.stderr, rows


def pq_outcome(root: Path, pristine: Path, keys: list[str], tmp: Path) -> Outcome:
    """PQ of the untouched labels (as a prediction) against this case's GT image(s) alone."""
    doc = json.loads((root / JSON_NAME).read_text())
    stems = {Path(i["file_name"]).stem.replace("\udce9", "_") for i in doc["images"]}
    chosen = [i for i in doc["images"] if Path(i["file_name"]).stem.replace("\udce9", "_") in keys]
    assert chosen and stems
    ids = {i["id"] for i in chosen}
    gt = {**doc, "images": chosen, "annotations": [a for a in doc["annotations"] if a["image_id"] in ids]}
    pred_doc = json.loads((pristine / JSON_NAME).read_text())
    pred = {**pred_doc, "annotations": [a for a in pred_doc["annotations"] if a["image_id"] in ids]}
    case_dir = tmp / "pq" / keys[0]
    case_dir.mkdir(parents=True)
    (case_dir / "gt.json").write_text(json.dumps(gt))
    (case_dir / "pred.json").write_text(json.dumps(pred))
    try:
        result = pq_compute(case_dir / "gt.json", root / "annotations/panoptic_train", case_dir / "pred.json",
                            pristine / "annotations/panoptic_train", progress=False)
    except (ValueError, FileNotFoundError) as exc:  # what the CLI turns into `error: ...` and exit 2
        return ("error", str(exc))
    except Exception as exc:
        return ("crash", f"{type(exc).__name__}: {exc}")
    assert 0.0 <= result.summary()["All"]["pq"] <= 1.0
    return ("handled", "")


def with_non_utf8_png(root: Path, keys: list[str]) -> None:
    """For PQ the non-UTF-8 name must be a label PNG's (PQ reads no images): rename that case's PNG too."""
    doc = json.loads((root / JSON_NAME).read_text())
    for ann in doc["annotations"]:
        if Path(ann["file_name"]).stem.startswith(keys[0].removeprefix("caf__")):
            name = os.fsdecode(NON_UTF8 + b"_" + ann["file_name"].encode())
            os.rename(root / "annotations/panoptic_train" / ann["file_name"], root / "annotations/panoptic_train" / name)
            pristine = root.parent / f"{root.name}_pristine" / "annotations/panoptic_train"
            shutil.copy(pristine / ann["file_name"], pristine / name)
            ann["file_name"] = name
    (root / JSON_NAME).write_text(json.dumps(doc))


def outcome_table(tmp: Path) -> tuple[dict[str, dict[str, Outcome]], dict[str, object]]:
    """Run every component on the corpus; returns (case → component → outcome, facts about the whole-job runs)."""
    table: dict[str, dict[str, Outcome]] = {case: {} for case in EXPECTED}
    facts: dict[str, object] = {}
    coco = tmp / "coco"
    keys = write_coco_corpus(coco)
    from genpan.prep.readers.coco import coco_layout

    by_key = reader_outcomes(coco_layout(coco, "train", with_depth=True, dataset="synthetic"))
    for case, case_keys in keys.items():
        table[case]["coco reader"] = _worst([by_key[k] for k in case_keys])
    # build_shards over the whole corpus but the non-UTF-8 name (that one gets its own run below, so that a failure
    # of the whole job on it would show as its own cell)
    clean = tmp / "coco_no_non_utf8"
    clean_keys = write_coco_corpus(clean, with_non_utf8=False)
    rc, log, rows = build_outcomes(clean, tmp / "shards", "synthetic", ["--teacher.kind=ground_truth"])
    facts.update(build_rc=rc, build_log=log, build_rows=rows, build_keys=clean_keys)
    for case, case_keys in clean_keys.items():
        table[case]["build_shards manifest"] = _worst([rows.get(k, ("crash", f"no manifest row (job exit {rc})")) for k in case_keys])
    rc8, log8, rows8 = build_outcomes(coco, tmp / "shards_non_utf8", "synthetic", ["--teacher.kind=ground_truth"])
    key8 = keys["non-UTF-8 file name"][0]
    table["non-UTF-8 file name"]["build_shards manifest"] = rows8.get(key8, ("crash", f"whole job exit {rc8}: {log8.strip().splitlines()[-1]}"))
    with_non_utf8_png(coco, keys["non-UTF-8 file name"])
    for case, case_keys in keys.items():
        if "eval/pq.py" in EXPECTED[case]:
            table[case]["eval/pq.py"] = pq_outcome(coco, tmp / "coco_pristine", case_keys, tmp)
    folder = tmp / "folder"
    folder_keys = write_folder_corpus(folder)
    by_key = reader_outcomes(make_reader("folder", root=folder))
    for case, key in folder_keys.items():
        table[case]["folder reader"] = by_key[key]
    depths, nyu_keys = write_nyu_mat(tmp / "nyu.mat")
    reader = make_reader("nyu_mat", mat_path=tmp / "nyu.mat")
    by_key = reader_outcomes(reader)
    loaded = {ref.key: reader.load(ref) for ref in reader.refs()}
    facts["nyu"] = (depths, loaded)
    rc_n, log_n, rows_n = build_outcomes(tmp, tmp / "shards_nyu", "nyu_mat", [f"--data.options.mat_path={tmp / 'nyu.mat'}",
                                                                            "--teacher.kind=ground_truth"])
    facts.update(nyu_rc=rc_n, nyu_log=log_n)
    for case, key in nyu_keys.items():
        table[case]["nyu_mat reader"] = by_key[key]
        table[case]["build_shards manifest"] = rows_n.get(key, ("crash", f"no manifest row (job exit {rc_n})"))
    return table, facts


def _worst(outcomes: list[Outcome]) -> Outcome:
    order = ("crash", "error", "quarantined", "handled")
    return min(outcomes, key=lambda o: order.index(o[0]))


def render(table: dict[str, dict[str, Outcome]]) -> str:
    lines = ["| case | " + " | ".join(COMPONENTS) + " |", "|---" * (len(COMPONENTS) + 1) + "|"]
    for case, row in table.items():
        cells = []
        for comp in COMPONENTS:
            if comp not in row:
                cells.append("—")
                continue
            kind, message = row[comp]
            short = message.replace("|", "/").replace("\n", " ")
            cells.append(kind if not short else f"{kind}: {short[:90]}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Outcome]], dict[str, object], Path]:
    tmp = tmp_path_factory.mktemp("bad")
    table, facts = outcome_table(tmp)
    (tmp / "outcomes.md").write_text(render(table) + "\n")
    return table, facts, tmp


def test_outcome_table(outcomes) -> None:
    table, _, tmp = outcomes
    assert (tmp / "outcomes.md").read_text().count("\n") == len(EXPECTED) + 2
    for case, expected_row in EXPECTED.items():
        assert set(table[case]) == set(expected_row), case
        for comp, (kind, fragment) in expected_row.items():
            if (case, comp) in KNOWN_BUGS:
                continue
            got_kind, message = table[case][comp]
            assert (got_kind, fragment in message) == (kind, True), (case, comp, table[case][comp])


def test_quarantined_and_error_messages_name_the_file(outcomes) -> None:
    table, _, _ = outcomes
    for case, row in table.items():
        for comp, (kind, message) in row.items():
            if kind in ("quarantined", "error"):
                assert any(ext in message for ext in (".png", ".jpg", ".json")), (case, comp, message)


def test_build_shards_completes_and_the_manifest_counts_every_quarantined_sample(outcomes) -> None:
    _, facts, tmp = outcomes
    assert facts["build_rc"] == 0, facts["build_log"]
    rows = facts["build_rows"]
    bad_keys = {k for case, keys in facts["build_keys"].items() if EXPECTED[case]["build_shards manifest"][0] == "quarantined" for k in keys}
    assert {k for k, (kind, _) in rows.items() if kind == "quarantined"} == bad_keys
    manifest = read_manifest(tmp / "shards" / MANIFEST_NAME)
    assert sum(s.quarantined for s in manifest.shards) == len(bad_keys) == 9  # 8 cases; the duplicate id rejects two images
    assert sum(s.count for s in manifest.shards) == len(rows) - len(bad_keys)
    assert f"{len(bad_keys)} quarantined" in facts["build_log"]


def test_bad_depths_become_no_measurement_and_the_rest_is_kept(outcomes) -> None:
    _, facts, _ = outcomes
    assert facts["nyu_rc"] == 0, facts["nyu_log"]
    depths, loaded = facts["nyu"]
    for i, key in enumerate(sorted(loaded)):
        sample = loaded[key]
        assert isinstance(sample, Sample)
        bad = ~np.isfinite(depths[i]) | (depths[i] < 0)
        assert np.all(sample.depth_m[bad] == 0)
        np.testing.assert_array_equal(sample.depth_m[~bad], depths[i][~bad])


def test_a_non_utf8_file_name_does_not_fail_the_whole_job(outcomes) -> None:
    table, _, _ = outcomes
    assert table["non-UTF-8 file name"]["build_shards manifest"] == ("handled", "")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests" / "data" / "bad"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    result, _ = outcome_table(target)
    print(f"{len(EXPECTED)} cases, {sum(len(r) for r in result.values())} (case, component) outcomes; corpus in {target}\n")
    print(render(result))
