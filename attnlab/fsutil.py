"""Durable-write helpers shared by everything that writes files atomically (checkpoints, token
files, exported checkpoints, records), the per-run-folder lock, and cleanup of temp files whose
writer is gone.

Temp files are named ``.<name>.<pid>-<random>.tmp`` (or ``.<name>.<pid>.<random>.tmp``) so the
owner is known: :func:`remove_stale_temps` deletes only those whose process no longer exists.
Write failures (a full disk, a read-only folder, a name too long) become one-line
:class:`WriteError`\\ s naming the file and the cause; the temp file is removed and the previous
file stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from pathlib import Path
from typing import Iterator

from attnlab.errors import AttnlabError

LOCK_NAME = ".lock"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)[-.][0-9a-f]+\.tmp$")


class WriteError(AttnlabError, OSError):
    """A file could not be written (disk full, permissions, ...); names the file and the cause.
    Also an ``OSError`` so callers that handle those keep working."""


class RunLockedError(AttnlabError):
    """Another process holds the run folder's lock."""


def describe_os_error(err: OSError) -> str:
    """``No space left on device (ENOSPC)``-style cause of an ``OSError``."""
    cause = err.strerror or str(err) or type(err).__name__
    code = errno.errorcode.get(err.errno) if err.errno else None
    return f"{cause} ({code})" if code else cause


def write_error(path: str | os.PathLike, err: OSError, action: str = "cannot write") -> WriteError:
    """A :class:`WriteError` for ``path`` (the target the user knows, not the temp file that
    ``err`` may name)."""
    return WriteError(f"{path}: {action}: {describe_os_error(err)}")


def default_file_mode() -> int:
    """``0o666`` minus the process umask (what ``open(path, "w")`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def make_public(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain ``open(path, "w")`` would (0644 under umask 022):
    for files written through ``mkstemp`` or libraries that create them 0600."""
    os.chmod(path, default_file_mode())


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or folder by path (best effort: some platforms cannot open folders)."""
    try:
        fd = os.open(Path(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str | os.PathLike) -> Path:
    """A temp file next to ``path`` that names this process as its owner."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def temp_owner(path: str | os.PathLike) -> int | None:
    """The pid in a temp file's name (``None``: not a temp file of ours)."""
    m = _TEMP_RE.match(Path(path).name)
    return int(m.group("pid")) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this host)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of ``path`` (``.<name>.<pid>...tmp`` next to it) whose owner process
    is gone; another live writer's temp files are left alone. Returns what was removed."""
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for stale in candidates:
        pid = temp_owner(stale)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            stale.unlink()
            removed.append(stale)
    return removed


def remove_stale_temps_in(folder: str | os.PathLike) -> list[Path]:
    """:func:`remove_stale_temps` for every temp file directly in ``folder`` (call it while
    holding the folder's lock)."""
    removed = []
    try:
        candidates = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return removed
    for stale in candidates:
        pid = temp_owner(stale)
        if pid is None or pid == os.getpid() or pid_alive(pid) or not stale.is_file():
            continue
        with contextlib.suppress(OSError):
            stale.unlink()
            removed.append(stale)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a partial
    one: a temp file named with this pid in the same folder, flushed and fsynced, then
    ``os.replace``d; created with the normal permissions (``0o666`` minus the umask). On failure
    the temp file is removed, the old file is untouched and a one-line :class:`WriteError` naming
    ``path`` and the cause is raised."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, err) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> Path:
    """Append ``text`` to ``path`` (one ``write``); a failure is a one-line :class:`WriteError`
    and a partly written tail is cut back so the file is as it was."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            start = f.tell()
            try:
                f.write(text)
                f.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(start)
                raise
    except OSError as err:
        raise write_error(path, err, "cannot append") from None
    return path


# ---------------------------------------------------------------- run-folder lock
_HELD: dict[str, list] = {}  # resolved folder -> [fd, depth] (re-entrant within one process)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run folder") -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``<folder>/.lock`` (which records the holder's pid) for the
    duration of the block. Another process trying the same gets a one-line
    :class:`RunLockedError` naming the holder's pid at once (no waiting); the same process may
    nest. The lock dies with its process, so a killed run never leaves the folder locked.
    Where ``fcntl`` is unavailable (Windows) this is a no-op."""
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield folder
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(folder, err, "cannot create folder") from None
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    lock_path = folder / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise write_error(lock_path, err, "cannot create lock file") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            raise RunLockedError(
                f"{folder}: {what} is in use by another attnlab process"
                f"{f' (pid {holder})' if holder else ''}; wait for it to finish or stop it") from None
        except OSError as err:  # e.g. ENOLCK on some network filesystems: run without the lock
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise write_error(lock_path, err, "cannot lock") from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        try:
            yield folder
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def lock_holder(folder: str | os.PathLike) -> int | None:
    """The pid recorded in ``<folder>/.lock`` when a process holds it, else ``None``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return None
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
