"""Dynamic (sparse) VHD images: the block allocation table, sector bitmaps and growth.

Theory of operation. The virtual disk is cut into blocks (2 MiB by default). The
BAT maps block n to the sector where its sector bitmap starts; the block's data
follows the bitmap. Unallocated blocks read as zeros. Sectors whose bitmap bit is
clear read as zeros too (the spec's meaning for dynamic disks). We set every bit
when we allocate a block, as qemu does, because the fresh block is all zeros.

Growth keeps the file valid at every instant, so a crash never leaves the BAT
pointing at garbage:
  1. write the footer at the new end of file (the old footer is still in place),
  2. write the block's bitmap and data over the old footer position,
  3. fdatasync, so the block is durable before anything refers to it,
  4. write the BAT entry.
A crash before 4 leaves unreferenced space, which is harmless. Unmapping a whole
block clears its BAT entry first (synced), then frees its space; the slot is
reused by the next allocation of this session.

Sharing (`shared=True`): the nodes of a cluster write one disk at once, each through its
own open file and its own cached BAT. Three rules keep those caches true:
  - a BAT entry only ever goes from unused to allocated, and an allocated block never moves:
    a shared disk's unmap zeroes data (punches holes) but never frees a block;
  - an entry cached as unused is read again from the file before it is believed;
  - growth (steps 1-4 above) runs under an exclusive lock on one byte far past any data
    (`GROWTH_LOCK_OFFSET`), an OFD lock that every open of the file sees and that dies with
    its holder; under it the writer reads the entry and the end of the file afresh.
Sector bitmaps that are not full are never cached, and are changed under the same lock.

Safety against hostile images: `load_layout` checks the header, the BAT and every
allocated block (inside the file, before the trailing footer, not overlapping the
metadata or each other) before any I/O; afterwards every file offset we touch is
derived from those checked regions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from clusterfs.pieces import Buffer
from vhdshare.blockimage import (
    SECTOR_SIZE,
    append_run,
    byte_lock,
    check_range,
    check_write_data,
    pread_exact,
    pwrite_all,
    zero_range,
)
from vhdshare.vhd import (
    BAT_UNUSED,
    MAX_BAT_ENTRIES,
    VHD_BAT_ENTRY,
    VHD_DYNAMIC_HEADER,
    VHD_FOOTER,
    DynamicHeader,
    Footer,
    VhdError,
    bat_size_bytes,
    bitmap_full,
    bitmap_get,
    bitmap_set_range,
    parse_bat,
    parse_dynamic_header,
)
from vhdshare.vhdfile import VhdFile, os_errors_as_vhd

Region = tuple[int, int, str]  # (start_bytes, end_bytes, what)
GROWTH_LOCK_OFFSET = 1 << 62  # far past the largest VHD (2040 GiB)


@dataclass(frozen=True)
class Layout:
    """The checked metadata of a dynamic disk."""

    header: DynamicHeader
    bat: list[int]  # one entry per block of the virtual disk
    regions: list[Region]  # metadata and allocated blocks, sorted by start

    @property
    def end_bytes(self) -> int:
        """Where the trailing footer belongs: after all metadata and blocks."""
        return max(end for _, end, _ in self.regions)


def load_layout(fd: int, footer: Footer, size_bytes: int, data_limit_bytes: int) -> Layout:
    """Read and check the header and BAT; every region must end by `data_limit_bytes`."""
    header_offset = footer.data_offset
    header_end = header_offset + VHD_DYNAMIC_HEADER.size
    if header_offset < VHD_FOOTER.size or header_end > data_limit_bytes:
        raise VhdError(f"dynamic disk header offset {header_offset} is outside the file")
    header = parse_dynamic_header(pread_exact(fd, VHD_DYNAMIC_HEADER.size, header_offset, VhdError))
    blocks_needed = -(-size_bytes // header.block_size)
    if blocks_needed > MAX_BAT_ENTRIES:
        raise VhdError(f"a disk of {size_bytes} bytes in blocks of {header.block_size} bytes "
                       f"needs {blocks_needed} BAT entries, more than the {MAX_BAT_ENTRIES} "
                       "vhdshare supports")
    if header.max_table_entries < blocks_needed:
        raise VhdError(f"block allocation table has {header.max_table_entries} entries, "
                       f"the disk size needs {blocks_needed}")
    table_end = header.table_offset + bat_size_bytes(header.max_table_entries)
    if table_end > data_limit_bytes:
        raise VhdError("block allocation table extends past the end of the file")
    raw_bat = pread_exact(fd, blocks_needed * VHD_BAT_ENTRY.size, header.table_offset, VhdError)
    bat = parse_bat(raw_bat)
    regions: list[Region] = [
        (0, VHD_FOOTER.size, "the footer copy"),
        (header_offset, header_offset + VHD_DYNAMIC_HEADER.size, "the dynamic disk header"),
        (header.table_offset, table_end, "the block allocation table"),
    ]
    regions += block_regions(bat, header, data_limit_bytes)
    regions.sort()
    check_overlaps(regions)
    return Layout(header, bat, regions)


def block_regions(bat: list[int], header: DynamicHeader, data_limit_bytes: int) -> list[Region]:
    """The byte regions of allocated blocks; a block past the limit is a VhdError."""
    span_bytes = header.bitmap_size_bytes + header.block_size
    regions: list[Region] = []
    for index, entry in enumerate(bat):
        if entry == BAT_UNUSED:
            continue
        start = entry * SECTOR_SIZE
        if start + span_bytes > data_limit_bytes:
            raise VhdError(f"BAT entry {index} points past the end of the image data")
        regions.append((start, start + span_bytes, f"block {index}"))
    return regions


def check_overlaps(sorted_regions: list[Region]) -> None:
    """VhdError if any two regions share a byte."""
    far_end, far_what = 0, ""
    for start, end, what in sorted_regions:
        if start < far_end:
            raise VhdError(f"{what} overlaps {far_what}")
        if end > far_end:
            far_end, far_what = end, what


class DynamicImage(VhdFile):
    """A dynamic VHD, read and written by sector."""

    def __init__(self, fd: int, path: str, footer: Footer, file_size_bytes: int,
                 writable: bool, shared: bool = False) -> None:
        super().__init__(fd, path, footer, file_size_bytes, writable, shared)
        trailing_offset = file_size_bytes - VHD_FOOTER.size
        layout = load_layout(fd, footer, self.size_bytes, trailing_offset)
        self.header = layout.header
        self.block_size_bytes = layout.header.block_size
        self.bitmap_size_bytes = layout.header.bitmap_size_bytes
        self.sectors_per_block = self.block_size_bytes // SECTOR_SIZE
        self._bat = layout.bat
        self._footer_raw = footer.pack()  # what was checked (the file may change meanwhile)
        self._end_offset = trailing_offset  # the trailing footer; new blocks go here
        self._bitmaps: dict[int, bytearray | None] = {}  # None: every sector in use
        self._free_slots: list[int] = []
        table_end = self.header.table_offset + bat_size_bytes(self.header.max_table_entries)
        self._data_start = max(table_end, footer.data_offset + VHD_DYNAMIC_HEADER.size)

    # -- the BlockImage interface ------------------------------------------------

    @os_errors_as_vhd
    def read(self, lba: int, count: int) -> bytes:
        check_range(lba, count, self.size_bytes, VhdError)
        block, first = divmod(lba, self.sectors_per_block)
        if first + count <= self.sectors_per_block:  # the common case: one block
            return self._read_in_block(block, first, count)
        return b"".join(self._read_in_block(block, first, n)
                        for block, first, n in self._split(lba, count))

    @os_errors_as_vhd
    def write(self, lba: int, data: Buffer) -> None:
        self._check_writable()
        count = check_write_data(data, VhdError)
        check_range(lba, count, self.size_bytes, VhdError)
        view = memoryview(data)
        for block, first, n in self._split(lba, count):
            self._write_in_block(block, first, view[:n * SECTOR_SIZE])
            view = view[n * SECTOR_SIZE:]

    @os_errors_as_vhd
    def unmap(self, lba: int, count: int) -> None:
        self._check_writable()
        check_range(lba, count, self.size_bytes, VhdError)
        for block, first, n in self._split(lba, count):
            if self._entry(block) == BAT_UNUSED:
                continue
            if n == self.sectors_per_block and not self.shared:
                self._free_block(block)
            else:
                zero_range(self._fd, self._data_offset(block, first), n * SECTOR_SIZE)

    def allocated(self, lba: int, count: int) -> list[tuple[int, int, bool]]:
        check_range(lba, count, self.size_bytes, VhdError)
        runs: list[tuple[int, int, bool]] = []
        for block, first, n in self._split(lba, count):
            start = block * self.sectors_per_block + first
            append_run(runs, start, n, self._entry(block) != BAT_UNUSED)
        return runs

    # -- inspection --------------------------------------------------------------

    @property
    def allocated_blocks(self) -> int:
        return sum(1 for entry in self._bat if entry != BAT_UNUSED)

    def owned_regions(self) -> list[tuple[int, int]]:
        """Byte ranges of the file that belong to this image (for safety tests)."""
        span = self.bitmap_size_bytes + self.block_size_bytes
        table_end = self.header.table_offset + bat_size_bytes(self.header.max_table_entries)
        regions = [(0, VHD_FOOTER.size), (self.footer.data_offset, self.footer.data_offset + 1024),
                   (self.header.table_offset, table_end),
                   (self._end_offset, self._end_offset + VHD_FOOTER.size)]
        regions += [(e * SECTOR_SIZE, e * SECTOR_SIZE + span) for e in self._bat if e != BAT_UNUSED]
        return sorted(regions)

    def info(self) -> dict[str, Any]:
        facts = super().info()
        facts.update(block_size_bytes=self.block_size_bytes, blocks_total=len(self._bat),
                     blocks_allocated=self.allocated_blocks,
                     table_offset_bytes=self.header.table_offset,
                     max_table_entries=self.header.max_table_entries)
        return facts

    # -- blocks ------------------------------------------------------------------

    def _split(self, lba: int, count: int) -> Iterator[tuple[int, int, int]]:
        """Cut sectors [lba, lba+count) into (block, first sector in block, count) pieces."""
        while count > 0:
            block, first = divmod(lba, self.sectors_per_block)
            n = min(count, self.sectors_per_block - first)
            yield block, first, n
            lba += n
            count -= n

    def _entry(self, block: int) -> int:
        """The BAT entry of `block`; a shared disk's unused entry is read again first."""
        entry = self._bat[block]
        if entry == BAT_UNUSED and self.shared:
            entry = self._reread_entry(block)
        return entry

    def _reread_entry(self, block: int) -> int:
        offset = self.header.table_offset + block * VHD_BAT_ENTRY.size
        (entry,) = VHD_BAT_ENTRY.unpack(self._read_exact(VHD_BAT_ENTRY.size, offset))
        if entry != BAT_UNUSED:
            start = entry * SECTOR_SIZE
            end = start + self.bitmap_size_bytes + self.block_size_bytes
            if start < self._data_start or end > os.fstat(self._fd).st_size - VHD_FOOTER.size:
                raise VhdError(f"BAT entry {block}, written by another writer, points outside "
                               "the image's data")
            self._bat[block] = entry
        return int(entry)

    def _data_offset(self, block: int, first_sector: int) -> int:
        return self._bat[block] * SECTOR_SIZE + self.bitmap_size_bytes + first_sector * SECTOR_SIZE

    def _bitmap(self, block: int) -> bytearray | None:
        """The block's sector bitmap, None when every bit is set. Another writer may set
        bits of a shared disk's partial bitmap, so only full ones are cached then."""
        if block in self._bitmaps:
            return self._bitmaps[block]
        raw = self._read_exact(self.bitmap_size_bytes, self._bat[block] * SECTOR_SIZE)
        bitmap = None if bitmap_full(raw, self.sectors_per_block) else bytearray(raw)
        if bitmap is None or not self.shared:
            self._bitmaps[block] = bitmap
        return bitmap

    def _read_in_block(self, block: int, first: int, n: int) -> bytes:
        if self._entry(block) == BAT_UNUSED:
            return bytes(n * SECTOR_SIZE)
        data = self._read_exact(n * SECTOR_SIZE, self._data_offset(block, first))
        bitmap = self._bitmap(block)
        if bitmap is None:
            return data
        out = bytearray(data)
        for i in range(n):
            if not bitmap_get(bitmap, first + i):
                out[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] = bytes(SECTOR_SIZE)
        return bytes(out)

    def _write_in_block(self, block: int, first: int, data: memoryview) -> None:
        if self._entry(block) == BAT_UNUSED:
            if not self.shared:
                self._allocate(block, first, data)
                return
            with byte_lock(self._fd, GROWTH_LOCK_OFFSET):
                if self._reread_entry(block) == BAT_UNUSED:
                    # Others may have grown the file since we looked: its end is ours now.
                    self._end_offset = os.fstat(self._fd).st_size - VHD_FOOTER.size
                    if self._end_offset % SECTOR_SIZE:
                        raise VhdError("the file does not end in a sector-aligned footer")
                    self._allocate(block, first, data)
                    return
        pwrite_all(self._fd, data, self._data_offset(block, first))
        if self._bitmap(block) is None:
            return
        if not self.shared:
            self._mark_written(block, first, len(data) // SECTOR_SIZE)
            return
        with byte_lock(self._fd, GROWTH_LOCK_OFFSET):
            self._mark_written(block, first, len(data) // SECTOR_SIZE)

    def _mark_written(self, block: int, first: int, count: int) -> None:
        bitmap = self._bitmap(block)
        if bitmap is None:
            return
        bitmap_set_range(bitmap, first, count)
        pwrite_all(self._fd, bitmap, self._bat[block] * SECTOR_SIZE)
        if bitmap_full(bitmap, self.sectors_per_block):
            self._bitmaps[block] = None

    def _allocate(self, block: int, first: int, data: memoryview) -> None:
        """Give `block` space, fill it with `data` at sector `first`, then point the BAT at it."""
        appending = not self._free_slots
        offset = self._end_offset if appending else self._free_slots.pop()
        new_end = offset + self.bitmap_size_bytes + self.block_size_bytes
        if appending:
            pwrite_all(self._fd, self._footer_raw, new_end)
        pwrite_all(self._fd, b"\xff" * self.bitmap_size_bytes, offset)
        pwrite_all(self._fd, data, offset + self.bitmap_size_bytes + first * SECTOR_SIZE)
        os.fdatasync(self._fd)
        self._set_bat_entry(block, offset // SECTOR_SIZE)
        self._bitmaps[block] = None
        if appending:
            self._end_offset = new_end
            self.file_size_bytes = new_end + VHD_FOOTER.size

    def _free_block(self, block: int) -> None:
        """Deallocate a whole block: unlink it from the BAT (durably), then free its space."""
        offset = self._bat[block] * SECTOR_SIZE
        self._set_bat_entry(block, BAT_UNUSED)
        os.fdatasync(self._fd)
        zero_range(self._fd, offset, self.bitmap_size_bytes + self.block_size_bytes)
        self._bitmaps.pop(block, None)
        self._free_slots.append(offset)

    def _set_bat_entry(self, block: int, entry: int) -> None:
        entry_offset = self.header.table_offset + block * VHD_BAT_ENTRY.size
        pwrite_all(self._fd, VHD_BAT_ENTRY.pack(entry), entry_offset)
        self._bat[block] = entry
