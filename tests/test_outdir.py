"""What a command may replace, one writer per output, and a sweep killed outright
leaving nothing running and nothing behind (SIGINT and SIGTERM: test_sweep.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from dpm_vec.errors import DpmVecError
from dpm_vec.outdir import BOOK_MARKER, SWEEP_MARKER, check_replaceable, exclusive, stale_work
from dpm_vec.sweep import sweep
from tests.test_sweep import _book, _sweep_command, _sweep_workers, _wait_for_commits

DATA = Path(__file__).resolve().parents[1] / "data"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpm_vec.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out, says", [
    ("book", "would replace the input"),
    (".", "would replace the input"),
    ("notes.txt", "is a file, not a directory"),
    ("notes.txt/out", "is a file, not a directory"),
    ("project", "does not hold a previous sweep output (no manifest.json)"),
    ("annotated", "holds a previous sweep output and also notes.md, reports, which a sweep output does not write"),
    ("annotated_inside", "holds a previous sweep output and also intents/reports, runs/notes.txt, which a sweep output "
                         "does not write"),
])
def test_sweep_refuses_an_out_that_would_destroy_data(tmp_path, out, says):
    """The book itself, a folder holding it, a file, a path under a file, a folder of
    somebody's files, and an earlier sweep's output with somebody's files added: each is
    refused in one line, and nothing in it changes."""
    import shutil

    shutil.copytree(DATA / "sample_book", tmp_path / "book")
    (tmp_path / "notes.txt").write_text("keep me\n")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "a.py").write_text("print('keep me')\n")
    # an earlier sweep's output to which an analyst added notes and reports
    (tmp_path / "annotated" / "runs").mkdir(parents=True)
    (tmp_path / "annotated" / SWEEP_MARKER).write_text("{}\n")
    (tmp_path / "annotated" / "notes.md").write_text("keep me\n")
    (tmp_path / "annotated" / "reports").mkdir()
    (tmp_path / "annotated" / "reports" / "q4.csv").write_text("keep,me\n")
    # ... and one where they went inside its dataset folders, beside the part files
    for folder in ("runs", "intents/reports"):
        (tmp_path / "annotated_inside" / folder).mkdir(parents=True)
    (tmp_path / "annotated_inside" / SWEEP_MARKER).write_text("{}\n")
    (tmp_path / "annotated_inside" / "runs" / "part-00000.parquet").write_bytes(b"PAR1")
    (tmp_path / "annotated_inside" / "runs" / "notes.txt").write_text("keep me\n")
    (tmp_path / "annotated_inside" / "intents" / "reports" / "r.csv").write_text("keep,me\n")
    before = _files(tmp_path)
    proc = _cli("sweep", "book", "--out", out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dpm-vec: error: --out") and says in last, last
    assert _files(tmp_path) == before


def test_generate_refuses_a_folder_that_is_not_a_book(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "a.py").write_text("x\n")
    proc = _cli("generate", "--portfolios", "3", "--out", str(tmp_path / "project"))
    assert proc.returncode == 2 and "does not hold a previous book (no portfolios.parquet)" in proc.stderr
    assert (tmp_path / "project" / "a.py").read_text() == "x\n"
    assert _cli("generate", "--portfolios", "3", "--out", str(tmp_path / "book")).returncode == 0
    assert _cli("generate", "--portfolios", "4", "--out", str(tmp_path / "book")).returncode == 0  # a book replaces a book


def test_what_may_be_replaced(tmp_path, monkeypatch):
    check_replaceable(tmp_path / "new", SWEEP_MARKER, "sweep output")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", SWEEP_MARKER, "sweep output")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / SWEEP_MARKER).write_text("{}")
    check_replaceable(tmp_path / "old", SWEEP_MARKER, "sweep output")
    with pytest.raises(DpmVecError, match="no portfolios.parquet"):
        check_replaceable(tmp_path / "old", BOOK_MARKER, "book")
    with pytest.raises(DpmVecError, match="would replace the input"):
        check_replaceable(tmp_path, SWEEP_MARKER, "sweep output", (tmp_path / "old" / "book",))
    # a shell sitting in one of an earlier output's dataset folders would be left in a deleted folder
    (tmp_path / "old" / "runs").mkdir()
    monkeypatch.chdir(tmp_path / "old" / "runs")
    with pytest.raises(DpmVecError, match=r"old holds the working directory and would be replaced"):
        check_replaceable(tmp_path / "old", SWEEP_MARKER, "sweep output")


def test_a_folder_out_cannot_be_made_or_replaced_in_is_named(tmp_path, monkeypatch):
    """Where OUT's parent is not writable (a shared read-only mount, another user's folder:
    root, as in CI, may write anywhere, so the check is told so), OUT is refused before
    any work, naming the folder."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / SWEEP_MARKER).write_text("{}")
    monkeypatch.setattr("dpm_vec.outdir.os.access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(DpmVecError, match=rf"^--out {re.escape(str(tmp_path / 'new'))}: cannot create it, {re.escape(str(tmp_path))} is not writable$"):
        check_replaceable(tmp_path / "new", SWEEP_MARKER, "sweep output")
    with pytest.raises(DpmVecError, match=rf"^--out {re.escape(str(tmp_path / 'old'))}: cannot replace it, {re.escape(str(tmp_path))} is not writable$"):
        check_replaceable(tmp_path / "old", SWEEP_MARKER, "sweep output")
    check_replaceable(tmp_path / "old" / "new", SWEEP_MARKER, "sweep output")  # a writable folder inside is fine


def test_a_folder_that_takes_no_files_is_named_not_the_lock(tmp_path, monkeypatch):
    """Where OUT's folder refuses a file (a read-only mount; /sys even for root), the error
    names --out and that folder, not the lock file beside OUT."""
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("dpm_vec.outdir.open", refuse, raising=False)
    with pytest.raises(DpmVecError) as caught:
        with exclusive(tmp_path / "out"):
            pass
    assert str(caught.value) == f"--out {tmp_path / 'out'}: cannot write in {tmp_path} (Permission denied)"


def test_one_writer_per_output(tmp_path):
    """A second writer of the same output stops at once, naming the first; the lock goes
    when the first is done."""
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("dpm-vec pid 99999999\n")  # what a killed sweep left: unlocked, with its pid
    with exclusive(out):
        with pytest.raises(DpmVecError, match=rf"is being written by dpm-vec pid {os.getpid()}: wait"):
            with exclusive(out):
                pass
        with exclusive(tmp_path / "other"):  # another output is another lock
            pass
    with exclusive(out):
        pass


def test_a_finished_sweep_removes_what_killed_runs_left(tmp_path):
    """Work of a sweep with other arguments, and staging copies, do not pile up beside
    OUT: the next sweep that finishes removes them; other folders stay."""
    out = tmp_path / "out"
    # and the staging copy of a book that `generate` or `import-requests --out out` left when killed
    for leftover in (".out.work-0123456789abcdef", ".out.staging-89abcdef", ".out.old-01234567", ".out.tmp-89abcdef"):
        (tmp_path / leftover / "shards").mkdir(parents=True)
    (tmp_path / ".outer.work-0123456789abcdef").mkdir()
    assert len(stale_work(out)) == 4
    sweep(DATA / "sample_book", out, shard_size=250, threads=1, progress=False)
    assert stale_work(out) == []
    assert (tmp_path / ".outer.work-0123456789abcdef").exists() and (out / SWEEP_MARKER).exists()


class _Killed(BaseException):
    """The process dying midway: nothing after it runs, no handler catches it."""


def test_a_sweep_killed_while_it_deletes_its_work_finishes_when_run_again(tmp_path, monkeypatch):
    """A kill after the output is in place, while the finished sweep deletes its work dir,
    leaves that dir whole or gone: the same command run again finishes with the same
    output, instead of resuming shards that lost files."""
    import shutil

    book = _book(tmp_path, n=40)
    sweep(book, tmp_path / "whole", shard_size=40, threads=1, progress=False)
    out, rmtree = tmp_path / "out", shutil.rmtree

    def die_midway(path, *args, **kwargs):  # the first file goes, then the process dies
        if ".out." in Path(path).name:
            sorted(p for p in Path(path).rglob("runs.parquet"))[-1].unlink()
            raise _Killed
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", die_midway)
    with pytest.raises(_Killed):
        sweep(book, out, shard_size=20, threads=1, progress=False)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    manifest = sweep(book, out, shard_size=20, threads=1, progress=False)
    assert manifest["portfolios"] == 40 and stale_work(out) == []
    for table in ("runs", "intents", "positions_after"):
        assert pl.read_parquet(out / table / "*.parquet").equals(pl.read_parquet(tmp_path / "whole" / table / "*.parquet"))


def test_workers_die_with_a_killed_sweep(tmp_path):
    """kill -9 of the sweep alone (not its process group): its worker processes end too,
    instead of computing, and holding a shard's memory, for nobody."""
    import psutil

    book = _book(tmp_path, n=240, seed=27)
    out = tmp_path / "out"
    proc = subprocess.Popen(_sweep_command(book, out, "--processes", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait_for_commits(proc, out, 1)
    workers = _sweep_workers(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, [p.pid for p in alive]
    # the lock went with the killed process: the same command resumes at once
    assert subprocess.run(_sweep_command(book, out, "--processes", "2"), capture_output=True, timeout=300).returncode == 0


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    """Some network mounts refuse flock (ENOLCK): the sweep runs, unguarded, and says so."""
    import errno
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="dpm_vec.outdir"), exclusive(tmp_path / "out"):
        pass
    assert "nothing stops a second sweep writing" in caplog.text
    assert not (tmp_path / ".out.lock").exists()


def test_replacing_an_output_never_leaves_neither(tmp_path, monkeypatch):
    """A signal between two steps of replacing OUT (the old moved aside, the new not yet
    in) left no OUT at all; the swap is one step where Linux offers it."""
    from dpm_vec import io

    out, staged = tmp_path / "out", tmp_path / ".out.staging-0123abcd"
    for folder, text in ((out, "old"), (staged, "new")):
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
    real_replace = os.replace

    def interrupted(src, dst):  # the signal lands just after a rename
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    try:
        io.replace_dir(staged, out)
    except KeyboardInterrupt:
        pass
    assert (out / "manifest.json").read_text() in ("old", "new")


def test_replacing_an_output_without_the_one_step_swap(tmp_path, monkeypatch):
    """Where the system or the file system cannot swap two folders in one step (not Linux,
    an old C library, a file system without RENAME_EXCHANGE), the old OUT is moved aside,
    the new one moved in and the old one removed: OUT holds the new files, nothing is left."""
    from dpm_vec import io

    out, staged = tmp_path / "out", tmp_path / ".out.staging-0123abcd"
    for folder, text in ((out, "old"), (staged, "new")):
        (folder / "runs").mkdir(parents=True)
        (folder / "manifest.json").write_text(text)
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    io.replace_dir(staged, out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_leftover_that_cannot_be_removed_is_said_and_kept_in_place(tmp_path, monkeypatch, caplog):
    """A read-only leftover (an old OUT whose files are not writable) used to be renamed to a
    new ``.old-*`` name at every sweep while the log said it was removed."""
    import shutil

    from dpm_vec.outdir import remove_stale_work

    out = tmp_path / "out"
    leftover = tmp_path / ".out.old-0123abcd"
    (leftover / "runs").mkdir(parents=True)

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path / "runs"))

    monkeypatch.setattr(shutil, "rmtree", read_only)
    with caplog.at_level("WARNING"):
        assert remove_stale_work(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-0123abcd"]
    assert f"could not remove {leftover.resolve()} ([Errno 13] Permission denied: '{leftover.resolve() / 'runs'}'): remove it by hand" in caplog.text


def test_a_full_disk_writing_a_json_file_names_it(tmp_path, monkeypatch):
    import errno

    from dpm_vec.io import write_json_atomic

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError) as raised:
        write_json_atomic(tmp_path / "plan.json", {"a": 1})
    assert str(raised.value) == f"[Errno 28] No space left on device: '{tmp_path / 'plan.json'}'"
    assert list(tmp_path.iterdir()) == []


def test_query_names_a_folder_that_does_not_exist(tmp_path):
    from dpm_vec.inspect import connect

    with pytest.raises(DpmVecError, match=r"nope: no such folder \(give a sweep's --out folder\)$"):
        connect(tmp_path / "nope")
