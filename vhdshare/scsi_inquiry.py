"""Parameter data that only describes the disk: INQUIRY, VPD pages, MODE SENSE,
READ CAPACITY and REPORT LUNS (SPC-4 6.6, 7.8; SBC-3 5.16, 5.17, 6.4, 6.6).

Why here: these answers depend on the disk's identity and geometry only, not
on its contents or on reservations, so they are pure functions of `DiskInfo`.
The device identifiers are derived from the disk id with SHA-256, so every node
of the cluster reports the same serial number and NAA designator for the same
disk — guest clusters (Windows failover clustering, multipath) rely on that.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from vhdshare.scsi import (
    SAVING_PARAMETERS_NOT_SUPPORTED,
    illegal_request,
    invalid_field,
)
from vhdshare.scsi_cdb import ModeSense

VENDOR = b"CLUSTRFS"
PRODUCT = b"vhdshare disk".ljust(16)
REVISION = b"0001"

STANDARD_INQUIRY = struct.Struct(">BBBBBBBB8s16s4s20sBB16s22s")
assert STANDARD_INQUIRY.size == 96
VPD_HEADER = struct.Struct(">BBH")  # peripheral device type, page code, page length
assert VPD_HEADER.size == 4
DESIGNATOR_HEADER = struct.Struct(">BBBB")  # protocol|code set, PIV|assoc|type, -, length
assert DESIGNATOR_HEADER.size == 4
BLOCK_LIMITS = struct.Struct(">BBHIIIIIIIQ20s")  # VPD 0xB0 after its header
assert BLOCK_LIMITS.size == 60
BLOCK_DEVICE_CHARACTERISTICS = struct.Struct(">HBBB55s")  # VPD 0xB1: rotation rate, ...
assert BLOCK_DEVICE_CHARACTERISTICS.size == 60
NON_ROTATING_MEDIUM = 0x0001
LOGICAL_BLOCK_PROVISIONING = struct.Struct(">BBBB")  # VPD 0xB2 after its header
assert LOGICAL_BLOCK_PROVISIONING.size == 4
READ_CAPACITY10_DATA = struct.Struct(">II")  # last LBA, block length
assert READ_CAPACITY10_DATA.size == 8
READ_CAPACITY16_DATA = struct.Struct(">QIBBH16s")  # last LBA, length, prot, exps, LBPME|...
assert READ_CAPACITY16_DATA.size == 32
MODE_HEADER6 = struct.Struct(">BBBB")  # data length, medium type, device specific, bd length
assert MODE_HEADER6.size == 4
MODE_HEADER10 = struct.Struct(">HBBBBH")  # data length, medium, dev specific, LONGLBA, -, bd len
assert MODE_HEADER10.size == 8
SHORT_BLOCK_DESCRIPTOR = struct.Struct(">II")  # blocks; reserved byte + 3-byte block length
assert SHORT_BLOCK_DESCRIPTOR.size == 8
LONG_BLOCK_DESCRIPTOR = struct.Struct(">Q4sI")  # blocks, -, block length
assert LONG_BLOCK_DESCRIPTOR.size == 16
REPORT_LUNS_HEADER = struct.Struct(">I4s")  # LUN list length, -
assert REPORT_LUNS_HEADER.size == 8

DIRECT_ACCESS_DEVICE = 0x00
VERSION_SPC4 = 0x06
HISUP_FORMAT2 = 0x12  # HISUP, response data format 2
CMDQUE = 0x02
VERSION_DESCRIPTORS = struct.pack(">HHHH4s", 0x00A0, 0x0460, 0x04C0, 0x0960, b"")  # SAM-5..
CODE_SET_BINARY, CODE_SET_ASCII = 1, 2
DESIGNATOR_T10_VENDOR_ID, DESIGNATOR_NAA = 1, 3
NAA_LOCALLY_ASSIGNED = 0x3
DPOFUA = 0x10
MODE_PAGE_CACHING, MODE_PAGE_CONTROL, MODE_PAGE_ALL = 0x08, 0x0A, 0x3F
PAGE_CONTROL_CHANGEABLE, PAGE_CONTROL_SAVED = 1, 3
WCE = 0x04
LBPME, LBPRZ = 0x8000, 0x4000
LBPU, LBPWS = 0x80, 0x40
PROVISIONING_THIN = 0x02
MAX_UNMAP_BLOCK_DESCRIPTORS = 256


@dataclass(frozen=True, slots=True)
class DiskInfo:
    disk_id: str
    block_count: int
    block_size: int
    thin_provisioning: bool
    max_transfer_blocks: int
    max_unmap_blocks: int
    max_write_same_blocks: int
    unmap_granularity_blocks: int

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(b"vhdshare-disk:" + self.disk_id.encode("utf-8", "replace")).digest()

    @property
    def serial(self) -> bytes:
        return self.digest[:12].hex().encode("ascii")

    @property
    def naa(self) -> bytes:
        value = int.from_bytes(self.digest[:8], "big") & ((1 << 60) - 1)
        return ((NAA_LOCALLY_ASSIGNED << 60) | value).to_bytes(8, "big")

    @property
    def last_lba(self) -> int:
        return max(0, self.block_count - 1)


def standard_inquiry() -> bytes:
    return STANDARD_INQUIRY.pack(
        DIRECT_ACCESS_DEVICE, 0, VERSION_SPC4, HISUP_FORMAT2, STANDARD_INQUIRY.size - 5,
        0, 0, CMDQUE, VENDOR, PRODUCT, REVISION, b"", 0, 0, VERSION_DESCRIPTORS, b"",
    )


def vpd_page(page_code: int, info: DiskInfo) -> bytes:
    builder = _VPD_PAGES.get(page_code)
    if builder is None:
        raise invalid_field(2)
    body = builder(info)
    return VPD_HEADER.pack(DIRECT_ACCESS_DEVICE, page_code, len(body)) + body


def _supported_pages(info: DiskInfo) -> bytes:
    return bytes(sorted(_VPD_PAGES))


def _unit_serial_number(info: DiskInfo) -> bytes:
    return info.serial


def _designator(code_set: int, designator_type: int, value: bytes) -> bytes:
    return DESIGNATOR_HEADER.pack(code_set, designator_type, 0, len(value)) + value


def _device_identification(info: DiskInfo) -> bytes:
    t10 = VENDOR + b"vhdshare-" + info.serial
    return _designator(CODE_SET_BINARY, DESIGNATOR_NAA, info.naa) + _designator(
        CODE_SET_ASCII, DESIGNATOR_T10_VENDOR_ID, t10
    )


def _block_limits(info: DiskInfo) -> bytes:
    unmap_blocks = info.max_unmap_blocks if info.thin_provisioning else 0
    unmap_descriptors = MAX_UNMAP_BLOCK_DESCRIPTORS if info.thin_provisioning else 0
    return BLOCK_LIMITS.pack(
        0x01,  # WSNZ: WRITE SAME with zero blocks is refused
        0,
        1,
        info.max_transfer_blocks,
        0,
        0,
        unmap_blocks,
        unmap_descriptors,
        info.unmap_granularity_blocks,
        0,
        info.max_write_same_blocks,
        b"",
    )


def _block_device_characteristics(info: DiskInfo) -> bytes:
    # Solid state as far as a VM can tell: no seek penalty worth scheduling for.
    return BLOCK_DEVICE_CHARACTERISTICS.pack(NON_ROTATING_MEDIUM, 0, 0, 0, b"")


def _logical_block_provisioning(info: DiskInfo) -> bytes:
    if not info.thin_provisioning:
        return LOGICAL_BLOCK_PROVISIONING.pack(0, 0, 0, 0)
    return LOGICAL_BLOCK_PROVISIONING.pack(0, LBPU | LBPWS, PROVISIONING_THIN, 0)


_VPD_PAGES = {
    0x00: _supported_pages,
    0x80: _unit_serial_number,
    0x83: _device_identification,
    0xB0: _block_limits,
    0xB1: _block_device_characteristics,
    0xB2: _logical_block_provisioning,
}


def read_capacity10(info: DiskInfo) -> bytes:
    return READ_CAPACITY10_DATA.pack(min(info.last_lba, 0xFFFFFFFF), info.block_size)


def read_capacity16(info: DiskInfo) -> bytes:
    provisioning = LBPME if info.thin_provisioning else 0
    return READ_CAPACITY16_DATA.pack(info.last_lba, info.block_size, 0, 0, provisioning, b"")


LBA_STATUS_HEADER = struct.Struct(">I4s")  # parameter data length, -
assert LBA_STATUS_HEADER.size == 8
LBA_STATUS_DESCRIPTOR = struct.Struct(">QIB3s")  # LBA, block count, provisioning status, -
assert LBA_STATUS_DESCRIPTOR.size == 16
PROVISIONING_MAPPED = 0
PROVISIONING_DEALLOCATED = 1


def lba_status(runs: list[tuple[int, int, bool]]) -> bytes:
    """GET LBA STATUS parameter data for (first LBA, block count, mapped) runs."""
    descriptors = b"".join(
        LBA_STATUS_DESCRIPTOR.pack(lba, count, PROVISIONING_MAPPED if mapped
                                   else PROVISIONING_DEALLOCATED, b"")
        for lba, count, mapped in runs)
    return LBA_STATUS_HEADER.pack(len(descriptors) + 4, b"") + descriptors


def report_luns() -> bytes:
    lun0 = bytes(8)
    return REPORT_LUNS_HEADER.pack(len(lun0), b"") + lun0


# --- MODE SENSE --------------------------------------------------------------------


def _caching_page(changeable: bool) -> bytes:
    return bytes([MODE_PAGE_CACHING, 0x12, 0 if changeable else WCE]) + bytes(17)


def _control_page(changeable: bool) -> bytes:
    if changeable:
        return bytes([MODE_PAGE_CONTROL, 0x0A]) + bytes(10)
    # GLTSD; unrestricted reordering; busy timeout "unlimited".
    return bytes([MODE_PAGE_CONTROL, 0x0A, 0x02, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])


def _mode_pages(command: ModeSense) -> bytes:
    if command.page_control == PAGE_CONTROL_SAVED:
        raise illegal_request(SAVING_PARAMETERS_NOT_SUPPORTED, field_pointer=2, bit_pointer=7)
    changeable = command.page_control == PAGE_CONTROL_CHANGEABLE
    if command.page_code == MODE_PAGE_ALL:
        if command.subpage_code not in (0x00, 0xFF):
            raise invalid_field(3)
        return _caching_page(changeable) + _control_page(changeable)
    if command.subpage_code != 0:
        raise invalid_field(3)
    if command.page_code == MODE_PAGE_CACHING:
        return _caching_page(changeable)
    if command.page_code == MODE_PAGE_CONTROL:
        return _control_page(changeable)
    raise invalid_field(2, 5)


def _block_descriptor(command: ModeSense, info: DiskInfo) -> bytes:
    if command.disable_block_descriptors:
        return b""
    if command.ten_byte and command.long_lba:
        return LONG_BLOCK_DESCRIPTOR.pack(info.block_count, b"", info.block_size)
    return SHORT_BLOCK_DESCRIPTOR.pack(min(info.block_count, 0xFFFFFFFF), info.block_size)


def mode_sense(command: ModeSense, info: DiskInfo) -> bytes:
    pages = _mode_pages(command)
    descriptor = _block_descriptor(command, info)
    if command.ten_byte:
        long_lba = 1 if len(descriptor) == LONG_BLOCK_DESCRIPTOR.size else 0
        total = MODE_HEADER10.size + len(descriptor) + len(pages)
        header = MODE_HEADER10.pack(total - 2, 0, DPOFUA, long_lba, 0, len(descriptor))
    else:
        total = MODE_HEADER6.size + len(descriptor) + len(pages)
        header = MODE_HEADER6.pack(total - 1, 0, DPOFUA, len(descriptor))
    return header + descriptor + pages
