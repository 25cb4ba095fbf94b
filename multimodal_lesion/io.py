"""Atomic file writes: a crash never leaves a half-written artefact that a later run trusts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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
    for path in Path(folder).rglob(".*.tmp"):
        match = _TEMP_NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
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
