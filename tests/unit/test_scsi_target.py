"""The sans-IO SCSI target against an in-memory image (fake for the image only).

Also home of the CDB builders and `MemoryImage` the other SCSI/reservation/tunnel
tests import.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhdshare.dynamic import DynamicImage
from vhdshare.image import create_image, open_image
from vhdshare.scsi import (
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    LBA_OUT_OF_RANGE,
    PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    ScsiResponse,
    SenseData,
    SenseKey,
    Status,
)
from vhdshare.target import Target

SECTOR = 512


class MemoryImage:
    """A BlockImage in a bytearray; any access outside the disk fails the test."""

    sector_size = SECTOR
    writes_in_place = True

    def __init__(self, sectors: int) -> None:
        self.size_bytes = sectors * SECTOR
        self.data = bytearray(self.size_bytes)
        self.mapped = [False] * sectors
        self.flushes = 0
        self.unmapped: list[tuple[int, int]] = []

    def _check(self, lba: int, count: int) -> None:
        assert lba >= 0 and count >= 0 and lba + count <= self.size_bytes // SECTOR, (lba, count)

    def read(self, lba: int, count: int) -> bytes:
        self._check(lba, count)
        return bytes(self.data[lba * SECTOR : (lba + count) * SECTOR])

    def write(self, lba: int, data: bytes) -> None:
        assert len(data) % SECTOR == 0
        count = len(data) // SECTOR
        self._check(lba, count)
        self.data[lba * SECTOR : (lba + count) * SECTOR] = data
        self.mapped[lba : lba + count] = [True] * count

    def flush(self) -> None:
        self.flushes += 1

    def unmap(self, lba: int, count: int) -> None:
        self._check(lba, count)
        self.unmapped.append((lba, count))
        self.data[lba * SECTOR : (lba + count) * SECTOR] = bytes(count * SECTOR)
        self.mapped[lba : lba + count] = [False] * count

    def allocated(self, lba: int, count: int) -> list[tuple[int, int, bool]]:
        self._check(lba, count)
        return [(lba + i, 1, self.mapped[lba + i]) for i in range(count)]

    def close(self) -> None:
        pass


# --- CDB builders ------------------------------------------------------------------


def tur() -> bytes:
    return bytes(6)


def inquiry(evpd: bool = False, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, int(evpd), page, alloc, 0)


def request_sense(alloc: int = 252, desc: bool = False) -> bytes:
    return bytes([0x03, int(desc), 0, 0, alloc, 0])


def read10(lba: int, count: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0x08 if fua else 0, lba, 0, count, 0)


def read16(lba: int, count: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, count, 0, 0)


def write10(lba: int, count: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, count, 0)


def write16(lba: int, count: int, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, count, 0, 0)


def sync10(lba: int = 0, count: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x35, 0, lba, 0, count, 0)


def sync16(lba: int = 0, count: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x91, 0, lba, count, 0, 0)


def read_capacity10() -> bytes:
    return bytes([0x25]) + bytes(9)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def mode_sense6(page: int, subpage: int = 0, pc: int = 0, dbd: bool = False) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, 255, 0])


def mode_sense10(page: int, llbaa: bool = False, dbd: bool = False) -> bytes:
    flags = (0x10 if llbaa else 0) | (0x08 if dbd else 0)
    return struct.pack(">BBBB3sHB", 0x5A, flags, page, 0, b"", 4096, 0)


def unmap_cdb(length: int) -> bytes:
    return struct.pack(">BB4sBHB", 0x42, 0, b"", 0, length, 0)


def unmap_list(*extents: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4s", lba, n, b"") for lba, n in extents)
    return struct.pack(">HH4s", len(body) + 6, len(body), b"") + body


def write_same16(lba: int, count: int, unmap: bool = False, ndob: bool = False) -> bytes:
    flags = (0x08 if unmap else 0) | (0x01 if ndob else 0)
    return struct.pack(">BBQIBB", 0x93, flags, lba, count, 0, 0)


def report_luns(alloc: int = 64) -> bytes:
    return struct.pack(">BBB3sIBB", 0xA0, 0, 0, b"", alloc, 0, 0)


def pr_in(action: int, alloc: int = 8192) -> bytes:
    return struct.pack(">BB5sHB", 0x5E, action, b"", alloc, 0)


def pr_out(action: int, pr_type: int = 0, scope: int = 0) -> bytes:
    return struct.pack(">BBB2sIB", 0x5F, action, (scope << 4) | pr_type, b"", 24, 0)


def pr_out_params(key: int, sa_key: int = 0, aptpl: bool = False, flags: int = 0) -> bytes:
    return struct.pack(">QQ4sBB2s", key, sa_key, b"", flags | int(aptpl), 0, b"")


def check(response: ScsiResponse, key: SenseKey, code: tuple[int, int]) -> SenseData:
    assert response.status == Status.CHECK_CONDITION, response
    sense = SenseData.unpack(response.sense)
    assert (sense.key, sense.code) == (key, code), sense
    return sense


# --- tests ---------------------------------------------------------------------------


@pytest.fixture
def image() -> MemoryImage:
    return MemoryImage(2048)


@pytest.fixture
def target(image: MemoryImage) -> Target:
    return Target(image, "disk-1")


def test_test_unit_ready(target: Target) -> None:
    assert target.execute("i1", tur()) == ScsiResponse.good()


def test_unknown_opcode_and_empty_cdb(target: Target) -> None:
    sense = check(target.execute("i1", bytes([0xC7]) + bytes(9)),
                  SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
    assert sense.field_pointer == 0
    check(target.execute("i1", b""), SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)


def test_standard_inquiry(target: Target) -> None:
    data = target.execute("i1", inquiry()).data_in
    assert len(data) == 96 and data[0] == 0 and data[2] == 6 and data[4] == 91
    assert data[8:16] == b"CLUSTRFS"
    assert target.execute("i1", inquiry(alloc=36)).data_in == data[:36]


def test_inquiry_page_without_evpd_is_invalid(target: Target) -> None:
    sense = check(target.execute("i1", inquiry(False, 0x80)),
                  SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    assert sense.field_pointer == 2


def test_vpd_pages(target: Target) -> None:
    supported = target.execute("i1", inquiry(True, 0x00)).data_in
    assert supported[1] == 0 and list(supported[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for page in supported[4:]:
        data = target.execute("i1", inquiry(True, page)).data_in
        assert data[1] == page and len(data) == 4 + struct.unpack(">H", data[2:4])[0]
    check(target.execute("i1", inquiry(True, 0x99)), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_CDB)
    characteristics = target.execute("i1", inquiry(True, 0xB1)).data_in
    assert len(characteristics) == 64 and characteristics[4:6] == b"\x00\x01"  # no rotation


def _designators(page: bytes) -> list[tuple[int, bytes]]:
    found, offset = [], 4
    while offset < len(page):
        length = page[offset + 3]
        found.append((page[offset + 1] & 0x0F, page[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return found


def test_device_identifiers_are_stable_per_disk(image: MemoryImage) -> None:
    def ids(disk_id: str) -> tuple[bytes, bytes]:
        t = Target(image, disk_id)
        return (t.execute("x", inquiry(True, 0x80)).data_in,
                t.execute("y", inquiry(True, 0x83)).data_in)

    assert ids("disk-1") == ids("disk-1")
    assert ids("disk-1") != ids("disk-2")
    designators = dict(_designators(ids("disk-1")[1]))
    assert designators[3][0] >> 4 == 0x3 and len(designators[3]) == 8  # NAA locally assigned
    assert designators[1].startswith(b"CLUSTRFS")


def test_read_capacity(target: Target) -> None:
    assert target.execute("i1", read_capacity10()).data_in == struct.pack(">II", 2047, 512)
    data = target.execute("i1", read_capacity16()).data_in
    assert struct.unpack(">QI", data[:12]) == (2047, 512)
    assert data[14] & 0x80  # LBPME
    thick = Target(MemoryImage(8), "d", thin_provisioning=False)
    assert not thick.execute("i1", read_capacity16()).data_in[14] & 0x80


@pytest.mark.parametrize(("write", "read"), [(write10, read10), (write16, read16)])
def test_write_then_read(
    target: Target,
    image: MemoryImage,
    write: Callable[[int, int], bytes],
    read: Callable[[int, int], bytes],
) -> None:
    payload = bytes(range(256)) * 2 * 3
    assert target.execute("i1", write(100, 3), payload).status == Status.GOOD
    assert target.execute("i1", read(100, 3)).data_in == payload
    assert image.read(100, 3) == payload


def test_fua_flushes(target: Target, image: MemoryImage) -> None:
    target.execute("i1", write10(0, 1, fua=True), bytes(512))
    assert image.flushes == 1


def test_out_of_range_and_bad_lengths(target: Target) -> None:
    check(target.execute("i1", read10(2047, 2)), SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    check(target.execute("i1", read16(2**64 - 1, 2**32 - 1)), SenseKey.ILLEGAL_REQUEST,
          LBA_OUT_OF_RANGE)
    check(target.execute("i1", write10(0, 2), bytes(512)), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_CDB)
    assert target.execute("i1", read10(2047, 0)) == ScsiResponse.good()
    check(target.execute("i1", read10(0, 1)[:9]), SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)


def test_data_in_limit(target: Target) -> None:
    assert len(target.execute("i1", read10(0, 4), data_in_limit_bytes=1000).data_in) == 1000


def test_synchronize_cache(target: Target, image: MemoryImage) -> None:
    assert target.execute("i1", sync10()).status == Status.GOOD
    assert target.execute("i1", sync16(10, 5)).status == Status.GOOD
    assert image.flushes == 2
    check(target.execute("i1", sync16(2048, 1)), SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def test_unmap(target: Target, image: MemoryImage) -> None:
    target.execute("i1", write10(0, 16), b"\xff" * 16 * 512)
    params = unmap_list((0, 8), (12, 2))
    assert target.execute("i1", unmap_cdb(len(params)), params).status == Status.GOOD
    assert image.unmapped == [(0, 8), (12, 2)]
    assert target.execute("i1", read10(0, 1)).data_in == bytes(512)
    assert target.execute("i1", unmap_cdb(0)).status == Status.GOOD


def test_unmap_errors(target: Target, image: MemoryImage) -> None:
    check(target.execute("i1", unmap_cdb(4), bytes(4)), SenseKey.ILLEGAL_REQUEST,
          PARAMETER_LIST_LENGTH_ERROR)
    bad = unmap_list((0, 1), (2040, 9))
    check(target.execute("i1", unmap_cdb(len(bad)), bad), SenseKey.ILLEGAL_REQUEST,
          LBA_OUT_OF_RANGE)
    assert image.unmapped == []  # checked before anything is unmapped
    truncated = unmap_list((0, 1), (4, 1))[:-3]  # the incomplete descriptor is ignored
    assert target.execute("i1", unmap_cdb(len(truncated)), truncated).status == Status.GOOD
    assert image.unmapped == [(0, 1)]
    thick = Target(MemoryImage(8), "d", thin_provisioning=False)
    check(thick.execute("i1", unmap_cdb(0)), SenseKey.ILLEGAL_REQUEST,
          INVALID_COMMAND_OPERATION_CODE)


def test_write_same(target: Target, image: MemoryImage) -> None:
    pattern = b"\xab" * 512
    assert target.execute("i1", write_same16(10, 3), pattern).status == Status.GOOD
    assert image.read(10, 3) == pattern * 3
    assert target.execute("i1", write_same16(10, 3, unmap=True), bytes(512)).status == 0
    assert image.unmapped == [(10, 3)] and image.read(10, 3) == bytes(1536)
    assert target.execute("i1", write_same16(20, 2, ndob=True)).status == Status.GOOD
    check(target.execute("i1", write_same16(0, 0), pattern), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_CDB)
    check(target.execute("i1", write_same16(2047, 2), pattern), SenseKey.ILLEGAL_REQUEST,
          LBA_OUT_OF_RANGE)


def test_unmap_and_write_same_deallocate_whole_blocks_of_a_dynamic_vhd(tmp_path: Path) -> None:
    """UNMAP and WRITE SAME(16) with UNMAP free whole 2 MiB blocks; partial ones read zeros."""
    spb = 2 * 1024 * 1024 // SECTOR  # sectors per block
    path = tmp_path / "d.vhd"
    create_image(path, 5 * spb * SECTOR, "dynamic")
    with open_image(path, writable=True) as image:
        assert isinstance(image, DynamicImage)
        target = Target(image, "dyn")
        for lba in range(0, 5 * spb, 2048):
            assert target.execute("i1", write16(lba, 2048), b"\x01" * 2048 * SECTOR).status == 0
        assert image.allocated_blocks == 5
        params = unmap_list((0, spb + 8))  # block 0 whole, 8 sectors of block 1
        assert target.execute("i1", unmap_cdb(len(params)), params).status == Status.GOOD
        assert image.allocated_blocks == 4
        assert target.execute("i1", write_same16(2 * spb, spb, unmap=True),
                              bytes(SECTOR)).status == Status.GOOD
        assert target.execute("i1", write_same16(3 * spb, spb, unmap=True, ndob=True)
                              ).status == Status.GOOD
        assert image.allocated_blocks == 2  # blocks 1 (partly unmapped) and 4
        assert target.execute("i1", read16(0, spb + 8)).data_in == bytes((spb + 8) * SECTOR)
        assert target.execute("i1", read16(spb + 8, 1)).data_in == b"\x01" * SECTOR
        assert target.execute("i1", read16(2 * spb, 2 * spb)).data_in == bytes(2 * spb * SECTOR)
        # a non-zero pattern with UNMAP is written, not unmapped
        assert target.execute("i1", write_same16(2 * spb, 1, unmap=True), b"\x07" * SECTOR
                              ).status == Status.GOOD
        assert image.allocated_blocks == 3 and image.read(2 * spb, 1) == b"\x07" * SECTOR


def test_report_luns(target: Target) -> None:
    assert target.execute("i1", report_luns()).data_in == struct.pack(">II", 8, 0) + bytes(8)
    check(target.execute("i1", report_luns(8)), SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)


def _mode_pages(data: bytes, header_bytes: int) -> dict[int, bytes]:
    descriptor_bytes = data[3] if header_bytes == 4 else struct.unpack(">H", data[6:8])[0]
    offset, pages = header_bytes + descriptor_bytes, {}
    while offset < len(data):
        pages[data[offset] & 0x3F] = data[offset : offset + 2 + data[offset + 1]]
        offset += 2 + data[offset + 1]
    return pages


def test_mode_sense(target: Target) -> None:
    data = target.execute("i1", mode_sense6(0x3F)).data_in
    assert data[0] == len(data) - 1 and data[3] == 8
    assert struct.unpack(">I", data[4:8])[0] == 2048
    pages = _mode_pages(data, 4)
    assert sorted(pages) == [0x08, 0x0A] and pages[0x08][2] & 0x04  # WCE
    caching = target.execute("i1", mode_sense6(0x08, dbd=True)).data_in
    assert caching[3] == 0 and list(_mode_pages(caching, 4)) == [0x08]
    long = target.execute("i1", mode_sense10(0x0A, llbaa=True)).data_in
    assert struct.unpack(">H", long[:2])[0] == len(long) - 2 and long[4] == 1
    assert struct.unpack(">Q", long[8:16])[0] == 2048 and list(_mode_pages(long, 8)) == [0x0A]
    check(target.execute("i1", mode_sense6(0x3F, pc=3)), SenseKey.ILLEGAL_REQUEST,
          SAVING_PARAMETERS_NOT_SUPPORTED)
    check(target.execute("i1", mode_sense6(0x1C)), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_CDB)
    assert target.execute("i1", mode_sense6(0x3F, subpage=0xFF)).status == Status.GOOD


def test_request_sense_without_pending_condition(target: Target) -> None:
    data = target.execute("i1", request_sense()).data_in
    sense = SenseData.unpack(data)
    assert sense.key == SenseKey.NO_SENSE and sense.code == (0, 0)
    check(target.execute("i1", request_sense(desc=True)), SenseKey.ILLEGAL_REQUEST,
          INVALID_FIELD_IN_CDB)


class FailingImage(MemoryImage):
    def read(self, lba: int, count: int) -> bytes:
        raise OSError(5, "I/O error")


def test_image_failure_is_medium_error() -> None:
    target = Target(FailingImage(8), "d")
    check(target.execute("i1", read10(0, 1)), SenseKey.MEDIUM_ERROR, (0x11, 0x00))


# --- bounded fuzz: arbitrary CDBs and data never escape as exceptions--------------------

_OPCODES = [0x00, 0x03, 0x12, 0x1A, 0x25, 0x28, 0x2A, 0x35, 0x42, 0x5A, 0x5E, 0x5F,
            0x88, 0x8A, 0x91, 0x93, 0x9E, 0xA0, 0xFF]


@st.composite
def _cdbs(draw: st.DrawFn) -> bytes:
    opcode = draw(st.sampled_from(_OPCODES))
    rest = draw(st.binary(min_size=0, max_size=16))
    return bytes([opcode]) + rest


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cdb=st.one_of(_cdbs(), st.binary(max_size=20)), data=st.binary(max_size=1200),
       initiator=st.sampled_from(["a", "b", "c"]))
def test_fuzz_target_never_raises(cdb: bytes, data: bytes, initiator: str) -> None:
    image = MemoryImage(64)
    response = Target(image, "fuzz").execute(initiator, cdb, data, data_in_limit_bytes=4096)
    assert response.status in set(Status)
    if response.status == Status.CHECK_CONDITION:
        SenseData.unpack(response.sense)
    assert len(response.data_in) <= 4096


def get_lba_status(lba: int, alloc: int = 1024) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def lba_status_runs(data: bytes) -> list[tuple[int, int, int]]:
    (length,) = struct.unpack_from(">I", data)
    assert length == len(data) - 4 and (len(data) - 8) % 16 == 0
    return [struct.unpack_from(">QIB", data, offset) for offset in range(8, len(data), 16)]


def test_get_lba_status_maps_a_dynamic_vhd(tmp_path: Path) -> None:
    """GET LBA STATUS: mapped (0) for allocated 2 MiB blocks, deallocated (1) for the rest,
    from the asked LBA to the end, merged into runs; out of range is ILLEGAL REQUEST."""
    spb = 2 * 1024 * 1024 // SECTOR
    path = tmp_path / "d.vhd"
    create_image(path, 4 * spb * SECTOR, "dynamic")
    with open_image(path, writable=True) as image:
        target = Target(image, "dyn")
        assert target.execute("i1", write16(spb + 5, 1), b"\x01" * SECTOR).status == Status.GOOD
        assert target.execute("i1", write16(3 * spb, 1), b"\x01" * SECTOR).status == Status.GOOD
        answer = target.execute("i1", get_lba_status(0))
        assert answer.status == Status.GOOD
        assert lba_status_runs(answer.data_in) == [
            (0, spb, 1), (spb, spb, 0), (2 * spb, spb, 1), (3 * spb, spb, 0)]
        tail = target.execute("i1", get_lba_status(spb + 100)).data_in
        assert lba_status_runs(tail)[0] == (spb + 100, spb - 100, 0)
        two = target.execute("i1", get_lba_status(0, alloc=8 + 2 * 16)).data_in
        assert lba_status_runs(two) == [(0, spb, 1), (spb, spb, 0)]
        check(target.execute("i1", get_lba_status(4 * spb)), SenseKey.ILLEGAL_REQUEST,
              LBA_OUT_OF_RANGE)
