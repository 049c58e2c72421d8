"""What fixed and dynamic VHD images share: the open file, the footer, and error shaping.

Every public method of an image turns OSError into VhdError (`os_errors_as_vhd`), so
callers (the SCSI target, the CLI) have exactly one exception type to convert.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, ParamSpec, Self, TypeVar

from vhdshare import directio
from vhdshare.blockimage import SECTOR_SIZE, pread_exact
from vhdshare.vhd import (
    DISK_TYPE_NAMES,
    VHD_FOOTER,
    Footer,
    VhdError,
    parse_footer,
)

P = ParamSpec("P")
R = TypeVar("R")


def os_errors_as_vhd(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator: an OSError inside `func` becomes a VhdError with the same message."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except OSError as exc:
            raise VhdError(f"I/O error: {exc.strerror or exc}") from exc

    return wrapper


def read_footer_at(fd: int, offset_bytes: int) -> Footer:
    """Parse the footer stored at `offset_bytes` (VhdError if absent or damaged)."""
    if offset_bytes < 0:
        raise VhdError("file too short for a VHD footer")
    raw = (directio.pread if directio.is_direct(fd) else os.pread)(fd, VHD_FOOTER.size,
                                                                   offset_bytes)
    return parse_footer(raw)


def read_trailing_footer(fd: int, file_size_bytes: int) -> Footer:
    """The footer at the end of the file, which is authoritative.

    When it is damaged but a dynamic disk's copy at offset 0 is intact, say so:
    `vhdshare check --repair` can restore it.
    """
    if file_size_bytes < VHD_FOOTER.size:
        raise VhdError(f"not a VHD image: only {file_size_bytes} bytes long")
    try:
        return read_footer_at(fd, file_size_bytes - VHD_FOOTER.size)
    except VhdError as exc:
        try:
            read_footer_at(fd, 0)
        except VhdError:
            raise VhdError(f"not a VHD image: {exc}") from None
        raise VhdError(f"{exc} at the end of the file; the copy at offset 0 is intact "
                       "(run `vhdshare check --repair`)") from None


class VhdFile:
    """An open VHD file: its descriptor, footer, size and read/write mode."""

    sector_size = SECTOR_SIZE
    writes_in_place = False

    def __init__(self, fd: int, path: str, footer: Footer, file_size_bytes: int,
                 writable: bool, shared: bool = False) -> None:
        self._fd = fd
        self.shared = shared  # other processes (other nodes) write the same file
        self.path = path
        self.footer = footer
        self.file_size_bytes = file_size_bytes
        self.writable = writable
        self.size_bytes = footer.virtual_size_bytes

    @property
    def disk_type_name(self) -> str:
        return DISK_TYPE_NAMES[self.footer.disk_type]

    @property
    def total_sectors(self) -> int:
        return self.size_bytes // SECTOR_SIZE

    @os_errors_as_vhd
    def flush(self) -> None:
        if self.writable and self._fd >= 0:
            os.fsync(self._fd)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def info(self) -> dict[str, Any]:
        """Facts for `vhdshare info`; subclasses add their own."""
        footer = self.footer
        geometry = footer.geometry
        return {
            "path": self.path,
            "format": "vhd",
            "type": self.disk_type_name,
            "virtual_size_bytes": self.size_bytes,
            "current_size_bytes": footer.current_size,
            "original_size_bytes": footer.original_size,
            "file_size_bytes": self.file_size_bytes,
            "geometry": {"cylinders": geometry.cylinders, "heads": geometry.heads,
                         "sectors_per_track": geometry.sectors_per_track},
            "creator_app": footer.creator_app.decode("latin-1"),
            "creator_version": f"{footer.creator_version >> 16}.{footer.creator_version & 0xFFFF}",
            "creator_os": footer.creator_os.decode("latin-1"),
            "unique_id": footer.unique_id.hex(),
            "saved_state": bool(footer.saved_state),
        }

    def _read_exact(self, length_bytes: int, offset_bytes: int) -> bytes:
        return pread_exact(self._fd, length_bytes, offset_bytes, VhdError)

    def _check_writable(self) -> None:
        if not self.writable:
            raise VhdError("image is open read-only")
        if self.footer.saved_state:
            raise VhdError("image holds a saved virtual machine state; refusing to write")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
