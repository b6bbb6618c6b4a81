"""Writing files and folders so that they appear whole or not at all.

A file is written to a temporary sibling in the target's folder, flushed and fsynced, then renamed
over the target; a folder is built as a temporary sibling folder and renamed into place. An
interrupted write (an exception, Ctrl-C, a killed process) never leaves a partial file under the
target's name, and never a mixture of old and new files in a target folder: the target keeps its
complete old content until the rename. What a killed process leaves is a hidden temporary
sibling (`.NAME.tmp-*`), never the target; its name carries the writer's identity
(`.NAME.tmp-TAG-PID-START-XXXXXXXX`: a tag of the machine's boot and pid namespace, the process
id and its start time), so the next write of the same target removes the temporaries whose
writer no longer runs, and says so.

A write that fails for lack of space (or another storage error that names no file) is re-raised
naming the target, or the file inside a target folder: `DST/params.safetensors: No space left on
device`, never a bare `[Errno 28]`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Concatenate, ParamSpec

# Errors of the storage itself: the file at fault is the one being written.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


@functools.cache
def _machine_tag() -> str | None:
    """8 hex digits naming this boot of this machine and this pid namespace (Linux), so that a
    pid in a temporary's name is only ever looked up where it means the same process; None
    where /proc cannot tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha1(f"{boot} {namespace}".encode()).hexdigest()[:8]


def _start_time(pid: int | str) -> str | None:
    """When process `pid` started (clock ticks since boot: /proc/PID/stat field 22), None if no
    such process runs. A reused pid has a later start time, so (pid, start) names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: count from its end.
        return stat[stat.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


def _owner() -> str | None:
    """`TAG-PID-START` of this process, None where /proc cannot tell (then no cleanup)."""
    tag, pid = _machine_tag(), os.getpid()
    start = _start_time(pid)
    return None if tag is None or start is None else f"{tag}-{pid}-{start}"


def remove_stale_temporaries(path: str) -> list[str]:
    """Removes the temporaries of `path` (files or folders named `.NAME.tmp-TAG-PID-START-*`)
    whose writer, a process of this machine, boot and pid namespace (TAG), no longer runs
    (PID with that START): what a killed run left. A temporary of a live writer, of another
    machine, boot or container (another TAG: it cannot be told), of another user, or of any
    other naming is left alone. Says what it removed on stderr, in one line; returns the
    removed paths."""
    tag = _machine_tag()
    parent, name = os.path.split(os.path.abspath(path))
    if tag is None:
        return []
    ours = re.compile(rf"\.{re.escape(name)}\.tmp-{tag}-(\d+)-(\d+)-[a-z0-9_]{{8}}")
    try:
        with os.scandir(parent) as it:
            entries = [(e, m) for e in it if (m := ours.fullmatch(e.name)) is not None]
    except OSError:
        return []
    removed = []
    for entry, m in entries:
        if _start_time(m.group(1)) == m.group(2):
            continue  # its writer still runs
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        removed.append(entry.path)
    if removed:
        print(
            f"removed {len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} of "
            f"{path} left by killed runs: {', '.join(os.path.basename(r) for r in removed)}",
            file=sys.stderr,
        )
    return removed


def _named(error: OSError, tmp: str, path: str) -> OSError:
    """`error` naming `path` where it names no file or only the temporary `tmp` (a file inside
    the temporary folder `tmp` becomes the same file inside `path`)."""
    name = error.filename if isinstance(error.filename, str) else None
    if name is not None and name != tmp and not name.startswith(tmp + os.sep):
        return error
    if name is None and error.errno not in _STORAGE_ERRORS:
        return error
    shown = path if name is None or name == tmp else path + name[len(tmp) :]
    return OSError(error.errno, error.strerror, shown)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(path: str, folder: bool = False) -> str:
    """A fresh hidden temporary file (or folder) next to `path`, in the same file system, named
    for its writer; stale temporaries of `path` are removed first (`remove_stale_temporaries`)."""
    parent, name = os.path.split(os.path.abspath(path))
    remove_stale_temporaries(path)
    owner = _owner()
    prefix = f".{name}.tmp-{owner}-" if owner else f".{name}.tmp-"
    if len(os.fsencode(prefix)) + 8 > 255:  # the file system's name limit
        prefix = f".{name}.tmp-"
    if folder:
        return tempfile.mkdtemp(prefix=prefix, dir=parent)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]):
    """`with atomic_path(path) as tmp:` let a writer that takes a file name write `tmp`; on
    success it is fsynced and renamed over `path`, on failure removed."""
    path = os.fspath(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        named = _named(e, tmp, path) if isinstance(e, OSError) else e
        if named is e:
            raise
        raise named from e
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", **open_kw):
    """`with atomic_file(path, "w") as f:` writes `path` whole or not at all (replacing it)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kw) as f:
        yield f


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]):
    """`with atomic_folder(dst) as tmp:` build the folder in `tmp`; on success it becomes `dst`
    (an existing `dst` is replaced whole: the caller decides whether that is allowed)."""
    path = os.path.abspath(os.fspath(path))
    tmp = temporary_sibling(path, folder=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _named(e, tmp, path) if isinstance(e, OSError) else e
        if named is e:
            raise
        raise named from e
    replace_folder(tmp, path)


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(new: str, path: str) -> None:
    """Renames the finished folder `new` to `path`. An existing `path` is swapped with it in one
    step where the system can (Linux), else moved aside first; either way `path` is never a
    mixture of old and new files, and the old folder is removed only after."""
    old = None
    if os.path.lexists(path) and _exchange(new, path):
        old = new
    elif os.path.lexists(path):
        old = temporary_sibling(path, folder=True)
        os.rmdir(old)
        os.replace(path, old)
    try:
        if old is not new:
            os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    _fsync_folder(os.path.dirname(path))
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


_Args = ParamSpec("_Args")


def writes_folder(
    write: Callable[Concatenate[str, _Args], object],
) -> Callable[Concatenate[str | os.PathLike[str], _Args], str]:
    """Decorates `write(folder, ...)` so that it builds a temporary sibling folder which then
    replaces `folder` whole (see `atomic_folder`); the decorated function returns `folder`."""

    @functools.wraps(write)
    def whole(folder: str | os.PathLike[str], *args: _Args.args, **kwargs: _Args.kwargs) -> str:
        with atomic_folder(folder) as tmp:
            write(tmp, *args, **kwargs)
        return os.fspath(folder)

    return whole
