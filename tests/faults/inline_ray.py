"""An in-process stand-in for the part of the Ray API that `genpan/prep/build_shards.py` and `genpan/prep/depth_cache.py` use.

Fault injection needs to kill the job at an exact point (the Nth tar member, the Nth cache write); with
real Ray those writes happen in worker processes that a kill of the driver does not reach at a chosen
moment. Installed as `ray` (and `ray.data`) before the job imports it, this runs every remote task in
the driver when `ray.wait` asks for it, one at a time and in submission order, so the driver still
rewrites the manifest between shards exactly as it does under Ray. Only the file protocol is under
test here; `tests/test_build_shards.py` covers the real Ray path.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_ids = itertools.count()
_initialized = False


class ObjectRef:
    """A value or a deferred call; resolved once, on first `get` (or when `wait` runs it)."""

    def __init__(self, value: Any = None, call: Callable[[], Any] | None = None) -> None:
        self._value, self._call, self._id = value, call, next(_ids)

    def resolve(self) -> Any:
        if self._call is not None:
            self._value, self._call = self._call(), None
        return self._value

    def hex(self) -> str:
        return f"{self._id:040x}"


class _RemoteFunction:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> ObjectRef:
        return ObjectRef(call=lambda: self._fn(*args, **kwargs))


def init(*args: Any, **kwargs: Any) -> None:
    global _initialized
    _initialized = True


def is_initialized() -> bool:
    return _initialized


def shutdown() -> None:
    global _initialized
    _initialized = False


def remote(*args: Any, **options: Any) -> Any:
    if args and callable(args[0]):
        return _RemoteFunction(args[0])
    return lambda fn: _RemoteFunction(fn)


def put(value: Any) -> ObjectRef:
    return ObjectRef(value)


def get(ref: ObjectRef | Sequence[ObjectRef]) -> Any:
    if isinstance(ref, ObjectRef):
        return ref.resolve()
    return [r.resolve() for r in ref]


def wait(refs: Sequence[ObjectRef], num_returns: int = 1, **kwargs: Any) -> tuple[list[ObjectRef], list[ObjectRef]]:
    ready = list(refs[:num_returns])
    for r in ready:
        r.resolve()
    return ready, list(refs[num_returns:])


def cluster_resources() -> dict[str, float]:
    return {"CPU": 1.0}


class _Dataset:
    """`ray.data` as `fill_cache` uses it: from_items → map_batches(callable class) → take_all."""

    def __init__(self, items: list[dict[str, Any]], stages: tuple[tuple[Any, dict[str, Any], int], ...] = ()) -> None:
        self._items, self._stages = items, stages

    def map_batches(self, fn: Any, *, fn_constructor_kwargs: dict[str, Any] | None = None, batch_size: int = 8, **_: Any) -> _Dataset:
        return _Dataset(self._items, self._stages + ((fn, fn_constructor_kwargs or {}, batch_size),))

    def take_all(self) -> list[dict[str, Any]]:
        rows = self._items
        for fn, kwargs, batch_size in self._stages:
            worker = fn(**kwargs) if isinstance(fn, type) else fn
            out: list[dict[str, Any]] = []
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
                result = worker(batch)
                n = len(next(iter(result.values())))
                out += [{k: v[i] for k, v in result.items()} for i in range(n)]
            rows = out
        return rows


def from_items(items: list[dict[str, Any]]) -> _Dataset:
    return _Dataset(list(items))


def install() -> None:
    """Make `import ray` / `import ray.data` give this module (call before the job imports Ray)."""
    module = sys.modules[__name__]
    data = types.ModuleType("ray.data")
    data.from_items = from_items  # type: ignore[attr-defined]
    module.data = data  # type: ignore[attr-defined]
    sys.modules["ray"] = module
    sys.modules["ray.data"] = data
