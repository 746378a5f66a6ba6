"""Samples of a local WebDataset tar shard, read with a lean header parser.

`tarfile` builds a TarInfo per member through dozens of Python calls; at seven members per sample that
cost more than decoding the sample's label maps (bench/train_step.py). This reader takes only what a
WebDataset sample needs from each 512-byte header (name, size, type; checksum verified), supports the
ustar, GNU long-name and pax path forms, and groups members into samples exactly as
`webdataset.tarfile_to_samples` does: key = path up to the first dot of the file name, field = the rest,
lower-cased; a repeated field within one key is an error.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from typing import Any, BinaryIO

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")


class TarFormatError(ValueError):
    """The shard is not a readable tar file (truncated or corrupt header)."""


def _octal(field: bytes, what: str, url: str) -> int:
    if field[0] & 0x80:  # GNU base-256 for values that do not fit the octal digits
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"{url}: corrupt tar header ({what} {digits!r})") from None


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> key=value\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def _key_and_field(name: str) -> tuple[str, str | None]:
    """WebDataset's split of a member name: key = path up to the first dot of the file name, field = the
    rest, lower-cased (None without a dot)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, None) if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def iter_members(stream: BinaryIO, url: str, fields: Collection[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in archive order; with `fields`, members of other fields are
    skipped unread (a seek past their data)."""
    long_name: str | None = None
    end = os.fstat(stream.fileno()).st_size if fields is not None else 0  # a skip must not pass the end unnoticed
    while True:
        header = stream.read(BLOCK)
        if not header or header == bytes(BLOCK):  # end of archive (zero blocks) or a file cut at a member edge
            return
        if len(header) < BLOCK:
            raise TarFormatError(f"{url}: truncated tar header")
        stored = _octal(header[148:156], "checksum", url)
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:  # checksum counts its own field as spaces
            raise TarFormatError(f"{url}: tar header checksum mismatch (corrupt or not a tar file)")
        size = _octal(header[124:136], "size", url)
        kind = header[156:157]
        padded = size + (-size % BLOCK)
        if kind in REGULAR:
            name = long_name if long_name is not None else _header_name(header)
            long_name = None
            if fields is not None and _key_and_field(name)[1] not in fields:  # a field the reader does not use
                if stream.seek(size, 1) > end:
                    raise TarFormatError(f"{url}: truncated tar member")
                stream.seek(padded - size, 1)
                continue
        data = stream.read(size)
        if len(data) < size:
            raise TarFormatError(f"{url}: truncated tar member")
        if padded > size:
            stream.read(padded - size)
        if kind in (b"L", b"x"):  # the real name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data)
        elif kind in REGULAR:
            yield name, data
        else:
            long_name = None


def _header_name(header: bytes) -> str:
    """The member name a 512-byte header holds itself (ustar prefix included)."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return prefix.decode("utf-8") + "/" + name if prefix else name


def tar_samples(url: str, fields: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """WebDataset samples ({"__key__", "__url__", field: bytes}) of the local tar file `url`; with
    `fields`, only those fields are read (a sample none of whose members is wanted is not yielded)."""
    current: dict[str, Any] | None = None
    with open(url, "rb", buffering=1 << 20) as stream:
        for name, data in iter_members(stream, url, fields):
            key, field = _key_and_field(name)
            if field is None:
                continue  # no field name: webdataset skips these too
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if field in current:
                raise ValueError(f"{url}: duplicate field {field!r} in sample {key!r}")
            current[field] = data
    if current is not None:
        yield current
