"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A real local Ray (2 CPUs) for one test module, with the repo importable in its workers."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def pytest_unconfigure(config) -> None:
    """Flush the closing summary line before interpreter shutdown: with output redirected to a file, an
    atexit handler of a library that ends the process with os._exit would otherwise drop what is still
    buffered (seen: a full run whose log ended at the short test summary, without the 'N passed' line)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
