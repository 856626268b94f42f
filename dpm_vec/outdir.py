"""Output directories: what a command may replace, and one writer at a time.

Every command that writes a directory (``sweep --out``, ``generate --out``,
``import-requests --out``) replaces it atomically. That is only safe for a directory the
same kind of command wrote: replacing a book, the working directory, a file or somebody's
project folder would delete data the user never meant to give up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from dpm_vec.errors import DpmVecError

log = logging.getLogger(__name__)

SWEEP_MARKER = "manifest.json"  # what a sweep's output holds
PART_FILE = re.compile(r"^part-[0-9]{5,}\.parquet$")  # what a sweep writes in a dataset's directory
BOOK_MARKER = "portfolios.parquet"  # what a book holds


def check_replaceable(out_dir: Path, marker: str, what: str, inputs: tuple[Path, ...] = (),
                      written: frozenset[str] | None = None) -> None:
    """Raise unless ``out_dir`` may be replaced by a new ``what``: it does not exist, or it
    is an empty directory, or a directory holding ``marker`` (a previous ``what``) and,
    where ``written`` names everything a ``what`` writes, nothing else, nor anything but
    ``part-*.parquet`` files inside those of them that are directories (an operator's notes
    beside or among a sweep's datasets would go with them); and it is neither one of ``inputs`` nor
    holds one, nor holds the working directory."""
    out_dir = out_dir.resolve()
    for source in inputs:
        source = source.resolve()
        if source == out_dir or out_dir in source.parents:
            raise DpmVecError(f"--out {out_dir} would replace the input {source}: choose an output directory outside it")
    cwd = Path.cwd().resolve()
    if cwd == out_dir or out_dir in cwd.parents:
        raise DpmVecError(f"--out {out_dir} holds the working directory and would be replaced: choose another output directory")
    if not out_dir.exists():
        for parent in out_dir.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise DpmVecError(f"--out {out_dir}: {parent} is a file, not a directory")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise DpmVecError(f"--out {out_dir}: cannot create it, {parent} is not writable")
                break
        return
    if not out_dir.is_dir():
        raise DpmVecError(f"--out {out_dir} is a file, not a directory: choose a directory path")
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise DpmVecError(f"--out {out_dir}: cannot replace it, {out_dir.parent} is not writable")
    if (out_dir / marker).exists():
        entries = [] if written is None else list(out_dir.iterdir())
        others = sorted([entry.name for entry in entries if entry.name not in written]
                        + [f"{entry.name}/{part.name}" for entry in entries if entry.name in written and entry.is_dir()
                           for part in entry.iterdir() if not PART_FILE.match(part.name)])
        if others:
            raise DpmVecError(
                f"--out {out_dir} holds a previous {what} and also {', '.join(others[:5])}{' …' if len(others) > 5 else ''}, "
                f"which a {what} does not write: replacing it would delete them; move them out, or choose another directory"
            )
        return
    if not any(out_dir.iterdir()):
        return
    raise DpmVecError(
        f"--out {out_dir} is a directory that does not hold a previous {what} (no {marker}), and it would be replaced "
        f"with everything in it: remove it first, or choose a new directory"
    )


@contextlib.contextmanager
def exclusive(out_dir: Path):
    """Hold ``.<OUT>.lock`` beside ``out_dir`` for the block: a second command writing
    the same directory stops at once with a clear error instead of racing the first one
    over its shards. The lock (flock) goes with the process, so a killed run leaves none
    held, and the file goes when the block ends."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f".{out_dir.name}.lock"
    handle = _locked(path, out_dir)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"dpm-vec pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: whoever locks next locks a file that is still there
        handle.close()


def _locked(path: Path, out_dir: Path):
    """``path`` opened and flock'ed, the file still at ``path`` (not one that its last
    holder unlinked between our open and our lock)."""
    while True:
        try:
            handle = open(path, "a+")
        except OSError as exc:  # the folder OUT would go in takes no files (a read-only mount, /sys)
            raise DpmVecError(f"--out {out_dir}: cannot write in {out_dir.parent} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise DpmVecError(f"--out {out_dir} is being written by {holder}: wait for it to finish, "
                              f"or choose another output directory") from None
        except OSError as exc:  # a file system without locks (some network mounts): go on, unguarded
            log.warning("cannot lock %s (%s): nothing stops a second sweep writing %s at the same time", path, exc, out_dir)
            return handle
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()


def stale_work(out_dir: Path) -> list[Path]:
    """Leftovers beside ``out_dir`` of earlier runs that were killed: work directories of a
    sweep with other arguments or inputs (``.<OUT>.work-*``; a finished sweep has removed
    its own) and staging or replaced copies (``.<OUT>.staging-*``, ``.<OUT>.old-*``,
    ``.<OUT>.tmp-*``)."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(work|staging|old|tmp)-[0-9a-f]+$")
    if not out_dir.parent.is_dir():
        return []
    return sorted(p for p in out_dir.parent.iterdir() if pattern.match(p.name))


def discard(path: Path, out_dir: Path) -> bool:
    """Delete a directory beside ``out_dir`` so that a kill midway leaves it whole or gone,
    never half a work dir that a rerun would resume from: it is first renamed to a
    ``.<OUT>.old-*`` leftover, which the next sweep to ``out_dir`` removes (one already so
    named is removed where it is). False where it could not be removed (``remove_tree``)."""
    if re.match(rf"^\.{re.escape(out_dir.name)}\.old-[0-9a-f]+$", path.name):
        return remove_tree(path)
    doomed = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return True
    return remove_tree(doomed)


def remove_tree(path: Path) -> bool:
    """Delete a directory tree; where that fails (a read-only folder inside), say which and
    why, leave the rest to the operator, and return False."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s (%s): remove it by hand", path, exc)
        return False
    return True


def remove_stale_work(out_dir: Path) -> list[Path]:
    """Delete ``stale_work``; call only while holding ``exclusive(out_dir)``."""
    out_dir = out_dir.resolve()
    return [path for path in stale_work(out_dir) if discard(path, out_dir)]
