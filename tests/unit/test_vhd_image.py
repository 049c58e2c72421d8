"""Fixed and dynamic VHD images and the raw image, through the BlockImage interface."""

import os
from pathlib import Path

import pytest

from vhdshare.blockimage import BlockImage, ImageError, RawImage
from vhdshare.dynamic import DynamicImage
from vhdshare.image import FixedImage, create_image, open_block_image, open_image
from vhdshare.vhd import BAT_UNUSED, VhdError, parse_footer

MIB = 1 << 20
SPB = 2 * MIB // 512  # sectors per default block


def pattern(count: int, seed: int) -> bytes:
    """`count` sectors of recognisable, non-zero data."""
    return bytes((seed + i) % 251 + 1 for i in range(251)) * (count * 512 // 251) + bytes(
        (seed + i) % 251 + 1 for i in range(count * 512 % 251))


def make(tmp_path: Path, kind: str, size_bytes: int = 8 * MIB, **kw: int) -> Path:
    path = tmp_path / f"{kind}.vhd"
    create_image(path, size_bytes, kind, **kw)
    return path


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_new_image_reads_zeros_and_satisfies_protocol(tmp_path: Path, kind: str) -> None:
    with open_image(make(tmp_path, kind)) as image:
        assert isinstance(image, BlockImage)
        assert image.size_bytes == 8 * MIB and image.sector_size == 512
        assert image.read(0, 16) == bytes(16 * 512)
        assert image.read(image.total_sectors - 1, 1) == bytes(512)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_write_read_round_trip_across_blocks_and_reopen(tmp_path: Path, kind: str) -> None:
    path = make(tmp_path, kind, 10_000_000 // 512 * 512)
    writes = {0: pattern(3, 1), SPB - 2: pattern(5, 2), 3 * SPB + 7: pattern(1, 3)}
    with open_image(path, writable=True) as image:
        last = image.total_sectors - 4
        writes[last] = pattern(4, 4)
        for lba, data in writes.items():
            image.write(lba, data)
        image.flush()
    with open_image(path) as image:
        for lba, data in writes.items():
            assert image.read(lba, len(data) // 512) == data
        assert image.read(10, 20) == bytes(20 * 512)


def test_dynamic_growth_keeps_footers_and_bat_consistent(tmp_path: Path) -> None:
    path = make(tmp_path, "dynamic")
    size_before = path.stat().st_size
    with open_image(path, writable=True) as image:
        assert isinstance(image, DynamicImage)
        image.write(SPB + 1, pattern(2, 9))
        assert image.allocated_blocks == 1
    raw = path.read_bytes()
    assert len(raw) == size_before + 512 + 2 * MIB  # bitmap sector + block
    assert parse_footer(raw[-512:]) == parse_footer(raw[:512])
    with open_image(path) as image:
        assert isinstance(image, DynamicImage)
        assert image.allocated(0, image.total_sectors) == [
            (0, SPB, False), (SPB, SPB, True), (2 * SPB, 2 * SPB, False)]


def test_dynamic_unmap_whole_block_deallocates_and_reuses_space(tmp_path: Path) -> None:
    path = make(tmp_path, "dynamic")
    with open_image(path, writable=True) as image:
        assert isinstance(image, DynamicImage)
        image.write(0, pattern(2 * SPB, 5))
        size = path.stat().st_size
        image.unmap(0, SPB + 10)  # whole block 0, part of block 1
        assert image.allocated_blocks == 1
        assert image.read(0, SPB + 10) == bytes((SPB + 10) * 512)
        assert image.read(SPB + 10, 5) == pattern(2 * SPB, 5)[(SPB + 10) * 512:(SPB + 15) * 512]
        image.write(3 * SPB, pattern(1, 6))  # reuses block 0's slot
        assert path.stat().st_size == size
        assert image.read(3 * SPB, 1) == pattern(1, 6)
        assert image.read(3 * SPB + 1, 1) == bytes(512)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_unmap_reads_zeros(tmp_path: Path, kind: str) -> None:
    with open_image(make(tmp_path, kind), writable=True) as image:
        image.write(0, pattern(100, 1))
        image.unmap(10, 20)
        assert image.read(10, 20) == bytes(20 * 512)
        assert image.read(30, 70) == pattern(100, 1)[30 * 512:]


def test_partial_bitmap_sectors_read_as_zeros_until_written(tmp_path: Path) -> None:
    path = make(tmp_path, "dynamic")
    with open_image(path, writable=True) as image:
        image.write(0, pattern(8, 1))
        assert isinstance(image, DynamicImage)
        bitmap_offset = image._bat[0] * 512
    with open(path, "r+b") as file:  # another tool marked only sectors 0..3 as in use
        file.seek(bitmap_offset)
        file.write(b"\xf0" + bytes(511))
    with open_image(path, writable=True) as image:
        assert image.read(0, 8) == pattern(8, 1)[:4 * 512] + bytes(4 * 512)
        image.write(5, pattern(1, 7))
        assert image.read(4, 2) == bytes(512) + pattern(1, 7)
    with open(path, "rb") as file:
        file.seek(bitmap_offset)
        assert file.read(1) == b"\xf4"


def test_interrupted_allocation_leaves_a_valid_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make(tmp_path, "dynamic")

    def power_cut(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with open_image(path, writable=True) as image:
        image.write(0, pattern(1, 1))
        monkeypatch.setattr("vhdshare.dynamic.os.fdatasync", power_cut)
        with pytest.raises(VhdError, match="I/O error"):
            image.write(SPB, pattern(1, 2))
    monkeypatch.undo()
    with open_image(path) as image:
        assert isinstance(image, DynamicImage)
        assert image.allocated_blocks == 1 and image._bat[1] == BAT_UNUSED
        assert image.read(SPB, 1) == bytes(512)
        assert image.read(0, 1) == pattern(1, 1)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_bad_requests_are_vhd_errors(tmp_path: Path, kind: str) -> None:
    path = make(tmp_path, kind)
    with open_image(path) as image:
        with pytest.raises(VhdError, match="read-only"):
            image.write(0, bytes(512))
        with pytest.raises(VhdError, match="outside"):
            image.read(image.total_sectors, 1)
        with pytest.raises(VhdError, match="outside"):
            image.read(-1, 1)
    with open_image(path, writable=True) as image:
        with pytest.raises(VhdError, match="multiple of 512"):
            image.write(0, bytes(100))
        with pytest.raises(VhdError, match="outside"):
            image.write(image.total_sectors - 1, bytes(1024))
        with pytest.raises(VhdError, match="outside"):
            image.unmap(image.total_sectors, 1)


def test_create_refuses_existing_and_bad_sizes(tmp_path: Path) -> None:
    path = make(tmp_path, "dynamic")
    with pytest.raises(VhdError, match="exists"):
        create_image(path, MIB)
    for size in (0, 1000, 3 << 40):
        with pytest.raises(VhdError):
            create_image(tmp_path / "x.vhd", size)
        assert not (tmp_path / "x.vhd").exists()
    with pytest.raises(VhdError, match="block size"):
        create_image(tmp_path / "y.vhd", MIB, "dynamic", block_size_bytes=3000)
    assert not (tmp_path / "y.vhd").exists()


def test_fixed_allocated_reports_holes(tmp_path: Path) -> None:
    with open_image(make(tmp_path, "fixed"), writable=True) as image:
        assert isinstance(image, FixedImage)
        image.write(4096, pattern(8, 1))
        runs = image.allocated(0, image.total_sectors)
        assert sum(count for _, count, _ in runs) == image.total_sectors
        assert any(lba <= 4096 < lba + count and flag for lba, count, flag in runs)
        assert runs[0] == (0, runs[0][1], False)


def test_raw_image(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with RawImage.create(path, 4 * MIB) as raw:
        raw.write(8, pattern(2, 1))
        assert raw.read(8, 2) == pattern(2, 1)
        raw.unmap(8, 1)
        assert raw.read(8, 2) == bytes(512) + pattern(2, 1)[512:]
        assert sum(count for _, count, _ in raw.allocated(0, 8192)) == 8192
        with pytest.raises(ImageError):
            raw.read(8192, 1)
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(ImageError, match="multiple of 512"):
        RawImage(odd)
    assert isinstance(open_block_image(path), RawImage)
    assert isinstance(open_block_image(make(tmp_path, "fixed")), FixedImage)


def test_small_block_size_dynamic(tmp_path: Path) -> None:
    path = make(tmp_path, "dynamic", 64 * 1024, block_size_bytes=4096)
    with open_image(path, writable=True) as image:
        image.write(7, pattern(10, 3))  # sectors 7..16: three 8-sector blocks
        assert image.read(7, 10) == pattern(10, 3)
    assert os.path.getsize(path) == 1536 + 512 + 3 * (512 + 4096) + 512
