"""`vhdshare convert`: copy a disk between raw, fixed VHD and dynamic VHD, sparsely.

Only what the source says is allocated is read, and of that only chunks that are
not all zeros are written; the destination starts out all zeros (a sparse file
or an empty dynamic disk), so skipped chunks cost nothing and stay unallocated.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vhdshare.blockimage import SECTOR_SIZE, BlockImage, ImageError, RawImage
from vhdshare.image import create_image, open_block_image, open_image

CHUNK_SECTORS = 2048  # 1 MiB
TARGET_TYPES = ("fixed", "dynamic", "raw")
_ZEROS = bytes(CHUNK_SECTORS * SECTOR_SIZE)

Progress = Callable[[int, int], None]  # (sectors done, sectors total)


def convert(src_path: str, dst_path: str, dst_type: str, progress: Progress | None = None) -> None:
    """Make `dst_path` (which must not exist) a `dst_type` copy of the disk in `src_path`."""
    if dst_type not in TARGET_TYPES:
        raise ImageError(f"unknown target type {dst_type!r} (fixed, dynamic or raw)")
    if os.path.lexists(dst_path):
        raise ImageError(f"{dst_path} already exists; refusing to overwrite it")
    src = open_block_image(src_path)
    try:
        dst = _create_target(dst_path, dst_type, src.size_bytes)
        try:
            copy_sparse(src, dst, progress)
            dst.flush()
        except BaseException:
            dst.close()
            os.unlink(dst_path)
            raise
        dst.close()
    finally:
        src.close()


def _create_target(path: str, dst_type: str, size_bytes: int) -> BlockImage:
    if dst_type == "raw":
        return RawImage.create(path, size_bytes)
    create_image(path, size_bytes, dst_type)
    return open_image(path, writable=True)


def copy_sparse(src: BlockImage, dst: BlockImage, progress: Progress | None = None) -> None:
    """Copy every non-zero chunk of `src` to the same place in the all-zero `dst`."""
    total_sectors = src.size_bytes // SECTOR_SIZE
    if dst.size_bytes < src.size_bytes:
        raise ImageError("destination is smaller than the source")
    for lba, count, allocated in src.allocated(0, total_sectors):
        if allocated:
            _copy_run(src, dst, lba, count, progress, total_sectors)
        if progress is not None:
            progress(lba + count, total_sectors)


def _copy_run(src: BlockImage, dst: BlockImage, lba: int, count: int,
              progress: Progress | None, total_sectors: int) -> None:
    end = lba + count
    while lba < end:
        n = min(CHUNK_SECTORS - lba % CHUNK_SECTORS, end - lba)
        data = src.read(lba, n)
        if data != _ZEROS[:len(data)]:
            dst.write(lba, data)
        lba += n
        if progress is not None:
            progress(lba, total_sectors)
