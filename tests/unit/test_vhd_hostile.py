"""Corrupt and hostile VHD images: clear VhdErrors, no writes outside the image, check/repair."""

import contextlib
import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhdshare import vhd
from vhdshare.check import REPAIRABLE, check_image
from vhdshare.dynamic import DynamicImage
from vhdshare.image import FixedImage, create_image, open_image
from vhdshare.vhd import VhdError, parse_dynamic_header, parse_footer

BLOCK = 4096
SIZE = 64 * 1024


def small_dynamic(path: Path) -> bytes:
    """A 64 KiB dynamic disk with 4 KiB blocks, blocks 0 and 3 written; its bytes."""
    create_image(path, SIZE, "dynamic", block_size_bytes=BLOCK)
    with open_image(path, writable=True) as image:
        image.write(0, b"\x11" * 1024)
        image.write(3 * 8 + 2, b"\x22" * 512)
    return path.read_bytes()


def small_fixed(path: Path) -> bytes:
    create_image(path, SIZE, "fixed")
    with open_image(path, writable=True) as image:
        image.write(5, b"\x33" * 2048)
    return path.read_bytes()


def rewrite_footers(path: Path, **changes: object) -> None:
    raw = bytearray(path.read_bytes())
    footer = dataclasses.replace(parse_footer(bytes(raw[-512:])), **changes).pack()  # type: ignore[arg-type]
    raw[-512:] = footer
    if raw[:8] == b"conectix":
        raw[:512] = footer
    path.write_bytes(bytes(raw))


def rewrite_header(path: Path, **changes: object) -> None:
    raw = bytearray(path.read_bytes())
    header = parse_dynamic_header(bytes(raw[512:1536]))
    raw[512:1536] = dataclasses.replace(header, **changes).pack()  # type: ignore[arg-type]
    path.write_bytes(bytes(raw))


def set_bat(path: Path, index: int, entry: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[1536 + 4 * index:1540 + 4 * index] = entry.to_bytes(4, "big")
    path.write_bytes(bytes(raw))


def expect_error(path: Path, match: str) -> None:
    with pytest.raises(VhdError, match=match):
        open_image(path, writable=True)


def test_bad_footer_checksum(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    raw = bytearray(small_fixed(path))
    raw[-400] ^= 0xFF
    path.write_bytes(bytes(raw))
    expect_error(path, "not a VHD image: VHD footer checksum is wrong")


def test_not_a_vhd_and_too_short(tmp_path: Path) -> None:
    path = tmp_path / "x.vhd"
    path.write_bytes(bytes(4096))
    expect_error(path, "not a VHD image")
    path.write_bytes(b"conectix")
    expect_error(path, "only 8 bytes")


def test_bat_entry_past_end(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    small_dynamic(path)
    set_bat(path, 5, 0x00FFFFFF)
    expect_error(path, "BAT entry 5 points past the end")


@pytest.mark.parametrize(("entry", "what"), [(0, "footer copy"), (1, "dynamic disk header"),
                                            (3, "block allocation table")])
def test_bat_entry_into_metadata(tmp_path: Path, entry: int, what: str) -> None:
    path = tmp_path / "d.vhd"
    small_dynamic(path)
    set_bat(path, 7, entry)
    expect_error(path, f"block 7 overlaps the {what}|{what} overlaps block 7")


def test_overlapping_blocks(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    raw = small_dynamic(path)
    first = int.from_bytes(raw[1536:1540], "big")
    set_bat(path, 9, first + 1)
    expect_error(path, "block 9 overlaps block 0")


def test_absurd_sizes(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    small_dynamic(path)
    rewrite_footers(path, current_size=1 << 45)
    expect_error(path, "2040 GiB")
    rewrite_footers(path, current_size=SIZE * 4)
    expect_error(path, "table has 16 entries, the disk size needs 64")
    small_fixed(fixed := tmp_path / "f.vhd")
    rewrite_footers(fixed, current_size=SIZE * 2)
    expect_error(fixed, "truncated")


def test_bat_too_long_to_hold_is_refused(tmp_path: Path) -> None:
    """Tiny blocks on a huge disk would need a BAT of gigabytes: a clear error, no MemoryError."""
    path = tmp_path / "d.vhd"
    small_dynamic(path)  # 4 KiB blocks
    rewrite_footers(path, current_size=1 << 40)
    expect_error(path, "needs 268435456 BAT entries, more than the")
    with pytest.raises(VhdError, match="block size 4096 is too small"):
        create_image(tmp_path / "big.vhd", 1 << 40, "dynamic", block_size_bytes=BLOCK)
    assert not (tmp_path / "big.vhd").exists()


def test_header_and_table_out_of_file(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    small_dynamic(path)
    rewrite_header(path, max_table_entries=1 << 30)
    expect_error(path, "table extends past the end")
    small_dynamic(path2 := tmp_path / "e.vhd")
    rewrite_footers(path2, data_offset=1 << 40)
    expect_error(path2, "header offset")
    small_dynamic(path3 := tmp_path / "g.vhd")
    rewrite_header(path3, block_size=3000)
    expect_error(path3, "block size")


def test_truncated_dynamic_image(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    raw = small_dynamic(path)
    path.write_bytes(raw[:-512 - 100] + raw[-512:])  # last block cut short
    expect_error(path, "points past the end")


def test_differencing_disk_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    small_dynamic(path)
    rewrite_footers(path, disk_type=vhd.DISK_TYPE_DIFFERENCING)
    expect_error(path, "differencing VHDs are not supported")


def test_check_clean_and_repair_footer_copy(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    raw = small_dynamic(path)
    assert check_image(path) == []
    path.write_bytes(bytes(512) + raw[512:])
    assert check_image(path) == ["footer copy at offset 0 is damaged: "
                                 "no VHD footer (cookie 'conectix' missing)" + REPAIRABLE]
    assert check_image(path, repair=True)[0].endswith("(repaired)")
    assert path.read_bytes() == raw
    assert check_image(path) == []


def test_repair_trailing_footer_from_copy(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    raw = small_dynamic(path)
    path.write_bytes(raw[:-512] + bytes(512))
    expect_error(path, "copy at offset 0 is intact .*check --repair")
    assert check_image(path)[0].startswith("footer at the end of the file is damaged")
    assert check_image(path, repair=True)[0].endswith("(repaired)")
    assert path.read_bytes() == raw
    path.write_bytes(raw[:-512])  # footer missing entirely
    assert check_image(path, repair=True)[0].endswith("(repaired)")
    assert path.read_bytes() == raw


def test_fixed_without_footer_cannot_be_repaired(tmp_path: Path) -> None:
    path = tmp_path / "f.vhd"
    raw = small_fixed(path)
    damaged = raw[:-512] + b"conectix" + bytes(504)  # cookie left, rest of the footer lost
    path.write_bytes(damaged)
    problems = check_image(path, repair=True)
    assert len(problems) == 2 and "cannot repair" in problems[1]
    assert path.read_bytes() == damaged
    path.write_bytes(raw[:-512] + bytes(512))
    with pytest.raises(VhdError, match="not a VHD image"):
        check_image(path, repair=True)


# -- fuzzing: arbitrary and mutated bytes --------------------------------------

_BASES: dict[str, bytes] = {}


def base_image(kind: str, tmp_root: Path) -> bytes:
    if kind not in _BASES:
        path = tmp_root / f"base-{kind}.vhd"
        _BASES[kind] = small_dynamic(path) if kind == "dynamic" else small_fixed(path)
        path.unlink()
    return _BASES[kind]


FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused; each example unlinks
mutations = st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=12)


def owned_by_image(image: DynamicImage | FixedImage, start: int, end: int) -> bool:
    regions = image.owned_regions()
    if isinstance(image, DynamicImage):  # the footer copy and header are never rewritten
        regions = [r for r in regions if r[0] >= image.header.table_offset]
    return any(lo <= start and end <= hi for lo, hi in regions)


def exercise(path: Path, original: bytes) -> None:
    """Open, read, write and unmap; every changed byte must belong to the image."""
    try:
        image = open_image(path, writable=True)
    except VhdError:
        return
    with image:
        total = image.total_sectors
        targets = sorted({0, 1, total // 2, max(total - 9, 0), max(total - 1, 0)})
        for lba in targets:
            count = min(9, total - lba)
            data = b"\xee" * 512 * count
            for op, args in ((image.read, (lba, count)), (image.write, (lba, data)),
                             (image.unmap, (lba, count)), (image.allocated, (lba, count))):
                with contextlib.suppress(VhdError):
                    op(*args)  # type: ignore[operator]
        after = path.read_bytes()
        for offset in range(0, min(len(original), len(after)), 512):
            if original[offset:offset + 512] != after[offset:offset + 512]:
                assert owned_by_image(image, offset, offset + 512), f"write at {offset}"


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(kind=st.sampled_from(["dynamic", "fixed"]), changes=mutations,
       cut=st.one_of(st.none(), st.integers(min_value=0)))
def test_fuzz_mutated_images(tmp_path: Path, kind: str, changes: list[tuple[int, int]],
                             cut: int | None) -> None:
    raw = bytearray(base_image(kind, tmp_path))
    # fields worth hitting: footer sizes/type/geometry, header offsets/entries/block size, BAT
    hot = [0, 8, 16, 24, 40, 48, 56, 60, 64, 512, 528, 540, 544, 1536, len(raw) - 512]
    for position, value in changes:
        spot = hot[position % len(hot)] + (position // len(hot)) % 40 if position % 3 else position
        raw[spot % len(raw)] = value
    fix_checksums(raw)
    if cut is not None:
        raw = raw[:cut % (len(raw) + 1)]
    path = tmp_path / "fuzz.vhd"
    path.write_bytes(bytes(raw))
    exercise(path, bytes(raw))
    os.unlink(path)


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.vhd"
    path.write_bytes(data)
    exercise(path, data)
    with contextlib.suppress(VhdError):
        check_image(path)
    os.unlink(path)


def fix_checksums(raw: bytearray) -> None:
    """Make mutated records pass their checksums, so the deeper checks get exercised."""
    for offset in (0, len(raw) - 512):
        if offset >= 0 and raw[offset:offset + 8] == b"conectix":
            raw[offset:offset + 512] = vhd.with_checksum(bytes(raw[offset:offset + 512]), 64)
    if raw[512:520] == b"cxsparse":
        raw[512:1536] = vhd.with_checksum(bytes(raw[512:1536]), 36)
