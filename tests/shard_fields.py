"""Independent reading of a shard sample's label planes: zstandard and numpy only, from the json's
dtype and shape (what any consumer of the shard contract would write), not genpan/planes.py."""

from __future__ import annotations

import json

import numpy as np
import zstandard


def stored_plane(fields: dict, name: str) -> np.ndarray:
    """The array stored in field `name` ("sem.zst", ...) of a sample's fields (bytes by field name)."""
    description = json.loads(fields["json"])["planes"][name]
    data = zstandard.ZstdDecompressor().decompress(fields[name])
    return np.frombuffer(data, np.dtype(description["dtype"])).reshape(description["shape"])
