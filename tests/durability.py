"""Test helpers for durable writes: record the fsyncs and renames a publish makes, and
check that a published folder was on disk before its name was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def record_publishing(monkeypatch) -> list[tuple[str, Path]]:
    """What a durable publish does, in order: ("fsync", the path of the descriptor synced)
    and ("rename", the staged folder) for each ``io.replace_dir``."""
    import dpm_vec.io as io_module

    events: list[tuple[str, Path]] = []
    fsync, replace_dir = os.fsync, io_module.replace_dir

    def synced(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def renamed(src: Path, dst: Path) -> None:
        events.append(("rename", Path(src)))
        replace_dir(src, dst)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(io_module, "replace_dir", renamed)
    return events


def assert_published_durably(events: list[tuple[str, Path]], out: Path) -> list[tuple[str, Path]]:
    """Every file and folder of ``out`` was synced, under its staged name, before the
    rename, the staged folder last; the folder holding ``out`` right after it. Returns the
    events that followed."""
    kinds = [kind for kind, _ in events]
    assert kinds.count("rename") == 1
    rename = kinds.index("rename")
    staging, out = events[rename][1].resolve(), out.resolve()
    before = [path for kind, path in events[:rename] if kind == "fsync"]
    assert {staging / path.relative_to(out) for path in out.rglob("*")} | {staging} <= set(before)
    assert before[-1] == staging  # the folder last, after everything in it
    assert events[rename + 1] == ("fsync", out.parent.resolve())
    return events[rename + 2:]


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsync'd descriptor by /proc/self/fd")
