"""What every writer of the project shares: strict JSON, manifests with checksums, directories
published whole, and run-directory locks.

Nothing a reader may see is half written: a directory is built in a temporary sibling and moved
into place when complete, its manifest (every file's size and SHA-256) written last, and readers
verify the manifest before trusting a byte. A file the project did not write is never touched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import numbers
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

from mdaf_dist.errors import UserError

MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
_HASH_CHUNK = 8 << 20


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON null: no such number) and
    numpy scalars made Python numbers."""
    if isinstance(value, numbers.Number) and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON (no NaN or Infinity, which no JSON parser but Python's accepts)."""
    return json.dumps(finite(value), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | Path, value: Any) -> None:
    """Strict JSON written to a temporary sibling and renamed: a reader sees the old file or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(dumps(value))
    os.replace(tmp, path)


def read_json(path: str | Path, what: str) -> Any:
    """The parsed file, or one line naming it (`what` says what it should have been)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({what}): {e}") from None


def output_directory(path: str | Path, key: str) -> Path:
    """`path` (the setting `key`) as a local directory to write into: a `file://` URI is its
    local path; another URI (s3://, ...) or a path that is, or lies under, a file is refused in
    one line."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise UserError(f"{key}={path}: outputs are written to local directories only (a path or file:// URI)")
    directory = Path(text)
    for existing in (directory, *directory.parents):
        if existing.exists():
            if not existing.is_dir():
                raise UserError(f"{key}={path}: {existing} is a file, not a directory")
            break
    return directory


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST_FILE, LOCK_FILE):
            yield path


def manifest(directory: str | Path) -> Dict[str, Dict[str, Any]]:
    """{relative path: {"bytes": size, "sha256": digest}} of every file under `directory`."""
    root = Path(directory)
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in _files(root)}


def write_manifest(directory: str | Path) -> Dict[str, Dict[str, Any]]:
    """Write `directory`'s manifest; call it last, once every other file is complete."""
    entries = manifest(directory)
    write_json(Path(directory) / MANIFEST_FILE, {"files": entries})
    return entries


def verify_manifest(directory: str | Path, what: str, checksums: bool = True) -> None:
    """Refuse, in one line, a directory whose files differ from its manifest: a missing manifest
    (never completed), a missing, resized or (with `checksums`) altered file."""
    root = Path(directory)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{root} is not a complete {what}: it has no {MANIFEST_FILE} (written last, so its writer did not finish)")
    verify_files(root, read_json(path, f"the manifest of a {what}").get("files", {}), what, checksums)


def verify_files(directory: str | Path, entries: Dict[str, Dict[str, Any]], what: str, checksums: bool = True) -> None:
    """Refuse, in one line, a missing, resized or (with `checksums`) altered file of `entries`
    (a `manifest`)."""
    root = Path(directory)
    for name, entry in entries.items():
        file = root / name
        if not file.is_file():
            raise UserError(f"{root} is not a complete {what}: {name} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise UserError(f"{root} is a damaged {what}: {name} has {file.stat().st_size} bytes, its manifest says {entry['bytes']}")
        if checksums and sha256(file) != entry["sha256"]:
            raise UserError(f"{root} is a damaged {what}: {name} does not match its SHA-256 in its manifest")


@contextmanager
def published_directory(final: str | Path, owned: Iterable[str], last: str) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final` to write into; when the block completes, put
    its entries into `final`. In a directory that already exists only the entries named in
    `owned` (the writer's own files) are replaced, the user's are left alone; `last` (the file
    readers check first) is removed before and moved in after everything else, so a process
    killed midway leaves a directory that readers refuse, never a mix they would accept. On an
    exception the temporary directory is removed and `final` is untouched."""
    final = Path(final)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final.mkdir(parents=True, exist_ok=True)
    (final / last).unlink(missing_ok=True)
    for name in owned:
        _remove(final / name)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == last):
        os.replace(entry, final / entry.name)
    staging.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class DirectoryLock:
    """An exclusive lock on a directory for the lifetime of a run (flock on DIR/.lock, released
    by the kernel when the holder exits, even by kill -9, so a lock is never stale). A second
    holder is refused in one line naming the first one's pid and host. flock may not exclude
    processes on other hosts of a network file system; the pid and host are there to tell."""

    def __init__(self, directory: str | Path, what: str = "run") -> None:
        self.directory, self.what = Path(directory), what
        self._file: Optional[Any] = None

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        f = open(self.directory / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            f.close()
            raise UserError(f"{self.directory} is in use by another {self.what} ({holder}); wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
