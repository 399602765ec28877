"""Atomic file writes, per-item locks and small file helpers shared by every stage.

Every output is written under a temporary name in the same folder and renamed when complete, so an
interrupted run never leaves a half-written file that looks complete. Temporary names carry the host and the
process id that writes them (``.<name>.tmp-<host>-<pid><suffix>``): a later run removes only those whose process
is gone, never the live file of a process still writing (on this machine or, on shared storage, another one).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HistotransferError, one_line

if TYPE_CHECKING:
    import pandas as pd

TMP_MARK = ".tmp-"
LOCK_SUFFIX = ".lock"
HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)" + re.escape(TMP_MARK) + r"(?P<host>.+)-(?P<pid>\d+)(?P<suffix>\.[^.]*)?$")


def temp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` used while this process writes it."""
    return path.with_name(f".{path.name}{TMP_MARK}{HOST}-{os.getpid()}{path.suffix}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_gone(host: str, pid: int) -> bool:
    """True when the writer ``host``/``pid`` is known to be dead: same machine, no such process.

    A writer on another machine cannot be checked from here and is taken to be alive.
    """
    return host == HOST and pid != os.getpid() and not process_alive(pid)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(folder: str | os.PathLike[str], prefix: str = "") -> None:
    """Delete temporary files in ``folder`` (whose target name starts with ``prefix``) left by dead processes."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(f".{_glob_escape(prefix)}*{TMP_MARK}*"):
        m = _TEMP_RE.match(p.name)
        if m and _owner_gone(m["host"], int(m["pid"])):
            p.unlink(missing_ok=True)


@contextmanager
def temp_folder(parent: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    """A hidden scratch folder ``.<prefix>-<host>-<pid>-<random>`` in ``parent``, deleted when the block ends.

    Its name records the process that owns it, so one left by a killed process is removed by the next run
    (:func:`remove_stale_temp_folders`) while a live process's folder is left alone.
    """
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f".{prefix}-{HOST}-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temp_folders(parent: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Delete the :func:`temp_folder` folders of ``prefix`` in ``parent`` whose process is gone; return them."""
    pattern = re.compile(rf"^\.{re.escape(prefix)}-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
    removed = []
    for p in Path(parent).glob(f".{_glob_escape(prefix)}-*") if Path(parent).is_dir() else []:
        m = pattern.match(p.name)
        if m and p.is_dir() and _owner_gone(m["host"], int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


class ItemLock:
    """An exclusive lock on one work item (a slide) held as a lock file next to its output.

    Created with ``O_CREAT | O_EXCL``, which is atomic on local disks and NFS, so several processes (on one
    machine or several machines sharing the folder) never work on the same item. A lock whose process is gone
    (same machine) is taken over; one held by another machine is respected and named in :attr:`owner`.
    fcntl/flock locks are not used: they are not reliable on network file systems, where this matters most.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.owner = ""
        self._held = False

    def acquire(self) -> bool:
        """Take the lock; False (with :attr:`owner` set) when another live process holds it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read_owner()
                if owner is not None and _owner_gone(*owner):
                    self.path.unlink(missing_ok=True)
                    continue
                self.owner = f"{owner[0]} pid {owner[1]}" if owner else "another process"
                return False
            with os.fdopen(fd, "w") as f:
                f.write(f"{HOST} {os.getpid()}\n")
            self._held = True
            return True
        return False

    def _read_owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def clear_if_stale(self) -> None:
        """Remove the lock file if the process that took it is gone (same machine)."""
        owner = self._read_owner() if self.path.exists() else None
        if owner is not None and _owner_gone(*owner):
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> ItemLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def h5_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``<slide_id>.h5`` files of ``folder``, sorted, without files still being written (hidden temps)."""
    return sorted(p for p in Path(folder).glob("*.h5") if not p.name.startswith("."))


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` atomically and byte-reproducibly.

    Saved through an open file, the archive's records are named ``archive/...`` rather than after the file
    name (which, for a temporary name, holds the process id), so equal contents give equal bytes.
    """
    import torch

    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as exc:
        raise _torch_write_error(exc, Path(path)) from exc
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc  # the message names the file


def _torch_write_error(exc: RuntimeError, path: Path) -> OSError:
    """The OSError behind a failed ``torch.save``: torch's archive writer reports a failed write as a RuntimeError
    ("PytorchStreamWriter failed writing file ...") that does not say why; a full disk is named as such."""
    if disk_full(exc) or shutil.disk_usage(path.parent).free < (1 << 20):
        return OSError(errno.ENOSPC, "no space left on the device", str(path))
    return OSError(errno.EIO, f"could not write the file ({one_line(exc)})", str(path))


def write_png(image: Any, path: str | os.PathLike[str], rgb: bool = True) -> None:
    """Write a uint8 image (RGB, or gray with ``rgb=False``) as a PNG atomically.

    Encoded in memory and written as bytes, so a full disk raises the OSError (ENOSPC) that says so.
    """
    import cv2

    img = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if rgb and image.ndim == 3 else image
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create (if needed) and return a writable output folder, or raise a one-line error saying why not."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise HistotransferError(f"{option} {path}: is an existing file, not a folder; choose a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_name(path / ".write-check")
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise HistotransferError(
            f"{option} {path}: cannot write there ({os_error_text(exc)}); choose a folder you can write to."
        ) from exc
    return path


def os_error_text(exc: OSError) -> str:
    """What an operating-system error means, in a few words, with the file it concerns."""
    where = f" ({exc.filename})" if exc.filename else ""
    texts = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.ELOOP: "symbolic link loop",
        errno.ENOENT: "no such file or folder",
        errno.ENOTDIR: "a path component is not a folder",
        errno.EISDIR: "is a folder",
        errno.ENAMETOOLONG: "file name too long",
    }
    return texts.get(exc.errno or 0, exc.strerror or type(exc).__name__) + where


def ensure_space(path: str | os.PathLike[str], need: int) -> None:
    """Raise OSError(ENOSPC) before writing ``need`` bytes next to ``path`` when the disk cannot hold them.

    HDF5 handles a write failing for lack of space badly (the half-written file's handles cannot be released,
    and the process may crash at exit), so HDF5 outputs check the space before they are created.
    """
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need + (1 << 16):
        raise OSError(errno.ENOSPC, f"{need} bytes needed, {free} free", str(path))


def error_message(exc: BaseException) -> str:
    """What the command line says of a failure after "error:": the message of the project's own errors, an
    operating-system error in words with its fix, else the exception's type and text."""
    if isinstance(exc, HistotransferError):
        return str(exc)
    if isinstance(exc, OSError):
        fix = (
            "free some space and re-run the same command: finished files are kept and the run resumes"
            if disk_full(exc)
            else "fix the path or its permissions and re-run the same command"
        )
        return f"{os_error_text(exc)}; {fix}."
    return f"{type(exc).__name__}: {one_line(exc)}"


def disk_full(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a full disk or exhausted quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
