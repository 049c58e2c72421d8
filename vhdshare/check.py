"""`vhdshare check`: find what is wrong with a VHD and repair what is safe to repair.

Safe repairs are the ones that restore a redundant copy from an intact original:
  - a dynamic disk's footer copy at offset 0, missing or different, is rewritten
    from the trailing footer (offset 0 belongs to the copy, nothing else is there);
  - a damaged or missing trailing footer of a dynamic disk is rewritten from the
    intact copy at offset 0, after the last block (which must still be complete).
Anything else (a damaged header or BAT, overlapping blocks, a fixed disk without
its only footer) is reported and left alone: guessing could destroy data.
"""

from __future__ import annotations

import os

from vhdshare.blockimage import pwrite_all
from vhdshare.dynamic import load_layout
from vhdshare.image import looks_like_vhd, open_image
from vhdshare.vhd import DISK_TYPE_DYNAMIC, VHD_FOOTER, VhdError, validate_footer
from vhdshare.vhdfile import os_errors_as_vhd, read_footer_at

REPAIRED = " (repaired)"
REPAIRABLE = " (repairable: check --repair)"


def check_image(path: str | os.PathLike[str], repair: bool = False) -> list[str]:
    """Problems found in the image at `path`; repaired ones end with REPAIRED, ones that
    `repair=True` would repair end with REPAIRABLE, the others with neither.

    A file that cannot be opened at all is a VhdError.
    """
    name = os.fspath(path)
    if not looks_like_vhd(name):
        raise VhdError(f"{name}: not a VHD image (no 'conectix' footer at its end or start)")
    try:
        fd = os.open(name, (os.O_RDWR if repair else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise VhdError(f"cannot open {name}: {exc.strerror}") from None
    try:
        problems = _check_footers(fd, repair)
    finally:
        os.close(fd)
    if any(not problem.endswith(REPAIRED) for problem in problems):
        return problems
    try:
        open_image(name).close()
    except VhdError as exc:
        problems.append(str(exc))
    return problems


@os_errors_as_vhd
def _check_footers(fd: int, repair: bool) -> list[str]:
    file_size_bytes = os.fstat(fd).st_size
    trailing_offset = file_size_bytes - VHD_FOOTER.size
    try:
        trailing = read_footer_at(fd, trailing_offset)
    except VhdError as exc:
        return _trailing_footer_damaged(fd, file_size_bytes, str(exc), repair)
    try:
        validate_footer(trailing)
    except VhdError as exc:
        return [str(exc)]
    if trailing.disk_type != DISK_TYPE_DYNAMIC:
        return []
    return _check_footer_copy(fd, trailing_offset, repair)


def _check_footer_copy(fd: int, trailing_offset: int, repair: bool) -> list[str]:
    """A dynamic disk keeps an identical footer copy at offset 0."""
    trailing_raw = os.pread(fd, VHD_FOOTER.size, trailing_offset)
    if os.pread(fd, VHD_FOOTER.size, 0) == trailing_raw:
        return []
    try:
        read_footer_at(fd, 0)
        problem = "footer copy at offset 0 differs from the footer at the end"
    except VhdError as exc:
        problem = f"footer copy at offset 0 is damaged: {exc}"
    if not repair:
        return [problem + REPAIRABLE]
    pwrite_all(fd, trailing_raw, 0)
    os.fsync(fd)
    return [problem + REPAIRED]


def _trailing_footer_damaged(fd: int, file_size_bytes: int, why: str, repair: bool) -> list[str]:
    problem = f"footer at the end of the file is damaged or missing: {why}"
    try:
        copy = read_footer_at(fd, 0)
        validate_footer(copy)
    except VhdError as exc:
        return [problem, f"no intact footer copy at offset 0 either ({exc}); cannot repair"]
    if copy.disk_type != DISK_TYPE_DYNAMIC:
        return [problem, "the copy at offset 0 is not a dynamic disk footer; cannot repair"]
    try:
        end_bytes = load_layout(fd, copy, copy.virtual_size_bytes, file_size_bytes).end_bytes
    except VhdError as exc:
        return [problem, f"cannot repair: {exc}"]
    if not repair:
        return [problem + REPAIRABLE]
    _write_trailing_footer(fd, max(end_bytes, file_size_bytes - VHD_FOOTER.size))
    return [problem + REPAIRED]


def _write_trailing_footer(fd: int, offset_bytes: int) -> None:
    """Copy the footer at offset 0 to `offset_bytes` and end the file right after it."""
    pwrite_all(fd, os.pread(fd, VHD_FOOTER.size, 0), offset_bytes)
    os.ftruncate(fd, offset_bytes + VHD_FOOTER.size)
    os.fsync(fd)
