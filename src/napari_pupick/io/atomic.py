"""Atomic writes: every file napari-pupick writes goes through here.

Each target is written into a new temporary file beside it (``.NAME.RANDOM.tmp``, created with mode 0666 less the
umask, as an ordinary new file would be), then renamed over the target with ``os.replace``. A failed write removes
its temporary files and leaves every target as it was (byte for byte); a failed rename among several targets puts
the ones already replaced back. Errors are :class:`~napari_pupick.errors.WriteError` naming the target (never the
temporary file) and the cause.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_pupick.errors import WriteError

__all__ = ["atomic_write", "temp_path", "write_json", "write_text"]


def temp_path(target: Path) -> Path:
    """Create and return an empty, uniquely named temporary file beside ``target`` (mode 0666 less the umask)."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "x"):
                return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


def _check_target(target: Path) -> None:
    if target.is_dir():
        raise WriteError(f"{target}: is a folder, not a file to write")
    if not target.parent.is_dir():
        raise WriteError(f"{target}: its folder {target.parent} does not exist")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def atomic_write(jobs: Sequence[tuple[Path, Callable[[Path], None]]]) -> list[Path]:
    """Run each ``write(tmp)`` into a temporary file, then rename every temporary file over its target.

    If anything fails, every temporary file is removed and every target is as it was: existing targets are
    hard-linked (or copied) aside before the renames and put back when a later rename fails. An ``OSError`` comes
    out as ``WriteError`` naming the target; other exceptions (the package's own errors, KeyboardInterrupt) pass
    unchanged.
    """
    jobs = [(Path(target), write) for target, write in jobs]
    temps: list[Path] = []
    backups: dict[Path, Path | None] = {}
    done: list[Path] = []
    target = jobs[0][0] if jobs else None
    try:
        for target, _ in jobs:
            _check_target(target)
        for target, write in jobs:
            tmp = temp_path(target)
            temps.append(tmp)
            write(tmp)
        if len(jobs) > 1:
            for target, _ in jobs:
                if target.exists():
                    bak = temp_path(target)
                    bak.unlink()
                    try:
                        os.link(target, bak)
                    except OSError:
                        shutil.copy2(target, bak)
                    backups[target] = bak
                else:
                    backups[target] = None
        for (target, _), tmp in zip(jobs, temps):
            os.replace(tmp, target)
            done.append(target)
    except BaseException as exc:
        for old in done:  # put the old set back
            bak = backups.get(old)
            try:
                os.replace(bak, old) if bak is not None else old.unlink()
            except OSError:
                pass
        for tmp in temps + [b for b in backups.values() if b is not None]:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(f"{target}: cannot write ({_reason(exc)}); the file is unchanged") from None
        raise
    for bak in backups.values():
        if bak is not None:
            bak.unlink(missing_ok=True)
    return [target for target, _ in jobs]


def _write_text(tmp: Path, text: str) -> None:
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8, LF line ends) to ``path`` atomically."""
    return atomic_write([(Path(path), lambda tmp: _write_text(tmp, text))])[0]


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (serialised first: nothing is written if it fails)."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")
