"""Files written so that nothing is lost: atomic writes, orphan clean-up, a full disk said in
one line, and the one error a bad weight file raises. The ground layer: every package may use
it, it uses none of them.

A writer writes `.<name>.<host>.<pid>.<random>.tmp` beside its target and renames it onto the
target when complete, so a reader never sees half a file and a killed writer leaves an orphan a
later run can tell from a live writer's file (and removes).

A write that runs out of space removes its temporary and raises DiskFullError naming the target:
the libraries underneath say it in their own ways (HDF5 as errno 28 inside a long message,
torch.save as "unexpected pos" or "basic_ios::clear: iostream error" with no errno at all), and
what was on disk before the write, which a resume reads, is left as it was.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import torch
import yaml

ORPHAN_AGE_S = 24 * 3600        # another host's temporary older than this is an orphan
# A write that failed without an errno (torch.save's C++ stream) is put down to a full disk when
# less than this is left: its last write needed more (a feature chunk alone can be 32 MiB).
LOW_SPACE_BYTES = 64 * 2**20

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or not the kind that was asked for."""


class DiskFullError(OSError):
    """A write ran out of space (or quota). Nothing was written at the target and its temporary
    is gone, so the directory is as a resume expects it. `str()` is the one-line message."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(errno.ENOSPC, f"{path}: no space left on device ({reason}); nothing was "
                                       "written there: free some space and rerun to resume", str(path))
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):                    # OSError's would call __init__ with its 3 args
        return type(self), (self.filename, self.reason)


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    for parent in (Path(path), *Path(path).parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


def disk_full(err: BaseException, path: Path) -> str | None:
    """Why `err`, raised while writing `path`, is a full disk ("0.0 MiB free", "disk quota
    exceeded"), or None when it is something else. Call it before removing the failed write's
    temporary, whose blocks would make the disk look less full.

    ENOSPC or EDQUOT anywhere in the exception chain (torch.save through a Python file raises a
    RuntimeError from the OSError), HDF5's "No space left on device" in a message, or an
    I/O-looking error (OSError, RuntimeError) on a file system with less than LOW_SPACE_BYTES
    left (torch.save to a path says only "basic_ios::clear: iostream error")."""
    free = _free_bytes(path)
    left = "free space unknown" if free is None else f"{free / 2**20:.1f} MiB free"
    seen, depth = err, 0
    while seen is not None and depth < 16:
        if isinstance(seen, OSError) and seen.errno == errno.EDQUOT:
            return f"disk quota exceeded, {left}"
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "No space left on device" in str(seen):
            return left
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    if isinstance(err, (OSError, RuntimeError)) and free is not None and free < LOW_SPACE_BYTES:
        return f"{left} after the failed write"
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_path(path: Path) -> Path:
    """`.<name>.<host>.<pid>.<random>.tmp` beside `path`: the writer stays readable in the name, so
    a later run can tell a killed writer's orphan from a live writer's file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process: alive
        return True
    return True


def _is_orphan(tmp: Path, name: str | None) -> bool:
    """Same host and a dead pid, a name without a writer (older versions), or another host's
    file: at once when cleaning a whole directory before anything writes (name None), else
    once it is older than ORPHAN_AGE_S."""
    rest = tmp.name[1:-len(".tmp")]
    if name is not None:
        rest = rest[len(name) + 1:]                      # drop "<name>."
    parts = rest.rsplit(".", 2)                          # [..host], pid, random
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host = socket.gethostname()
    if parts[0] == host or (name is None and parts[0].endswith("." + host)):
        return not _alive(int(parts[1]))
    return name is None or time.time() - tmp.stat().st_mtime > ORPHAN_AGE_S


def remove_orphans(directory: Path, name: str | None = None) -> list[Path]:
    """Delete temporaries a killed writer left in `directory` (of target `name`, or all of them
    when None: call that only before anything of this run writes there); logs each one."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f".{glob.escape(name)}.*.tmp" if name else ".*.tmp"
    removed = []
    for tmp in sorted(directory.glob(pattern)):
        try:
            if tmp.is_file() and _is_orphan(tmp, name):
                tmp.unlink()
                removed.append(tmp)
                log.warning("removed orphan temporary file %s (left by a killed writer)", tmp)
        except FileNotFoundError:                        # its writer finished meanwhile
            pass
    return removed


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(tmp_path) then rename onto `path`, so readers never see a half-written file.

    Orphans of the same target from a killed writer are removed first (logged). A full disk is a
    DiskFullError naming `path` (the temporary removed, `path` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent, path.name)
    tmp = temp_path(path)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # keep the usual file mode
        os.replace(tmp, path)
    except BaseException as err:
        reason = disk_full(err, tmp) if isinstance(err, Exception) else None
        tmp.unlink(missing_ok=True)
        if reason is not None:
            raise DiskFullError(path, reason) from err
        raise


def first_nonfinite(named) -> str | None:
    """The name of the first floating tensor in (name, value) pairs with a NaN or inf; None if none."""
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


# --- output directories ---------------------------------------------------------------------------
def check_writable(directory: str | Path, field: str) -> Path:
    """Create `directory` if needed and prove a file can be written in it, before any work
    starts: a read-only or foreign directory found after an hour of generation loses the hour.
    `field` names the setting that chose it, for the one-line error."""
    directory = Path(directory)
    probe = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temp_path(directory / "write-check")
        probe.write_bytes(b"")
    except OSError as err:
        raise ValueError(f"{field}: {directory} is not writable ({err.strerror or err}); choose "
                         "another directory") from None
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    return directory


class DirectoryLock:
    """An exclusive lock on an output directory (`<dir>/.lock`, flock'ed, holding the PID), so
    two runs never write the same results file: the second refuses at once, naming the first.
    The kernel drops the lock when its process dies, so a killed run leaves nothing to clean."""

    def __init__(self, directory: str | Path, what: str = "run") -> None:
        self.path = Path(directory) / ".lock"
        self.what = what
        self._file = None

    def acquire(self) -> DirectoryLock:
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ValueError(f"{self.path.parent} is in use by another {self.what} (PID {holder}); "
                             "wait for it to finish or choose another directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()              # closing drops the flock; the file may stay
            self._file = None


def read_yaml(path: Path):
    """A config file's YAML, or one line naming the file, line and problem (jsonargparse would
    say `"<unicode string>", line 2`, naming no file). A missing file is left to jsonargparse."""
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file (a config is YAML text)") from None
