"""O_DIRECT reads and writes at any offset and length, checked against buffered I/O."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from vhdshare import directio
from vhdshare.blockimage import pread_exact, pwrite_all
from vhdshare.image import create_image, open_image
from vhdshare.vhd import VhdError


@pytest.fixture
def direct_fd(tmp_path: Path) -> int:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    fd = directio.open_direct(str(path), os.O_RDWR)
    if not directio.is_direct(fd):
        os.close(fd)
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    yield fd  # type: ignore[misc]
    os.close(fd)


def test_unaligned_reads_and_writes_match_a_buffered_model(direct_fd: int) -> None:
    model = bytearray(bytes(range(256)) * 64)
    rng = random.Random(5)
    for _ in range(300):
        offset, length = rng.randrange(0, 20000), rng.randrange(0, 3000)
        if rng.random() < 0.5:
            data = rng.randbytes(length)
            pwrite_all(direct_fd, data, offset)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + length] = data
        assert directio.pread(direct_fd, length, offset) == bytes(model[offset:offset + length])
        assert os.fstat(direct_fd).st_size == len(model)
    assert pread_exact(direct_fd, len(model), 0, VhdError) == bytes(model)


def test_a_dynamic_disk_works_through_o_direct(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_image(path, 8 << 20, "dynamic")
    with open_image(path, writable=True, shared=True, direct=True) as image:
        image.write(4096 + 3, b"\x07" * 1536)  # grows the disk: footer, bitmap, BAT entry
        assert image.read(4096, 8) == bytes(1536) + b"\x07" * 1536 + bytes(1024)
    with open_image(path) as image:  # and a buffered open reads the same
        assert image.read(4096 + 3, 3) == b"\x07" * 1536
