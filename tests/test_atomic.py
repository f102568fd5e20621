"""Atomic writes (io.atomic): a failed write leaves the old file byte-identical, no temporary file and no open
descriptor; new files get the umask's permissions; errors name the target, never the temporary file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_pupick.errors import WriteError
from napari_pupick.io import atomic, read_micrograph, write_coordinates, write_micrograph
from napari_pupick.io.atomic import write_json


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else 0


def _tiny_checkpoint():
    import torch

    from napari_pupick.training import Checkpoint

    return Checkpoint(model="conv3", model_params={"width": 0.25}, state_dict={"w": torch.zeros(2)})


def _write_json(path):
    write_json(path, {"new": [1, 2, 3]})


def _write_mrc(path):
    write_micrograph(path, np.ones((8, 9), np.float32))


def _write_star(path):
    write_coordinates(pd.DataFrame({"micrograph": ["a"], "x": [1.0], "y": [2.0], "score": [0.5]}), path)


def _write_checkpoint(path):
    _tiny_checkpoint().save(path)


WRITERS = {"preprocess.json": _write_json, "mic.mrc": _write_mrc, "picks.star": _write_star,
           "model.pt": _write_checkpoint}


def _disk_full_after_some_bytes(monkeypatch):
    """Every write into a temporary file writes a few bytes, then fails as a full disk does."""
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            if isinstance(data, (str, bytes)):
                self.fh.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if str(file).endswith(".tmp") and ("w" in mode or "+" in mode):
            return Full(fh)
        return fh

    import builtins

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_failed_write_leaves_the_old_file_byte_identical(tmp_path, monkeypatch, name):
    target = tmp_path / name
    target.write_bytes(b"the old content\n")
    before = _open_fds()
    _disk_full_after_some_bytes(monkeypatch)
    with pytest.raises(WriteError) as info:
        WRITERS[name](target)
    monkeypatch.undo()
    assert str(target) in str(info.value) and ".tmp" not in str(info.value)
    assert "No space left" in str(info.value)
    assert target.read_bytes() == b"the old content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left
    assert _open_fds() == before


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_new_files_get_the_umask_permissions(tmp_path, name, umask):
    old = os.umask(umask)
    try:
        WRITERS[name](tmp_path / name)
    finally:
        os.umask(old)
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_folder_in_the_way_is_named(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(WriteError, match=f"{name}: is a folder"):
        WRITERS[name](tmp_path / name)


def test_a_read_only_folder_is_named(tmp_path, monkeypatch):
    def refused(target):
        raise PermissionError(errno.EACCES, "Permission denied", str(target.with_name(".x.tmp")))

    monkeypatch.setattr(atomic, "temp_path", refused)
    with pytest.raises(WriteError, match=r"out.json: cannot write \(Permission denied\)") as info:
        write_json(tmp_path / "out.json", {})
    assert ".tmp" not in str(info.value)


def test_a_value_that_cannot_be_serialised_writes_nothing(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("{}")
    with pytest.raises(TypeError):
        write_json(target, {"x": object()})
    assert target.read_text() == "{}" and len(list(tmp_path.iterdir())) == 1


def test_round_trips_still_work(tmp_path):
    _write_mrc(tmp_path / "m.mrc")
    assert read_micrograph(tmp_path / "m.mrc").shape == (8, 9)
    _write_checkpoint(tmp_path / "c.pt")
    from napari_pupick.training import Checkpoint

    assert Checkpoint.load(tmp_path / "c.pt").model == "conv3"
