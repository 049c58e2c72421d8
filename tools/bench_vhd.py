"""Benchmark VHD I/O: sequential 1 MiB and random 4 KiB reads/writes, in one run, on
a fixed and a dynamic image, through three layers on the same file:

  raw      os.pread/os.pwrite on the image file's data bytes (the floor)
  image    vhdshare.image (FixedImage/DynamicImage) read/write by sector
  target   vhdshare.target.Target executing READ(16)/WRITE(16) CDBs on that image

Each layer starts from a fresh file: "first-write" is sequential 1 MiB writes into
never-written space (a sparse plain file for raw; for a dynamic disk this includes
block allocation, one fdatasync per new 2 MiB block). The rest of the disk is then
filled untimed, and the other workloads are overwrites and reads. The raw layer's
other workloads run last on the file the last VHD layer used, over the bytes
where the disk's data lies (the blocks region for a dynamic disk). Data stays in
the page cache (no O_DIRECT, no fsync in the timed loops), so the figures show
software overhead. Every case is time-bounded.

    .venv/bin/python tools/bench_vhd.py [--size-mib 128] [--seconds 1.5] [--pin CPU]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vhdshare.blockimage import SECTOR_SIZE, BlockImage
from vhdshare.dynamic import DynamicImage
from vhdshare.image import VhdImage, create_image, open_image

SEQ_BYTES = 1 << 20
RAND_BYTES = 4096
WORKLOADS = ("seq-write", "seq-read", "rand-write", "rand-read")
READ_16, WRITE_16 = 0x88, 0x8A
REPEATS = 3



@dataclass
class Result:
    ops: int
    bytes_done: int
    elapsed_s: float

    @property
    def mib_s(self) -> float:
        return self.bytes_done / (1 << 20) / self.elapsed_s

    @property
    def iops(self) -> float:
        return self.ops / self.elapsed_s


class Layer:
    """One way of doing I/O at byte offsets of the virtual disk."""

    def read(self, offset_bytes: int, length_bytes: int) -> None:
        raise NotImplementedError

    def write(self, offset_bytes: int, data: bytes) -> None:
        raise NotImplementedError


class RawLayer(Layer):
    def __init__(self, path: Path, base_bytes: int) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.base_bytes = base_bytes

    def read(self, offset_bytes: int, length_bytes: int) -> None:
        os.pread(self.fd, length_bytes, self.base_bytes + offset_bytes)

    def write(self, offset_bytes: int, data: bytes) -> None:
        os.pwrite(self.fd, data, self.base_bytes + offset_bytes)

    def close(self) -> None:
        os.close(self.fd)


class ImageLayer(Layer):
    def __init__(self, image: BlockImage) -> None:
        self.image = image

    def read(self, offset_bytes: int, length_bytes: int) -> None:
        self.image.read(offset_bytes // SECTOR_SIZE, length_bytes // SECTOR_SIZE)

    def write(self, offset_bytes: int, data: bytes) -> None:
        self.image.write(offset_bytes // SECTOR_SIZE, data)


class TargetLayer(Layer):
    """READ(16)/WRITE(16) through vhdshare.target.Target (present since issue 7 item 3)."""

    def __init__(self, image: BlockImage) -> None:
        from vhdshare.target import Target

        self.target = Target(image, "bench-disk")

    def _cdb(self, opcode: int, offset_bytes: int, length_bytes: int) -> bytes:
        lba, blocks = offset_bytes // SECTOR_SIZE, length_bytes // SECTOR_SIZE
        return bytes([opcode, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"

    def read(self, offset_bytes: int, length_bytes: int) -> None:
        response = self.target.execute("bench", self._cdb(READ_16, offset_bytes, length_bytes))
        if response.status != 0:
            raise RuntimeError(f"READ(16) failed: {response}")

    def write(self, offset_bytes: int, data: bytes) -> None:
        response = self.target.execute("bench", self._cdb(WRITE_16, offset_bytes, len(data)), data)
        if response.status != 0:
            raise RuntimeError(f"WRITE(16) failed: {response}")


def target_available() -> bool:
    try:
        import vhdshare.target  # noqa: F401
    except ImportError:
        return False
    return True


def run_workload(layer: Layer, workload: str, size_bytes: int, seconds: float,
                 one_pass: bool = False) -> Result:
    """Run `workload` until `seconds` pass (sequential ones wrap around the disk,
    unless `one_pass`, which stops after writing every slot once)."""
    rng = random.Random(7)
    seq = workload.startswith("seq")
    io_bytes = SEQ_BYTES if seq else RAND_BYTES
    slots = size_bytes // io_bytes
    data = os.urandom(io_bytes)
    ops = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        offset = (ops % slots if seq else rng.randrange(slots)) * io_bytes
        if workload.endswith("write"):
            layer.write(offset, data)
        else:
            layer.read(offset, io_bytes)
        ops += 1
        if (one_pass and ops >= slots) or (ops % 16 == 0 and time.perf_counter() >= deadline):
            break
    elapsed = time.perf_counter() - start
    return Result(ops, ops * io_bytes, elapsed)


def prefill(layer: Layer, done_bytes: int, size_bytes: int) -> None:
    """Write the rest of the disk (untimed), so later writes are overwrites everywhere."""
    data = bytes(range(256)) * (SEQ_BYTES // 256)
    for offset in range(done_bytes, size_bytes, SEQ_BYTES):
        layer.write(offset, data)


def first_write(layer: Layer, size_bytes: int, seconds: float) -> Result:
    """Sequential writes into never-written space, then the rest filled untimed."""
    result = run_workload(layer, "seq-write", size_bytes, seconds, one_pass=True)
    prefill(layer, result.bytes_done, size_bytes)
    return result


def bench_disk(kind: str, workdir: Path, size_bytes: int, seconds: float, with_target: bool
               ) -> dict[str, dict[str, Result]]:
    """raw, image and (if present) target layers, each on its own fresh file of `kind`.

    Runs are interleaved (workload, repeat, layer), so noise hits all layers alike.
    """
    plain = workdir / f"{kind}.raw"
    plain.write_bytes(b"")
    os.truncate(plain, size_bytes)
    plain_layer = RawLayer(plain, 0)
    results = {"raw": {"first-write": first_write(plain_layer, size_bytes, seconds)}}
    plain_layer.close()
    plain.unlink()
    names = ["raw", "image", "target"] if with_target else ["raw", "image"]
    images: list[VhdImage] = []
    layers: dict[str, Layer] = {}
    for name in names:
        path = workdir / f"{kind}-{name}.vhd"
        create_image(path, size_bytes, kind)
        image = open_image(path, writable=True)
        images.append(image)
        if name == "raw":  # blocks allocated through the image, then plain I/O on its data
            prefill(ImageLayer(image), 0, size_bytes)
            image.flush()
            layers[name] = RawLayer(path, data_base_bytes(image))
            continue
        layer = ImageLayer(image) if name == "image" else TargetLayer(image)
        layers[name] = layer
        results[name] = {"first-write": first_write(layer, size_bytes, seconds)}
    for workload in WORKLOADS:
        runs: dict[str, list[Result]] = {name: [] for name in names}
        for _ in range(REPEATS):
            for name in names:
                runs[name].append(run_workload(layers[name], workload, size_bytes,
                                               seconds / REPEATS))
        for name in names:
            results[name][workload] = max(runs[name], key=lambda r: r.bytes_done / r.elapsed_s)
    for image in images:
        image.close()
    return results


def data_base_bytes(image: BlockImage) -> int:
    """Where the disk's bytes start in the file: 0 for fixed, after the BAT for dynamic."""
    if not isinstance(image, DynamicImage):
        return 0
    table_end = image.header.table_offset + image.header.max_table_entries * 4
    return -(-table_end // SECTOR_SIZE) * SECTOR_SIZE


def figure(result: Result, workload: str) -> str:
    if workload.startswith("rand"):
        return f"{result.iops:,.0f} IOPS"
    return f"{result.mib_s:,.0f} MiB/s"


def ratio(result: Result, base: Result) -> str:
    return f"{result.bytes_done / result.elapsed_s / (base.bytes_done / base.elapsed_s):.2f}"


def table(all_results: dict[str, dict[str, dict[str, Result]]], with_target: bool) -> str:
    head = "| disk | workload | raw os.pread/pwrite | vhdshare.image | image/raw |"
    rule = "|---|---|---:|---:|---:|"
    if with_target:
        head += " SCSI target | target/raw |"
        rule += "---:|---:|"
    lines = [head, rule]
    for disk, results in all_results.items():
        for workload in ("first-write", *WORKLOADS):
            raw, image = results["raw"][workload], results["image"][workload]
            line = (f"| {disk} | {workload} | {figure(raw, workload)} | "
                    f"{figure(image, workload)} | {ratio(image, raw)} |")
            if with_target:
                target = results["target"][workload]
                line += f" {figure(target, workload)} | {ratio(target, raw)} |"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128, help="virtual disk size")
    parser.add_argument("--seconds", type=float, default=1.5,
                        help=f"time limit per case (split over {REPEATS} repeats)")
    parser.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    parser.add_argument("--pin", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    with_target = target_available()
    workdir = Path(tempfile.mkdtemp(prefix="bench-vhd-", dir=args.dir))
    size_bytes = args.size_mib << 20
    try:
        results = {kind: bench_disk(kind, workdir, size_bytes, args.seconds, with_target)
                   for kind in ("fixed", "dynamic")}
    finally:
        shutil.rmtree(workdir)
    pinned = f"pinned to CPU {args.pin}" if args.pin is not None else "not pinned"
    print(f"# bench_vhd: {args.size_mib} MiB disks, <= {args.seconds} s per case (best of "
          f"{REPEATS}; first-write: one run), {pinned}, page cache warm; "
          f"seq = 1 MiB ops, rand = 4 KiB ops")
    if not with_target:
        print("# vhdshare.target not importable: SCSI target columns left out")
    print(table(results, with_target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
