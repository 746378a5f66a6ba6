"""genpan/train/tar_samples.py gives exactly the samples webdataset's own tar reader gives."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from genpan.train.tar_samples import TarFormatError, tar_samples


def webdataset_samples(path: Path) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))


def write_tar(path: Path, members: list[tuple[str, bytes | None]], tar_format: int) -> Path:
    """`None` content makes a directory entry."""
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def same_as_webdataset(path: Path) -> list[dict]:
    ours, theirs = list(tar_samples(str(path))), webdataset_samples(path)
    assert [sorted(s) for s in ours] == [sorted(s) for s in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert {k: v for k, v in a.items() if k != "__url__"} == {k: v for k, v in b.items() if k not in ("__url__", "__local_path__")}
    return ours


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_samples_as_webdataset(tmp_path: Path, tar_format: int) -> None:
    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: ustar prefix field, GNU long name or pax path
    members = [
        ("sub", None),
        ("sub/0001.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
        ("sub/0001.sem.png", b"p" * 511),
        ("sub/0001.JSON", b"{}"),
        ("sub/0002.jpg", b""),
        ("sub/0002.ins.png", b"q" * 512),
        ("no_extension", b"skipped by both"),
        (f"{deep}/0003.jpg", b"x" * 1025),
        (f"{deep}/0003.dist.png", b"y" * 7),
    ]
    if tar_format == tarfile.USTAR_FORMAT:
        members = [(n, d) for n, d in members if not n.startswith(deep)] + [(f"{'d' * 60}/{'e' * 30}/0003.jpg", b"x" * 1025)]
    samples = same_as_webdataset(write_tar(tmp_path / "s.tar", members, tar_format))
    assert [s["__key__"] for s in samples][:2] == ["sub/0001", "sub/0002"]
    assert samples[0]["json"] == b"{}"  # field names are lower-cased


def test_project_shards(tmp_path: Path) -> None:
    from test_data import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path, 6, per_shard=3, min_size=32, max_size=48)
    for path in sorted(Path(shards).glob("*.tar")):
        assert len(same_as_webdataset(path)) == 3


def test_duplicate_field_is_an_error(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "d.tar", [("a.jpg", b"1"), ("a.jpg", b"2")], tarfile.GNU_FORMAT)
    with pytest.raises(ValueError, match="duplicate field 'jpg'"):
        list(tar_samples(str(path)))


def test_corrupt_and_truncated_shards(tmp_path: Path) -> None:
    good = write_tar(tmp_path / "g.tar", [("k.jpg", b"z" * 2000), ("k.json", b"{}")], tarfile.GNU_FORMAT).read_bytes()
    flipped = bytearray(good)
    flipped[130] ^= 0x01  # a size digit of the first header: the checksum no longer matches
    (tmp_path / "c.tar").write_bytes(bytes(flipped))
    with pytest.raises(TarFormatError, match="checksum"):
        list(tar_samples(str(tmp_path / "c.tar")))
    (tmp_path / "t.tar").write_bytes(good[:1000])  # cut inside the first member's data
    with pytest.raises(TarFormatError, match="truncated"):
        list(tar_samples(str(tmp_path / "t.tar")))
    (tmp_path / "n.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(TarFormatError):
        list(tar_samples(str(tmp_path / "n.tar")))


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reading_only_some_fields_gives_those_fields_of_the_full_read(tmp_path: Path, tar_format: int) -> None:
    long = "d" * 60 + "/" + "e" * 30  # ustar prefix / GNU long name / pax path, kept or skipped alike
    members = [("a.jpg", b"1" * 700), ("a.depth.png", b"2" * 513), ("a.json", b"{}"), (f"{long}/b.depth.png", b"3"),
               (f"{long}/b.jpg", b"4" * 512), ("c.depth.png", b"5" * 3000)]
    path = write_tar(tmp_path / "f.tar", members, tar_format)
    wanted = {"jpg", "json"}
    full = [{k: v for k, v in s.items() if k.startswith("__") or k in wanted} for s in tar_samples(str(path))]
    assert list(tar_samples(str(path), wanted)) == [s for s in full if set(s) - {"__key__", "__url__"}]
    # a file cut inside a member that is skipped is still reported
    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[: 512 + 1024 + 512 + 100])  # inside a.depth.png
    with pytest.raises(TarFormatError, match="truncated"):
        list(tar_samples(str(tmp_path / "cut.tar"), wanted))
