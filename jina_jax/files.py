"""Writing files and folders so that they appear whole or not at all.

A file is written to a temporary sibling in the target's folder, flushed and fsynced, then renamed
over the target; a folder is built as a temporary sibling folder and renamed into place. An
interrupted write (an exception, Ctrl-C, a killed process) never leaves a partial file under the
target's name, and never a mixture of old and new files in a target folder: the target keeps its
complete old content until the rename. What a killed process leaves is a hidden temporary
sibling (`.NAME.tmp-*`), never the target.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import tempfile


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
    """A fresh hidden temporary file (or folder) next to `path`, in the same file system."""
    parent, name = os.path.split(os.path.abspath(path))
    if folder:
        return tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str):
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", **open_kw):
    """`with atomic_file(path, "w") as f:` writes `path` whole or not at all (replacing it)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kw) as f:
        yield f


@contextlib.contextmanager
def atomic_folder(path: str):
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def writes_folder(write):
    """Decorates `write(folder, ...)` so that it builds a temporary sibling folder which then
    replaces `folder` whole (see `atomic_folder`); the decorated function returns `folder`."""
    @functools.wraps(write)
    def whole(folder, *args, **kwargs):
        with atomic_folder(folder) as tmp:
            write(tmp, *args, **kwargs)
        return os.fspath(folder)
    return whole
