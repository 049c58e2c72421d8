"""qemu interop: vhdshare images in qemu-img/qemu-io and qemu's VHDs in vhdshare.

qemu's `vpc` driver is the reference reader; these tests need qemu-utils
(qemu-img, qemu-io) and skip with a reason without them.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from vhdshare.cli import main
from vhdshare.image import open_image
from vhdshare.vhd import chs_geometry

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-io")),
    reason="qemu-img/qemu-io not installed (Debian package qemu-utils)")

MIB = 1 << 20
# 5 MiB, 10000 KiB and 33 MiB + 512 are not products of their CHS geometry (qemu itself would
# round them up); 33 MiB + 512 also ends one sector into a dynamic block; 200 MiB is sparse.
SIZES = [5 * MIB, 10_000 * 1024, 33 * MIB + 512, 200 * MIB]
KINDS = ["fixed", "dynamic"]


def test_sizes_include_non_chs_sizes() -> None:
    assert any(chs_geometry(size // 512).total_sectors * 512 != size for size in SIZES)


def qemu(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    assert "fail" not in done.stdout.lower(), done.stdout
    return done.stdout


def qemu_virtual_size(path: Path) -> int:
    info = json.loads(qemu("qemu-img", "info", "-f", "vpc", "--output=json", str(path)))
    return int(info["virtual-size"])


def qemu_raw(path: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / f"{path.name}.raw"
    qemu("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data


def writes_for(size_bytes: int) -> list[tuple[int, bytes]]:
    """(lba, data) writes: first sectors, a block boundary, the last sectors."""
    last = size_bytes // 512
    return [(0, b"\x5a" * 4096), (4093, bytes(range(256)) * 16), (last - 3, b"\xc3" * 1536)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size_bytes", SIZES)
def test_vhdshare_image_in_qemu(tmp_path: Path, kind: str, size_bytes: int) -> None:
    path = tmp_path / "ours.vhd"
    assert main(["create", str(path), "--size", str(size_bytes), "--type", kind]) == 0
    assert qemu_virtual_size(path) == size_bytes
    expected = bytearray(size_bytes)
    with open_image(path, writable=True) as image:
        for lba, data in writes_for(size_bytes):
            image.write(lba, data)
            expected[lba * 512:lba * 512 + len(data)] = data
    assert qemu_virtual_size(path) == size_bytes
    assert qemu_raw(path, tmp_path) == expected
    qemu("qemu-io", "-f", "vpc", "-c", "read -P 0x5a 0 4096",
         "-c", f"read -P 0xc3 {size_bytes - 1536} 1536", str(path))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size_bytes", [10_000 * 1024, 64 * MIB])
def test_qemu_image_in_vhdshare(tmp_path: Path, kind: str, size_bytes: int) -> None:
    path = tmp_path / "qemu.vhd"
    qemu("qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={kind}", str(path),
         str(size_bytes))
    virtual_size = qemu_virtual_size(path)  # qemu rounds up to its CHS geometry
    qemu("qemu-io", "-f", "vpc", "-c", "write -P 0xab 1000 70000",
         "-c", f"write -P 0xcd {3 * MIB} {3 * MIB}",
         "-c", f"write -P 0xef {virtual_size - 512} 512", str(path))
    expected = qemu_raw(path, tmp_path)
    with open_image(path) as image:
        assert image.size_bytes == virtual_size == len(expected)
        assert image.read(0, image.total_sectors) == expected
    assert expected[1000:71000] == b"\xab" * 70000 and expected[-512:] == b"\xef" * 512


def test_mixed_writers_on_one_dynamic_image(tmp_path: Path) -> None:
    """qemu grows a vhdshare image, then vhdshare grows it further; both see everything."""
    path = tmp_path / "mixed.vhd"
    assert main(["create", str(path), "--size", "20M"]) == 0
    with open_image(path, writable=True) as image:
        image.write(0, b"\x01" * 512)
    qemu("qemu-io", "-f", "vpc", "-c", f"write -P 0x02 {4 * MIB} 65536", str(path))
    with open_image(path, writable=True) as image:
        assert image.read(4 * MIB // 512, 128) == b"\x02" * 65536
        image.write(10 * MIB // 512, b"\x03" * 512)
    qemu("qemu-io", "-f", "vpc", "-c", "read -P 0x01 0 512",
         "-c", f"read -P 0x02 {4 * MIB} 65536", "-c", f"read -P 0x03 {10 * MIB} 512",
         "-c", f"read -P 0x00 {12 * MIB} 65536", str(path))
    assert main(["check", str(path)]) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_convert_raw_to_vhd_reads_back_in_qemu(tmp_path: Path, kind: str) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as file:
        file.truncate(30 * MIB + 512)
        file.seek(7 * MIB)
        file.write(b"\x77" * 100_000)
    vhd_path = tmp_path / "disk.vhd"
    assert main(["convert", str(raw), str(vhd_path), "--type", kind]) == 0
    assert qemu_virtual_size(vhd_path) == 30 * MIB + 512
    assert qemu_raw(vhd_path, tmp_path) == raw.read_bytes()
    back = tmp_path / "back.raw"
    assert main(["convert", str(vhd_path), str(back), "--type", "raw"]) == 0
    assert back.read_bytes() == raw.read_bytes()
