"""Atomic writes leave either the old file or the complete new one."""

from __future__ import annotations

import pytest

from holons.files import atomic_write


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os

    target = tmp_path / "b.txt"
    with atomic_write(target, "w") as f:
        f.write("x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path):
    from holons.files import atomic_path

    target = tmp_path / "c.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]
