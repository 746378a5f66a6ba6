"""File access shared by the readers: every problem with one sample becomes a SampleError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from genpan.prep.readers.base import Sample, SampleError, SampleRef
from genpan.prep.readers.image_header import image_info


class SampleProblem(Exception):
    """A bad input found while loading one sample; becomes a SampleError."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(reason)
        self.path = path


def guarded_load(ref: SampleRef, load: Callable[[SampleRef], Sample]) -> Sample | SampleError:
    """Run a reader's `load` for one ref; a listing problem or a SampleProblem becomes a SampleError."""
    try:
        if ref.problem:
            raise SampleProblem(ref.problem, ref.label_path or ref.image_path)
        return load(ref)
    except SampleProblem as exc:
        return SampleError(ref.key, ref.dataset, exc.path or ref.image_path, str(exc))


def read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SampleProblem(f"{what} file missing", path) from None
    except OSError as exc:
        raise SampleProblem(f"cannot read {what}: {exc.strerror or exc}", path) from None


def read_image(path: str) -> tuple[bytes, int, int, str]:
    """The image bytes untouched, with (height, width, extension) from the header."""
    data = read_bytes(path, "image")
    try:
        h, w, ext = image_info(data)
    except ValueError as exc:
        raise SampleProblem(str(exc), path) from None
    return data, h, w, ext
