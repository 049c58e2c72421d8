"""VHD binary records: sizes, checksums, CHS geometry, the virtual-size rule, bitmaps."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhdshare import vhd
from vhdshare.vhd import (
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    MAX_CHS_SECTORS,
    VhdError,
    chs_geometry,
    new_dynamic_header,
    new_footer,
    parse_dynamic_header,
    parse_footer,
    validate_footer,
)


def test_record_sizes_are_the_spec_sizes() -> None:
    assert vhd.VHD_FOOTER.size == 512
    assert vhd.VHD_DYNAMIC_HEADER.size == 1024
    assert vhd.VHD_BAT_ENTRY.size == 4


def test_footer_round_trip_and_checksum() -> None:
    footer = new_footer(10 * 1024 * 1024, DISK_TYPE_DYNAMIC, 512)
    raw = footer.pack()
    assert len(raw) == 512
    assert raw[:8] == b"conectix"
    parsed = parse_footer(raw)
    assert dataclasses.replace(parsed, checksum=0) == dataclasses.replace(footer, checksum=0)
    # one's complement of the byte sum with the checksum field as zero
    expected = ~(sum(raw) - sum(raw[64:68])) & 0xFFFFFFFF
    assert int.from_bytes(raw[64:68], "big") == expected


def test_footer_is_big_endian() -> None:
    raw = new_footer(0x1234 * 512, DISK_TYPE_FIXED, vhd.NO_DATA_OFFSET).pack()
    assert raw[48:56] == (0x1234 * 512).to_bytes(8, "big")  # current_size
    assert raw[60:64] == (2).to_bytes(4, "big")  # disk type fixed


def test_bad_cookie_and_checksum_are_vhd_errors() -> None:
    raw = bytearray(new_footer(1 << 20, DISK_TYPE_FIXED, vhd.NO_DATA_OFFSET).pack())
    raw[100] ^= 1
    with pytest.raises(VhdError, match="checksum"):
        parse_footer(bytes(raw))
    with pytest.raises(VhdError, match="cookie"):
        parse_footer(b"x" * 512)
    with pytest.raises(VhdError, match="too short"):
        parse_footer(b"conectix")


@pytest.mark.parametrize(
    ("total_sectors", "chs"),
    [
        (20536, (302, 4, 17)),  # what qemu-img create makes of 10M
        (2097664, (2081, 16, 63)),  # qemu-img's 1G
        (5859504, (5813, 16, 63)),  # qemu-img's 3000000000
        (65535 * 16 * 63, (16191, 16, 255)),  # the 255-sector threshold (>=)
        (MAX_CHS_SECTORS + 12345, (65535, 16, 255)),  # clamped to the maximum
        (4 * 1024 * 17, (140, 16, 31)),  # 4 heads overflow: 31 sectors
    ],
)
def test_chs_geometry_matches_spec(total_sectors: int, chs: tuple[int, int, int]) -> None:
    geometry = chs_geometry(total_sectors)
    assert (geometry.cylinders, geometry.heads, geometry.sectors_per_track) == chs


@given(st.integers(min_value=1, max_value=MAX_CHS_SECTORS))
def test_chs_geometry_never_exceeds_the_disk(total_sectors: int) -> None:
    geometry = chs_geometry(total_sectors)
    assert geometry.total_sectors <= total_sectors
    assert geometry.cylinders <= 65535 and geometry.heads <= 16
    assert geometry.sectors_per_track in (17, 31, 63, 255)


def test_virtual_size_follows_qemu_rule() -> None:
    size = 10_000 * 1024  # not a CHS product
    ours = new_footer(size, DISK_TYPE_FIXED, vhd.NO_DATA_OFFSET)
    assert ours.virtual_size_bytes == size  # "win ": current_size counts
    vpc = dataclasses.replace(ours, creator_app=b"vpc ")
    assert vpc.virtual_size_bytes == ours.geometry.total_sectors * 512 < size
    huge = dataclasses.replace(vpc, cylinders=65535, heads=16, sectors_per_track=255)
    assert huge.virtual_size_bytes == size  # maximum geometry: current_size counts


def test_validate_refuses_differencing_unknown_and_absurd() -> None:
    footer = new_footer(1 << 20, DISK_TYPE_FIXED, vhd.NO_DATA_OFFSET)
    validate_footer(footer)
    with pytest.raises(VhdError, match="differencing"):
        validate_footer(dataclasses.replace(footer, disk_type=DISK_TYPE_DIFFERENCING))
    with pytest.raises(VhdError, match="disk type"):
        validate_footer(dataclasses.replace(footer, disk_type=7))
    with pytest.raises(VhdError, match="2040 GiB"):
        validate_footer(dataclasses.replace(footer, current_size=1 << 50))
    with pytest.raises(VhdError, match="multiple of 512"):
        validate_footer(dataclasses.replace(footer, current_size=1000))


def test_dynamic_header_round_trip_and_checks() -> None:
    header = new_dynamic_header(100 << 20, 1536)
    raw = header.pack()
    assert raw[:8] == b"cxsparse" and len(raw) == 1024
    assert parse_dynamic_header(raw).max_table_entries == 50
    for bad_block_size in (0, 3000, 1 << 30):
        bad = dataclasses.replace(header, block_size=bad_block_size).pack()
        with pytest.raises(VhdError, match="block size"):
            parse_dynamic_header(bad)
    damaged = bytearray(raw)
    damaged[40] ^= 0xFF
    with pytest.raises(VhdError, match="checksum"):
        parse_dynamic_header(bytes(damaged))


def test_bat_and_bitmap_helpers() -> None:
    assert vhd.bat_size_bytes(5) == 512 and vhd.bat_size_bytes(129) == 1024
    assert vhd.parse_bat(vhd.pack_bat([1, vhd.BAT_UNUSED])[:8]) == [1, vhd.BAT_UNUSED]
    assert vhd.pack_bat([7])[4:] == b"\xff" * 508
    assert vhd.sector_bitmap_size_bytes(2 << 20) == 512
    assert vhd.sector_bitmap_size_bytes(4096) == 512
    bitmap = bytearray(512)
    vhd.bitmap_set_range(bitmap, 0, 1)
    assert bitmap[0] == 0x80  # sector 0 is the most significant bit
    vhd.bitmap_set_range(bitmap, 1, 7)
    assert vhd.bitmap_get(bitmap, 7) and not vhd.bitmap_get(bitmap, 8)
    assert vhd.bitmap_full(bitmap, 8) and not vhd.bitmap_full(bitmap, 9)
