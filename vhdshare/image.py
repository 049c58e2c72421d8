"""Open and create VHD images (fixed and dynamic) as `BlockImage`s.

A fixed VHD is the raw disk followed by a 512-byte footer, so sector n is at
byte n*512. Dynamic disks live in `vhdshare.dynamic`. `open_block_image` picks
VHD or raw by looking for the `conectix` cookie, which is how the SCSI target
and `vhdshare convert` open whatever file they are given.

Creating writes the metadata first and the trailing footer last, and an
interrupted create removes its half-made file.
"""

from __future__ import annotations

import os
from typing import Any

from clusterfs.pieces import Buffer
from vhdshare import directio
from vhdshare.blockimage import (
    SECTOR_SIZE,
    BlockImage,
    RawImage,
    byte_lock,
    check_range,
    check_write_data,
    data_runs,
    fill_gaps,
    pwrite_all,
    sector_runs,
    zero_range,
)
from vhdshare.dynamic import GROWTH_LOCK_OFFSET, DynamicImage
from vhdshare.vhd import (
    BAT_UNUSED,
    DEFAULT_BLOCK_SIZE_BYTES,
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    FOOTER_COOKIE,
    MAX_BAT_ENTRIES,
    MAX_SIZE_BYTES,
    NO_DATA_OFFSET,
    VHD_DYNAMIC_HEADER,
    VHD_FOOTER,
    VhdError,
    bat_size_bytes,
    new_dynamic_header,
    new_footer,
    pack_bat,
    parse_dynamic_header,
    validate_footer,
)
from vhdshare.vhdfile import VhdFile, os_errors_as_vhd, read_trailing_footer

DISK_TYPES = {"fixed": DISK_TYPE_FIXED, "dynamic": DISK_TYPE_DYNAMIC}
DYNAMIC_TABLE_OFFSET = VHD_FOOTER.size + VHD_DYNAMIC_HEADER.size  # 1536, as qemu and Hyper-V


class FixedImage(VhdFile):
    """A fixed VHD: the disk's bytes, then the footer."""

    writes_in_place = True

    def __init__(self, fd: int, path: str, footer: Any, file_size_bytes: int,
                 writable: bool, shared: bool = False) -> None:
        super().__init__(fd, path, footer, file_size_bytes, writable, shared)
        if self.size_bytes > file_size_bytes - VHD_FOOTER.size:
            raise VhdError(f"fixed VHD of {self.size_bytes} bytes is stored in a file of only "
                           f"{file_size_bytes} bytes (truncated?)")

    @os_errors_as_vhd
    def read(self, lba: int, count: int) -> bytes:
        check_range(lba, count, self.size_bytes, VhdError)
        return self._read_exact(count * SECTOR_SIZE, lba * SECTOR_SIZE)

    @os_errors_as_vhd
    def write(self, lba: int, data: Buffer) -> None:
        self._check_writable()
        count = check_write_data(data, VhdError)
        check_range(lba, count, self.size_bytes, VhdError)
        pwrite_all(self._fd, data, lba * SECTOR_SIZE)

    @os_errors_as_vhd
    def unmap(self, lba: int, count: int) -> None:
        self._check_writable()
        check_range(lba, count, self.size_bytes, VhdError)
        zero_range(self._fd, lba * SECTOR_SIZE, count * SECTOR_SIZE)

    @os_errors_as_vhd
    def allocated(self, lba: int, count: int) -> list[tuple[int, int, bool]]:
        check_range(lba, count, self.size_bytes, VhdError)
        byte_runs = data_runs(self._fd, lba * SECTOR_SIZE, count * SECTOR_SIZE)
        runs = sector_runs(byte_runs, lba * SECTOR_SIZE)
        return fill_gaps([(first + lba, n, flag) for first, n, flag in runs], lba, count)

    def owned_regions(self) -> list[tuple[int, int]]:
        """Byte ranges of the file that belong to this image (for safety tests)."""
        return [(0, self.size_bytes),
                (self.file_size_bytes - VHD_FOOTER.size, self.file_size_bytes)]


VhdImage = FixedImage | DynamicImage


def open_image(path: str | os.PathLike[str], writable: bool = False,
               shared: bool = False, direct: bool = False) -> VhdImage:
    """Open a fixed or dynamic VHD; anything wrong with it is a VhdError. `shared`: other
    processes write the file at the same time (see `vhdshare.dynamic`, "Sharing");
    `direct`: bypass the page cache where the file system allows (`vhdshare.directio`)."""
    name = os.fspath(path)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        fd = directio.open_direct(name, flags) if direct else os.open(name, flags)
    except OSError as exc:
        raise VhdError(f"cannot open {name}: {exc.strerror}") from None
    try:
        if not shared:
            return _open_fd(fd, name, writable, shared)
        # Another writer may be growing the disk: read its end and its BAT while none is.
        with byte_lock(fd, GROWTH_LOCK_OFFSET):
            return _open_fd(fd, name, writable, shared)
    except BaseException:
        os.close(fd)
        raise


@os_errors_as_vhd
def _open_fd(fd: int, name: str, writable: bool, shared: bool) -> VhdImage:
    file_size_bytes = os.fstat(fd).st_size
    footer = read_trailing_footer(fd, file_size_bytes)
    validate_footer(footer)
    image_class = FixedImage if footer.disk_type == DISK_TYPE_FIXED else DynamicImage
    return image_class(fd, name, footer, file_size_bytes, writable, shared)


def looks_like_vhd(path: str | os.PathLike[str]) -> bool:
    """Does the file carry a VHD footer cookie at its end or (dynamic copy) its start?"""
    try:
        with open(path, "rb") as file:
            head = file.read(len(FOOTER_COOKIE))
            size = file.seek(0, os.SEEK_END)
            if size < VHD_FOOTER.size:
                return False
            file.seek(size - VHD_FOOTER.size)
            return FOOTER_COOKIE in (head, file.read(len(FOOTER_COOKIE)))
    except OSError as exc:
        raise VhdError(f"cannot open {os.fspath(path)}: {exc.strerror}") from None


def open_block_image(path: str | os.PathLike[str], writable: bool = False,
                     shared: bool = False, direct: bool = False) -> BlockImage:
    """A VHD if the file looks like one, otherwise the file as a raw disk."""
    if looks_like_vhd(path):
        return open_image(path, writable, shared, direct)
    return RawImage(path, writable, direct)


def check_new_size(size_bytes: int) -> None:
    if size_bytes <= 0:
        raise VhdError("disk size must be positive")
    if size_bytes % SECTOR_SIZE:
        raise VhdError(f"disk size {size_bytes} is not a multiple of 512 bytes")
    if size_bytes > MAX_SIZE_BYTES:
        raise VhdError(f"disk size {size_bytes} exceeds the VHD limit of 2040 GiB")


def create_image(path: str | os.PathLike[str], size_bytes: int, disk_type: str = "dynamic",
                 block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES) -> None:
    """Create a new, empty VHD; an existing file is an error, never overwritten.

    `block_size_bytes` (dynamic disks) is a power of two; 2 MiB is what every tool uses.
    """
    if disk_type not in DISK_TYPES:
        raise VhdError(f"unknown disk type {disk_type!r} (fixed or dynamic)")
    check_new_size(size_bytes)
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise VhdError(f"cannot create {name}: {exc.strerror}") from None
    try:
        if disk_type == "fixed":
            _write_fixed(fd, size_bytes)
        else:
            _write_dynamic(fd, size_bytes, block_size_bytes)
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        os.unlink(name)
        if isinstance(exc, OSError):
            raise VhdError(f"cannot create {name}: {exc.strerror}") from None
        raise
    os.close(fd)


def _write_fixed(fd: int, size_bytes: int) -> None:
    os.ftruncate(fd, size_bytes)
    pwrite_all(fd, new_footer(size_bytes, DISK_TYPE_FIXED, NO_DATA_OFFSET).pack(), size_bytes)


def _write_dynamic(fd: int, size_bytes: int, block_size_bytes: int) -> None:
    header = new_dynamic_header(size_bytes, DYNAMIC_TABLE_OFFSET, block_size_bytes)
    parse_dynamic_header(header.pack())  # refuses a bad block size before anything is written
    if header.max_table_entries > MAX_BAT_ENTRIES:
        raise VhdError(f"block size {block_size_bytes} is too small for a disk of {size_bytes} "
                       "bytes")
    footer = new_footer(size_bytes, DISK_TYPE_DYNAMIC, VHD_FOOTER.size).pack()
    entries = header.max_table_entries
    pwrite_all(fd, footer, 0)
    pwrite_all(fd, header.pack(), VHD_FOOTER.size)
    pwrite_all(fd, pack_bat([BAT_UNUSED] * entries), DYNAMIC_TABLE_OFFSET)
    pwrite_all(fd, footer, DYNAMIC_TABLE_OFFSET + bat_size_bytes(entries))
