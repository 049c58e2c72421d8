"""CDB decoding and sense data: typed results, strict errors, no other exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_scsi_target import (
    inquiry,
    mode_sense10,
    pr_out,
    read10,
    read16,
    report_luns,
    sync16,
    unmap_cdb,
    write10,
    write_same16,
)
from vhdshare.scsi import (
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    Access,
    CheckCondition,
    OpClass,
    SenseData,
    SenseKey,
)
from vhdshare.scsi_cdb import (
    Inquiry,
    ModeSense,
    PersistentReserveOut,
    Read,
    ReportLuns,
    SynchronizeCache,
    Unmap,
    Write,
    WriteSame16,
    data_in_length_bytes,
    data_out_length_bytes,
    decode_cdb,
    lba_range,
)


@pytest.mark.parametrize(
    ("cdb", "expected"),
    [
        (read10(7, 3, fua=True), Read(7, 3, True)),
        (read16(2**40, 2**20), Read(2**40, 2**20, False)),
        (write10(1, 2), Write(1, 2, False)),
        (sync16(5, 6), SynchronizeCache(5, 6)),
        (unmap_cdb(24), Unmap(24)),
        (write_same16(9, 4, unmap=True), WriteSame16(9, 4, True, False)),
        (inquiry(True, 0x83, 300), Inquiry(True, 0x83, 300)),
        (mode_sense10(0x08, llbaa=True), ModeSense(0x08, 0, 0, False, True, 4096, True)),
        (report_luns(100), ReportLuns(0, 100)),
        (pr_out(4, 3), PersistentReserveOut(4, 0, 3, 24)),
    ],
)
def test_decode(cdb: bytes, expected: object) -> None:
    assert decode_cdb(cdb) == expected
    assert decode_cdb(cdb + bytes(16 - len(cdb))) == expected  # padded CDBs are fine


def _sense_of(cdb: bytes) -> SenseData:
    with pytest.raises(CheckCondition) as caught:
        decode_cdb(cdb)
    return caught.value.sense_data


def test_unknown_opcode() -> None:
    sense = _sense_of(bytes([0xC0]) + bytes(15))
    assert (sense.key, sense.code, sense.field_pointer) == (
        SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE, 0
    )


@pytest.mark.parametrize(
    ("cdb", "field_pointer"),
    [
        (read10(0, 1)[:9], 9),  # too short
        (read10(0, 1)[:1] + b"\x20" + read10(0, 1)[2:], 1),  # RDPROTECT
        (read10(0, 1)[:9] + b"\x04", 9),  # NACA in the control byte
        (inquiry(False, 0x80), 2),  # page code without EVPD
        (write_same16(0, 0), 10),  # WSNZ
        (report_luns(15), 6),  # allocation length below 16
        (unmap_cdb(0)[:1] + b"\x01" + unmap_cdb(0)[2:], 1),  # ANCHOR
    ],
)
def test_invalid_fields_point_at_the_byte(cdb: bytes, field_pointer: int) -> None:
    sense = _sense_of(cdb)
    assert sense.code == INVALID_FIELD_IN_CDB and sense.field_pointer == field_pointer


def test_features() -> None:
    read = decode_cdb(read10(10, 4))
    assert (read.op_class, read.access, lba_range(read)) == (OpClass.READ, Access.READ, (10, 4))
    assert data_in_length_bytes(read, 512) == 2048 and data_out_length_bytes(read, 512) == 0
    write = decode_cdb(write10(3, 2))
    assert (write.op_class, write.access) == (OpClass.WRITE, Access.WRITE)
    assert data_out_length_bytes(write, 512) == 1024
    assert decode_cdb(pr_out(0)).op_class == OpClass.RESERVATION
    assert decode_cdb(inquiry()).op_class == OpClass.INQUIRY
    assert lba_range(decode_cdb(inquiry())) is None


@settings(max_examples=100, deadline=None)
@given(
    key=st.sampled_from(list(SenseKey)),
    asc=st.integers(0, 255),
    ascq=st.integers(0, 255),
    information=st.integers(0, 2**32 - 1),
    pointer=st.none() | st.integers(0, 0xFFFF),
    bit=st.none() | st.integers(0, 7),
    in_cdb=st.booleans(),
)
def test_sense_round_trip(key: SenseKey, asc: int, ascq: int, information: int,
                          pointer: int | None, bit: int | None, in_cdb: bool) -> None:
    if pointer is None:
        bit, in_cdb = None, True
    sense = SenseData(key, asc, ascq, information, pointer, in_cdb, bit)
    packed = sense.pack()
    assert len(packed) == 18 and packed[0] & 0x7F == 0x70 and packed[7] == 10
    assert SenseData.unpack(packed) == sense


_KNOWN_OPCODES = [0x00, 0x03, 0x12, 0x1A, 0x25, 0x28, 0x2A, 0x35, 0x42, 0x5A, 0x5E, 0x5F,
                  0x88, 0x8A, 0x91, 0x93, 0x9E, 0xA0]
_cdbs = st.one_of(
    st.binary(max_size=24),
    st.tuples(st.sampled_from(_KNOWN_OPCODES), st.binary(max_size=20)).map(
        lambda pair: bytes([pair[0]]) + pair[1]
    ),
)


@settings(max_examples=500, deadline=None)
@given(_cdbs)
def test_fuzz_decoder_raises_only_check_condition(cdb: bytes) -> None:
    try:
        decode_cdb(cdb)
    except CheckCondition as error:
        assert error.sense_data.key == SenseKey.ILLEGAL_REQUEST
