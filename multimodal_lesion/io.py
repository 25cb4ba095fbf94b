"""Atomic file writes, output paths checked before any work, and folder locks.

A crash never leaves a half-written artefact that a later run trusts; an output path that cannot take
a command's results is refused before the command reads or trains anything; two processes never
write into one folder at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from .errors import MMLesionError


class OutputError(MMLesionError):
    """An output path that cannot take a command's results, or a folder another process is writing."""


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_TEMP_NAME = re.compile(r"^\..+\.(\d+)(\.[A-Za-z0-9_]+)?\.tmp$")


def temp_name(path: Path) -> Path:
    """The temp name beside ``path`` that this process writes before renaming (pid inside)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temp files left in ``folder`` (recursively) by writers that died mid-write.

    Only files whose writer process no longer exists are removed, so a concurrent writer is safe.
    """
    removed = []
    for path in sorted(Path(folder).rglob(".*.tmp")):
        match = _TEMP_NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            if path.is_dir() and not path.is_symlink():  # a folder of old files being removed
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def safe_stem(name: str) -> str:
    """A file-name stem for any string: a sanitised, bounded prefix plus a hash of the full string.

    Hostile ids (``../x``, ``a/b``, markup) never reach a path, and two ids never share a stem.
    """
    stem = _UNSAFE_CHARS.sub("_", str(name)).strip("_-")[:40] or "case"  # never a leading "-"
    digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{stem}-{digest}"


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; returns the path."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    """Make numpy scalars and arrays JSON-serialisable."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- output paths: checked (and their folders created) before a command reads or trains anything ------

OutputKind = Literal["folder", "file"]


def prepare_output(path: str | Path, *, kind: OutputKind, option: str, inputs: Sequence[str | Path] = ()) -> list[Path]:
    """Check that ``path`` can take a command's output and create the folder it goes in.

    Refused, as an :class:`OutputError` naming ``option`` and the path: a file where a folder is
    expected (or a folder where a file is), a path below a file, a symbolic-link loop or a dangling
    link, one of the command's ``inputs``, and a place where nothing can be created or written (the
    folder is created and a probe file written and removed, which is what really fails on a read-only
    or virtual file system, even as root). Returns the folders created, outermost first, so that a
    command that fails can remove them again (:func:`remove_empty`).
    """
    path = Path(path)
    say = f"{option} {path}"
    existing = _nearest_existing(path, say)
    if existing == path:
        is_dir = path.is_dir()
        if kind == "folder" and not is_dir:
            raise OutputError(f"{say}: is a file, not a folder")
        if kind == "file" and is_dir:
            raise OutputError(f"{say}: is a folder; give a file name")
        for given in inputs:
            with contextlib.suppress(OSError):
                if os.path.samefile(path, given):
                    raise OutputError(f"{say}: is an input of this command ({given}); refusing to overwrite it")
    elif not existing.is_dir():
        raise OutputError(f"{say}: {existing} is a file, so nothing can be created below it")
    folder = path if kind == "folder" else path.parent
    missing = [p for p in (*reversed(folder.parents), folder) if p not in existing.parents and p != existing]
    created: list[Path] = []
    try:
        for level in missing:
            try:
                level.mkdir()
            except FileExistsError:  # another process (a torchrun rank) made it meanwhile: not ours to remove
                if not level.is_dir():
                    raise
                continue
            created.append(level)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".mmlesion-probe.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        remove_empty(created)
        raise OutputError(f"{say}: cannot write there ({exc.strerror or exc})") from None
    return created


def _nearest_existing(path: Path, say: str) -> Path:
    """``path`` or its nearest existing parent; a link loop or a dangling link on the way is refused."""
    for candidate in (path, *path.parents):
        try:
            os.stat(candidate)
            return candidate
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{say}: {candidate} is a loop of symbolic links") from None
            if os.path.islink(candidate):
                raise OutputError(f"{say}: {candidate} is a link to a missing {os.readlink(candidate)}") from None
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise OutputError(f"{say}: cannot use it ({exc.strerror or exc})") from None
    return Path(path.anchor or ".")  # pragma: no cover - the root always exists


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (innermost first) that are still empty; a folder holding anything stays."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


# --- folder locks: one writing process per folder -------------------------------------------------

LOCK = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.lock`` (``fcntl.flock``, exclusive) for the block; it holds this process's pid.

    A second process is refused at once with an :class:`OutputError` naming the folder and the
    holder's pid. The lock dies with its process (even on SIGKILL); the file is removed on release,
    and a process that locked a file another one removed meanwhile locks the new one instead.
    """
    path = Path(folder) / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{folder}: in use by another mmlesion process (pid {holder}); wait for it to end or choose "
                "another folder"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # locked a lock file that its holder removed on release: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@contextlib.contextmanager
def output_folder(path: str | Path, *, option: str = "--out", lock: bool = True) -> Iterator[Path]:
    """A checked output folder (:func:`prepare_output`), locked for the block (:func:`folder_lock`).

    When the block fails, the folders this created are removed again if nothing was written in them.
    """
    created = prepare_output(path, kind="folder", option=option)
    try:
        with folder_lock(path) if lock else contextlib.nullcontext(Path(path)):
            yield Path(path)
    except BaseException:
        remove_empty(created)
        raise


@contextlib.contextmanager
def output_file(path: str | Path, *, option: str, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """A checked output file path (:func:`prepare_output`); folders created for it go again if the block fails."""
    created = prepare_output(path, kind="file", option=option, inputs=inputs)
    try:
        yield Path(path)
    except BaseException:
        remove_empty(created)
        raise
