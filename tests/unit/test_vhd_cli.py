"""The `vhdshare` command line: create, info, check, convert, and its error messages."""

import json
import os
import sys
from pathlib import Path

import pytest

from vhdshare.cli import main, parse_size
from vhdshare.image import open_image

MIB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("text", "size"), [("10G", 10 << 30), ("512M", 512 << 20), ("4096", 4096),
                                            ("1.5k", 1536), ("2MiB", 2 << 20), ("1T", 1 << 40)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_create_info_json_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "d.vhd")
    assert run(capsys, "create", path, "--size", "33M", "--type", "fixed") == (0, "", "")
    code, out, _ = run(capsys, "info", path, "--json")
    facts = json.loads(out)
    assert code == 0 and facts["type"] == "fixed" and facts["virtual_size_bytes"] == 33 * MIB
    code, out, _ = run(capsys, "info", path)
    assert "virtual size: 33 MiB (34603008 bytes)" in out
    assert run(capsys, "check", path)[:2] == (0, f"{path}: no problems found\n")


def test_check_reports_and_repairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.vhd"
    assert main(["create", str(path), "--size", "4M"]) == 0
    raw = path.read_bytes()
    path.write_bytes(bytes(512) + raw[512:])
    code, out, err = run(capsys, "check", str(path))
    assert code == 1 and "footer copy at offset 0 is damaged" in out and "--repair" in err
    code, out, _ = run(capsys, "check", str(path), "--repair")
    assert code == 0 and "(repaired)" in out and path.read_bytes() == raw


def test_check_does_not_suggest_a_repair_it_cannot_make(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.vhd"
    assert main(["create", str(path), "--size", "4M", "--type", "fixed"]) == 0
    damaged = path.read_bytes()[:-512] + b"conectix" + bytes(504)  # the only footer lost
    path.write_bytes(damaged)
    for argv in (["check", str(path)], ["check", str(path), "--repair"]):
        code, out, err = run(capsys, *argv)
        assert code == 1 and "cannot repair" in out
        assert "try --repair" not in err and "cannot be repaired safely" in err
        assert len(err.splitlines()) == 1
    assert path.read_bytes() == damaged


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "{d}/x.vhd", "--size", "1000"], "not a multiple of 512"),
        (["create", "{d}/x.vhd", "--size", "3T"], "2040 GiB"),
        (["create", "{d}/nodir/x.vhd", "--size", "1M"], "No such file or directory"),
        (["info", "{d}/missing.vhd"], "cannot open"),
        (["check", "{d}/garbage"], "not a VHD image"),
        (["convert", "{d}/garbage", "{d}/garbage", "--type", "raw"], "already exists"),
        (["convert", "{d}/odd", "{d}/out.vhd", "--type", "dynamic"], "not a multiple of 512"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             argv: list[str], message: str) -> None:
    (tmp_path / "garbage").write_bytes(b"\x01" * 4096)
    (tmp_path / "odd").write_bytes(b"\x01" * 1000)
    code, out, err = run(capsys, *[a.format(d=tmp_path) for a in argv])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("vhdshare: error: ") and message in err
    assert not (tmp_path / "out.vhd").exists()


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["frobnicate"], ["create", "x.vhd", "--size", "lots"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err


def test_convert_round_trips_sparsely(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "disk.raw"
    with open(src, "wb") as file:
        file.truncate(40 * MIB)
        file.seek(5 * MIB + 512)
        file.write(b"\xab" * 70000 + bytes(442))
        file.seek(40 * MIB - 4096)
        file.write(b"\xcd" * 4096)
    chain = [("disk.raw", "a.vhd", "dynamic"), ("a.vhd", "b.vhd", "fixed"),
             ("b.vhd", "c.vhd", "dynamic"), ("c.vhd", "back.raw", "raw")]
    for source, target, kind in chain:
        code, _, err = run(capsys, "convert", str(tmp_path / source), str(tmp_path / target),
                           "--type", kind)
        assert (code, err) == (0, "")  # no progress bar: stderr is not a terminal
    assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()
    with open_image(tmp_path / "c.vhd") as image:
        assert image.info()["blocks_allocated"] == 2  # zero runs were not written
    assert os.stat(tmp_path / "back.raw").st_blocks * 512 < 4 * MIB
    assert os.stat(tmp_path / "b.vhd").st_blocks * 512 < 4 * MIB


def test_convert_draws_a_progress_bar_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "disk.raw"
    with open(src, "wb") as file:
        file.truncate(8 * MIB)
        file.write(b"\x42" * MIB)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, "convert", str(src), str(tmp_path / "d.vhd"), "--type", "dynamic")
    assert (code, out) == (0, "")
    frames = err.split("\r")[1:]
    assert frames[0].startswith("[") and frames[-1].startswith("[" + "#" * 40 + "] 100% 8 MiB")
    assert err.endswith("\n") and err.count("\n") == 1  # one line, redrawn in place
