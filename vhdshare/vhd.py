"""Binary records of Microsoft's Virtual Hard Disk (VHD) format, spec version 1.0.

Every record is declared once as a `struct.Struct` named after the spec, with
its size asserted (the way CPython's zipfile does it); parsing and packing go
through these only. All integers are big-endian.

    fixed disk:    [ data (current_size bytes) ][ footer 512 ]
    dynamic disk:  [ footer copy 512 ][ dynamic header 1024 ][ BAT ... ]
                   [ bitmap | block ] ... [ footer 512 ]

Virtual size: Virtual PC derived the disk size from the CHS geometry, while
Hyper-V, Windows and most other tools use `current_size`. We follow qemu's
`vpc` driver so that both programs always agree on the size of any image:
`current_size` counts for images whose creator application is one of
CURRENT_SIZE_CREATORS or whose geometry is the maximum; for others (e.g.
"vpc ", "qemu") the CHS product counts. Images we create say "win " (the
Windows convention: `current_size` is authoritative), so any size that is a
multiple of 512 round-trips exactly, including sizes the geometry cannot express.
"""

from __future__ import annotations

import dataclasses
import struct
import time
import uuid
from dataclasses import dataclass

from vhdshare.blockimage import SECTOR_SIZE, ImageError


class VhdError(ImageError):
    """A VHD image is corrupt, unsupported, or cannot do what was asked."""


# Hard disk footer (spec "Hard Disk Footer Format"): 512 bytes.
VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
assert VHD_FOOTER.size == 512
FOOTER_CHECKSUM_OFFSET = 64

# Dynamic disk header (spec "Dynamic Disk Header Format"): 1024 bytes.
# The eight parent locator entries (24 bytes each) are kept as one opaque field.
VHD_DYNAMIC_HEADER = struct.Struct(">8sQQIIII16sII512s192s256x")
assert VHD_DYNAMIC_HEADER.size == 1024
DYNAMIC_HEADER_CHECKSUM_OFFSET = 36

# One block allocation table entry: the sector offset of a block's bitmap.
VHD_BAT_ENTRY = struct.Struct(">I")
assert VHD_BAT_ENTRY.size == 4
BAT_UNUSED = 0xFFFFFFFF

FOOTER_COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
FEATURES_RESERVED = 0x00000002
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
VHD_EPOCH_UNIX_S = 946684800  # 2000-01-01T00:00:00Z

DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_TYPE_FIXED: "fixed", DISK_TYPE_DYNAMIC: "dynamic",
                   DISK_TYPE_DIFFERENCING: "differencing"}

MAX_CHS_SECTORS = 65535 * 16 * 255
MAX_SIZE_BYTES = 0xFF000000 * SECTOR_SIZE  # 2040 GiB, the limit qemu and Hyper-V share
DEFAULT_BLOCK_SIZE_BYTES = 2 * 1024 * 1024
MAX_BLOCK_SIZE_BYTES = 256 * 1024 * 1024
# The BAT is held in memory, so its length is bounded: enough for the largest disk in
# blocks of 512 KiB (every tool we know writes 2 MiB blocks); a hostile header asking
# for more (tiny blocks on a huge disk) is refused instead of exhausting memory.
MAX_BAT_ENTRIES = MAX_SIZE_BYTES // (512 * 1024)
CURRENT_SIZE_CREATORS = frozenset({b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\x00"})
OUR_CREATOR_APP = b"win "
OUR_CREATOR_VERSION = 0x000A0000
OUR_CREATOR_OS = b"Wi2k"


def vhd_checksum(record: bytes, checksum_offset: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field counted as zero."""
    total = sum(record) - sum(record[checksum_offset:checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def with_checksum(record: bytes, checksum_offset: int) -> bytes:
    """`record` with its checksum field set to the correct value."""
    checksum = vhd_checksum(record, checksum_offset).to_bytes(4, "big")
    return record[:checksum_offset] + checksum + record[checksum_offset + 4:]


@dataclass(frozen=True)
class Geometry:
    cylinders: int
    heads: int
    sectors_per_track: int

    @property
    def total_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track


def chs_geometry(total_sectors: int) -> Geometry:
    """CHS geometry for a disk of `total_sectors`, exactly the spec's algorithm.

    The product may be less than `total_sectors` (the geometry rounds down).
    """
    total_sectors = min(total_sectors, MAX_CHS_SECTORS)
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track, heads = 255, 16
        cylinder_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinder_times_heads = total_sectors // sectors_per_track
        heads = max((cylinder_times_heads + 1023) // 1024, 4)
        if cylinder_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track, heads = 31, 16
            cylinder_times_heads = total_sectors // sectors_per_track
        if cylinder_times_heads >= heads * 1024:
            sectors_per_track, heads = 63, 16
            cylinder_times_heads = total_sectors // sectors_per_track
    return Geometry(cylinder_times_heads // heads, heads, sectors_per_track)


@dataclass(frozen=True)
class Footer:
    """The hard disk footer; `checksum` is recomputed by `pack`."""

    cookie: bytes
    features: int
    format_version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cylinders, self.heads, self.sectors_per_track)

    @property
    def virtual_size_bytes(self) -> int:
        """The disk size as qemu's vpc driver (and therefore we) see it."""
        chs_sectors = self.geometry.total_sectors
        if (self.creator_app in CURRENT_SIZE_CREATORS or chs_sectors == MAX_CHS_SECTORS
                or chs_sectors == 0):
            return self.current_size
        return chs_sectors * SECTOR_SIZE

    def pack(self) -> bytes:
        return with_checksum(VHD_FOOTER.pack(*dataclasses.astuple(self)), FOOTER_CHECKSUM_OFFSET)


def parse_footer(raw: bytes) -> Footer:
    """Decode a footer; a wrong cookie or checksum is a VhdError."""
    if len(raw) != VHD_FOOTER.size:
        raise VhdError("file too short for a VHD footer")
    footer = Footer(*VHD_FOOTER.unpack(raw))
    if footer.cookie != FOOTER_COOKIE:
        raise VhdError("no VHD footer (cookie 'conectix' missing)")
    if footer.checksum != vhd_checksum(raw, FOOTER_CHECKSUM_OFFSET):
        raise VhdError("VHD footer checksum is wrong")
    return footer


def validate_footer(footer: Footer) -> None:
    """Refuse footers we must not act on: unknown types, differencing disks, absurd sizes."""
    if footer.disk_type == DISK_TYPE_DIFFERENCING:
        raise VhdError("differencing VHDs are not supported (merge it into its parent first)")
    if footer.disk_type not in (DISK_TYPE_FIXED, DISK_TYPE_DYNAMIC):
        raise VhdError(f"unknown VHD disk type {footer.disk_type}")
    if footer.format_version >> 16 != FORMAT_VERSION >> 16:
        raise VhdError(f"unsupported VHD format version {footer.format_version:#010x}")
    size_bytes = footer.virtual_size_bytes
    if size_bytes % SECTOR_SIZE:
        raise VhdError(f"VHD size {size_bytes} is not a multiple of 512")
    if size_bytes > MAX_SIZE_BYTES:
        raise VhdError(f"VHD size {size_bytes} exceeds the format's limit of 2040 GiB")


def new_footer(size_bytes: int, disk_type: int, data_offset: int) -> Footer:
    """A footer for a disk we create now."""
    geometry = chs_geometry(size_bytes // SECTOR_SIZE)
    return Footer(
        cookie=FOOTER_COOKIE, features=FEATURES_RESERVED, format_version=FORMAT_VERSION,
        data_offset=data_offset, timestamp=vhd_timestamp(), creator_app=OUR_CREATOR_APP,
        creator_version=OUR_CREATOR_VERSION, creator_os=OUR_CREATOR_OS,
        original_size=size_bytes, current_size=size_bytes, cylinders=geometry.cylinders,
        heads=geometry.heads, sectors_per_track=geometry.sectors_per_track,
        disk_type=disk_type, checksum=0, unique_id=uuid.uuid4().bytes, saved_state=0,
    )


def vhd_timestamp() -> int:
    """Seconds since 2000-01-01 UTC, clamped to the 32-bit field."""
    return max(0, min(int(time.time()) - VHD_EPOCH_UNIX_S, 0xFFFFFFFF))


@dataclass(frozen=True)
class DynamicHeader:
    """The dynamic disk header; `checksum` is recomputed by `pack`."""

    cookie: bytes
    data_offset: int
    table_offset: int
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: bytes
    parent_timestamp: int
    reserved1: int
    parent_unicode_name: bytes
    parent_locators: bytes

    @property
    def bitmap_size_bytes(self) -> int:
        return sector_bitmap_size_bytes(self.block_size)

    def pack(self) -> bytes:
        raw = VHD_DYNAMIC_HEADER.pack(*dataclasses.astuple(self))
        return with_checksum(raw, DYNAMIC_HEADER_CHECKSUM_OFFSET)


def parse_dynamic_header(raw: bytes) -> DynamicHeader:
    """Decode and sanity-check a dynamic disk header."""
    if len(raw) != VHD_DYNAMIC_HEADER.size:
        raise VhdError("file too short for the VHD dynamic disk header")
    header = DynamicHeader(*VHD_DYNAMIC_HEADER.unpack(raw))
    if header.cookie != DYNAMIC_COOKIE:
        raise VhdError("no VHD dynamic disk header (cookie 'cxsparse' missing)")
    if header.checksum != vhd_checksum(raw, DYNAMIC_HEADER_CHECKSUM_OFFSET):
        raise VhdError("VHD dynamic disk header checksum is wrong")
    if header.header_version >> 16 != HEADER_VERSION >> 16:
        raise VhdError(f"unsupported dynamic header version {header.header_version:#010x}")
    block_size = header.block_size
    if not SECTOR_SIZE <= block_size <= MAX_BLOCK_SIZE_BYTES or block_size & (block_size - 1):
        raise VhdError(f"VHD block size {block_size} is not a power of two in 512 B..256 MiB")
    if header.table_offset % SECTOR_SIZE:
        raise VhdError("VHD block allocation table is not sector-aligned")
    return header


def new_dynamic_header(size_bytes: int, table_offset: int,
                       block_size: int = DEFAULT_BLOCK_SIZE_BYTES) -> DynamicHeader:
    return DynamicHeader(
        cookie=DYNAMIC_COOKIE, data_offset=NO_DATA_OFFSET, table_offset=table_offset,
        header_version=HEADER_VERSION, max_table_entries=-(-size_bytes // block_size),
        block_size=block_size, checksum=0, parent_unique_id=bytes(16), parent_timestamp=0,
        reserved1=0, parent_unicode_name=bytes(512), parent_locators=bytes(192),
    )


def bat_size_bytes(entries: int) -> int:
    """Bytes the BAT occupies on disk: 4 per entry, padded to whole sectors."""
    return -(-entries * VHD_BAT_ENTRY.size // SECTOR_SIZE) * SECTOR_SIZE


def parse_bat(raw: bytes) -> list[int]:
    return [entry for (entry,) in VHD_BAT_ENTRY.iter_unpack(raw)]


def pack_bat(entries: list[int]) -> bytes:
    raw = b"".join(VHD_BAT_ENTRY.pack(entry) for entry in entries)
    return raw + b"\xff" * (bat_size_bytes(len(entries)) - len(raw))


def sector_bitmap_size_bytes(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit per sector, padded to whole sectors."""
    bits = block_size // SECTOR_SIZE
    return -(-bits // (8 * SECTOR_SIZE)) * SECTOR_SIZE


def bitmap_get(bitmap: bytes | bytearray, sector: int) -> bool:
    """Is `sector` of a block marked in use? Bit 7 of byte 0 is sector 0."""
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))


def bitmap_set_range(bitmap: bytearray, first_sector: int, count: int) -> None:
    """Mark sectors [first, first+count) of a block in use."""
    for sector in range(first_sector, first_sector + count):
        bitmap[sector >> 3] |= 0x80 >> (sector & 7)


def bitmap_full(bitmap: bytes | bytearray, sectors: int) -> bool:
    """Are all `sectors` of the block marked in use?"""
    whole, rest = divmod(sectors, 8)
    if bitmap[:whole].count(0xFF) != whole:
        return False
    return rest == 0 or bitmap[whole] & (0xFF << (8 - rest)) & 0xFF == (0xFF << (8 - rest)) & 0xFF
