"""A dynamic VHD written by several writers at once, each with its own open file (shared mode).

Two opens in one process are two open file descriptions, which is what two nodes are; the
process test runs writers in separate processes at the same time, with O_DIRECT as the
node's unpacker opens disks.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

from vhdshare.check import check_image
from vhdshare.image import create_image, open_image

MIB = 1 << 20
SPB = 2 * MIB // 512  # sectors per 2 MiB block


def sectors(count: int, seed: int) -> bytes:
    return bytes([seed % 255 + 1]) * (count * 512)


def test_a_block_allocated_by_another_writer_is_seen_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_image(path, 16 * MIB, "dynamic")
    with open_image(path, writable=True, shared=True) as a, \
            open_image(path, writable=True, shared=True) as b:
        assert a.read(0, 8) == bytes(8 * 512)  # b's cache now says block 0 is unused...
        assert b.read(0, 8) == bytes(8 * 512)
        a.write(0, sectors(8, 1))
        assert b.read(0, 8) == sectors(8, 1)  # ...and it is read again, not believed
        b.write(8, sectors(8, 2))  # into a's block: no second allocation
        b.write(SPB, sectors(8, 3))  # a new block, after a's: b must see the file grew
        a.write(2 * SPB, sectors(8, 4))
        assert a.read(0, 16) == sectors(8, 1) + sectors(8, 2)
        assert a.read(SPB, 8) == sectors(8, 3)
        assert b.read(2 * SPB, 8) == sectors(8, 4)
        assert [run[2] for run in b.allocated(0, 3 * SPB)] == [True]
    assert check_image(path) == []
    with open_image(path) as image:
        assert image.allocated_blocks == 3  # type: ignore[union-attr]


def test_shared_unmap_zeroes_but_never_frees_a_block(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_image(path, 8 * MIB, "dynamic")
    with open_image(path, writable=True, shared=True) as a, \
            open_image(path, writable=True, shared=True) as b:
        a.write(0, sectors(SPB, 5))
        assert b.read(0, 1) == sectors(1, 5)  # b caches where block 0 lies
        a.unmap(0, SPB)
        a.write(SPB, sectors(8, 6))  # would reuse a freed slot: block 0 must not move
        assert b.read(0, 8) == bytes(8 * 512)
        assert b.read(SPB, 8) == sectors(8, 6)
        assert a.allocated_blocks == 2  # type: ignore[union-attr]
    assert check_image(path) == []


def _writer(path: str, first_block: int, blocks: int, seed: int) -> None:
    for index in range(blocks):
        # Opened afresh for every block, as a node opens a disk when a host attaches: opens
        # race with the other writer's growth too.
        with open_image(path, writable=True, shared=True, direct=True) as image:
            block = first_block + 2 * index  # interleaved with the other writer's blocks
            for piece in range(4):
                image.write(block * SPB + piece * (SPB // 4), sectors(SPB // 4, seed + index))


def test_two_processes_grow_one_disk_at_once(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_image(path, 64 * MIB, "dynamic")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(path), first, 12, 10 * (first + 1)))
               for first in (0, 1)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    assert check_image(path) == []
    expected = bytearray(64 * MIB)
    with open_image(path) as image:
        for first in (0, 1):
            for index in range(12):
                block = first + 2 * index
                data = image.read(block * SPB, SPB)
                assert data == sectors(SPB, 10 * (first + 1) + index), f"block {block}"
                expected[block * 2 * MIB:(block + 1) * 2 * MIB] = data
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    compare = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(path),
                              str(raw)], capture_output=True, text=True)
    if compare.returncode == 127 or not os.path.exists("/usr/bin/qemu-img"):
        pytest.skip("qemu-img is not installed")
    assert compare.returncode == 0, compare.stdout + compare.stderr
