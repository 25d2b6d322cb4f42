"""atomic_path / atomic_write_bytes / check_output_path."""

from __future__ import annotations

import errno

import pytest

from carbonsr_cli.atomic import atomic_path, atomic_write_bytes, atomic_write_text, check_output_path
from carbonsr_cli.errors import OutputError


def test_atomic_write_bytes_replaces(tmp_path) -> None:
    dest = tmp_path / "ckpt.pth"
    atomic_write_bytes(dest, b"one")
    atomic_write_bytes(dest, b"two")
    assert dest.read_bytes() == b"two"
    atomic_write_text(tmp_path / "s.json", '{"a": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth", "s.json"]


def test_atomic_write_bytes_no_overwrite(tmp_path) -> None:
    dest = tmp_path / "x.json"
    dest.write_text("keep")
    with pytest.raises(OutputError, match="already exists"):
        atomic_write_bytes(dest, b"new", overwrite=False)
    assert dest.read_text() == "keep"


def test_temp_is_in_destination_dir_and_keeps_suffix(tmp_path) -> None:
    dest = tmp_path / "out.tif"
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.name.startswith(".out.tif.") and tmp.suffix == ".tif"
        tmp.write_bytes(b"data")
        assert not dest.exists()
    assert dest.read_bytes() == b"data" and not tmp.exists()


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_error_removes_temp(tmp_path, exc) -> None:
    dest = tmp_path / "out.bin"
    with pytest.raises(type(exc)):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"partial")
            (tmp.parent / (tmp.name + ".aux.xml")).write_text("<x/>")  # GDAL side-car
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_disk_full_becomes_output_error(tmp_path) -> None:
    dest = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="disk full") as ei:
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(dest) in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_other_oserrors_pass_through(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "o.bin"):
            open(tmp_path / "missing-input.tif", "rb")
    assert list(tmp_path.iterdir()) == []


def test_check_output_path(tmp_path) -> None:
    assert check_output_path(tmp_path / "new.tif") == (tmp_path / "new.tif").absolute()
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "nodir" / "x.tif")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(OutputError) as ei:
        check_output_path(f / "x.tif")
    assert str(f) in str(ei.value)
