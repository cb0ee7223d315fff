"""Atomic writes: the new file replaces the old whole, with a normal file's mode; a failed write changes nothing."""

import stat

import pytest

from toolchain.errors import ToolchainError
from toolchain.files import atomic_path, write_text


def test_write_text_replaces_the_file_with_a_normal_mode(tmp_path):
    target, plain = tmp_path / "report.json", tmp_path / "plain.txt"
    target.write_text("old")
    plain.write_text("made by open()")
    target.chmod(0o600)
    write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "report.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "table.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.npz"]


def test_an_unwritable_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ToolchainError, match=r"cannot write .*missing/out.json"):
        write_text(tmp_path / "missing" / "out.json", "{}")
