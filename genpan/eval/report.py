"""PQ reports: report.json (every number, the inputs, a timestamp), report.md and the two figures.

`write_report(out_dir, pq_result, extra_sections, metadata)` is the one entry point; callers add
their own Markdown sections (a depth table, the config and checkpoint identity, ...) through
`extra_sections` and free-form identity through `metadata`, both kept in report.json as well.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genpan.eval.plots import plot_pq_by_class, plot_pq_by_size
from genpan.eval.pq_buckets import SizeBucket

if TYPE_CHECKING:
    from genpan.eval.pq import PQResult

REPORT_JSON, REPORT_MD = "report.json", "report.md"
CLASS_PLOT, SIZE_PLOT = "pq_by_class.png", "pq_by_size.png"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(result: PQResult) -> str:
    rows = [
        [name, _pct(r["pq"]), _pct(r["sq"]), _pct(r["rq"]), r["n"], r["tp"], r["fp"], r["fn"]]
        for name, r in result.summary().items()
    ]
    return _table(["", "PQ", "SQ", "RQ", "categories", "TP", "FP", "FN"], rows)


def per_class_markdown(result: PQResult) -> str:
    rows = result.per_class()
    counted = [r for r in rows if r["counted"]]
    table = _table(
        ["id", "name", "kind", "PQ", "SQ", "RQ", "TP", "FP", "FN"],
        [
            [r["id"], r["name"], "thing" if r["isthing"] else "stuff", _pct(r["pq"]), _pct(r["sq"]), _pct(r["rq"]),
             r["tp"], r["fp"], r["fn"]]
            for r in counted
        ],
    )
    absent = len(rows) - len(counted)
    note = f"\n\n{absent} categories with TP + FP + FN = 0 are left out of the means and this table." if absent else ""
    return table + note


def size_markdown(buckets: Sequence[SizeBucket]) -> str:
    table = _table(
        ["bucket", "area (px)", "PQ", "SQ", "RQ", "categories", "TP", "FP", "FN", "mean IoU (TP)", "mean IoU (GT)"],
        [
            [b.name, f"[{b.lo:g}, {b.hi:g})", _pct(b.pq), _pct(b.sq), _pct(b.rq), b.n, b.tp, b.fp, b.fn,
             _pct(b.mean_iou), _pct(b.gt_mean_iou)]
            for b in buckets
        ],
    )
    return (
        table + "\n\nThing categories only. TP and FN fall in the bucket of the GT segment's area, FP in that of the "
        "predicted segment's area; PQ is averaged over the thing categories present in the bucket. "
        "mean IoU (GT) counts each missed object as IoU 0."
    )


def write_report(
    out_dir: str | Path,
    pq_result: PQResult,
    extra_sections: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    size_buckets: Sequence[SizeBucket] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, pq_by_class.png, pq_by_size.png into `out_dir`; return their paths.

    `extra_sections`: {title: Markdown body} appended to report.md (and stored in report.json);
    `metadata`: JSON-serialisable identity (config, checkpoint, ...); `size_buckets` default to COCO's.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buckets = list(size_buckets) if size_buckets is not None else pq_result.by_size()
    extra = dict(extra_sections or {})
    meta = dict(metadata or {})
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    paths = {
        "json": out / REPORT_JSON,
        "md": out / REPORT_MD,
        "class_plot": plot_pq_by_class(pq_result.per_class(), out / CLASS_PLOT),
        "size_plot": plot_pq_by_size(buckets, out / SIZE_PLOT),
    }
    payload = {
        "timestamp": stamp,
        "inputs": pq_result.inputs,
        "metadata": meta,
        "num_images": len(pq_result.image_ids),
        "summary": pq_result.summary(),
        "per_class": pq_result.per_class(),
        "by_size": [b.to_dict() for b in buckets],
        "gt_area_mismatches": pq_result.gt_area_mismatches,
        "extra_sections": extra,
    }
    paths["json"].write_text(json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8")

    parts = ["# Panoptic quality", f"Generated {stamp} on {len(pq_result.image_ids)} images."]
    identity = {**pq_result.inputs, **{k: json.dumps(v, default=str) if not isinstance(v, str) else v
                                        for k, v in meta.items()}}
    if identity:
        parts.append(_table(["", "value"], [[k, f"`{v}`"] for k, v in identity.items()]))
    parts += ["## All / Things / Stuff", summary_markdown(pq_result)]
    if pq_result.gt_area_mismatches:
        parts.append(f"Note: {pq_result.gt_area_mismatches} GT segments have a JSON `area` unlike their PNG pixel count.")
    parts += ["## PQ by object size (things)", size_markdown(buckets), f"![PQ by size]({SIZE_PLOT})"]
    parts += ["## Per class", per_class_markdown(pq_result), f"![PQ by class]({CLASS_PLOT})"]
    for title, body in extra.items():
        parts += [f"## {title}", body.strip()]
    paths["md"].write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return paths
