"""Storage through fsspec: one root that is a local folder or ``s3://bucket/prefix``.

Nothing else in the package glues path strings by hand: paths are built with :func:`join`
and the :class:`Layout` of the design (``workspace/…``, ``profiles/…``, ``qc/…``), and every
file is opened through :func:`open_file` / :func:`atomic_write` so that the same code works
on local disk and on S3.

Atomicity: an output is written to a temporary name and moved into place only when it is
complete (local: ``os.replace``; S3: the object is uploaded whole, which S3 makes visible
atomically). A folder of outputs is finished with a completion *marker* that fingerprints
its inputs; :func:`marker_matches` lets a rerun skip work whose outputs are complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec

from cpjump1.errors import StorageError

log = logging.getLogger(__name__)

MARKER_NAME = "_COMPLETE.json"


def is_remote(url: str) -> bool:
    """True for URLs with a scheme other than ``file``."""
    return "://" in url and not url.startswith("file://")


def join(root: str, *parts: str) -> str:
    """Join path components onto a local path or URL (POSIX separators for URLs)."""
    parts = tuple(str(p).strip("/") for p in parts if str(p))
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return str(Path(root, *parts))


def basename(url: str) -> str:
    # os.path rather than pathlib: called once per image on 27648-image plates
    return posixpath.basename(url.rstrip("/")) if is_remote(url) else os.path.basename(url.rstrip(os.sep) or url)


def parent(url: str) -> str:
    if is_remote(url):
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(url).parent)


def filesystem(url: str, settings: Any = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    opts = settings.storage_options(url) if settings is not None else {}
    if not is_remote(url):
        url = str(Path(url.removeprefix("file://")).absolute())
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def _retry(what: str, url: str, func, retries: int):
    """Run ``func`` with bounded retries on connection errors, then a clear StorageError."""
    last: Exception | None = None
    for attempt in range(max(1, retries)):
        try:
            return func()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            raise
        except OSError as exc:  # includes botocore connection errors wrapped by s3fs
            last = exc
        except Exception as exc:  # botocore EndpointConnectionError etc.
            name = type(exc).__name__
            if "Connect" not in name and "Endpoint" not in name and "Timeout" not in name:
                raise
            last = exc
        time.sleep(min(0.2 * 2**attempt, 2.0))
        log.warning("retrying %s of %s (attempt %d): %s", what, url, attempt + 2, last)
    raise StorageError(f"could not {what} {url} after {retries} attempts: {last}") from last


def exists(url: str, settings: Any = None) -> bool:
    fs, path = filesystem(url, settings)
    retries = getattr(settings, "storage_retries", 3)
    return bool(_retry("check", url, lambda: fs.exists(path), retries))


def listdir(url: str, settings: Any = None, detail: bool = False) -> list:
    """Names (full URLs/paths) directly under ``url``; ``[]`` when it does not exist."""
    if not is_remote(url) and detail:
        return _local_ls(url)
    fs, path = filesystem(url, settings)
    retries = getattr(settings, "storage_retries", 3)

    def _ls():
        try:
            return fs.ls(path, detail=detail)
        except FileNotFoundError:
            return []

    entries = _retry("list", url, _ls, retries)
    if detail:
        return entries
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    if is_remote(url):
        return [f"{proto}://{e}" for e in entries]
    return list(entries)


def _local_ls(url: str) -> list[dict]:
    """``fs.ls(detail=True)`` for a local folder with one ``os.scandir`` pass: the same keys
    the callers use (name, size, type, mtime); fsspec's local ``ls`` calls ``info`` per entry,
    which cost ~0.7 s on a 27648-image folder, this ~0.2 s (CPU, measured 2026-11-26)."""
    folder = os.path.abspath(url.removeprefix("file://"))
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                try:
                    st = e.stat()
                except FileNotFoundError:  # removed while listing
                    continue
                kind = "directory" if e.is_dir() else "file" if e.is_file() else "other"
                out.append({"name": e.path, "size": st.st_size, "type": kind, "mtime": st.st_mtime})
    except (FileNotFoundError, NotADirectoryError):
        return []
    return out


def open_file(url: str, mode: str = "rb", settings: Any = None, **kwargs) -> IO:
    """Open ``url`` for reading (or writing when not atomic output) through fsspec."""
    fs, path = filesystem(url, settings)
    retries = getattr(settings, "storage_retries", 3)
    return _retry("open", url, lambda: fs.open(path, mode, **kwargs), retries)


def read_bytes(url: str, settings: Any = None) -> bytes:
    with open_file(url, "rb", settings) as fh:
        return fh.read()


def read_text(url: str, settings: Any = None) -> str:
    return read_bytes(url, settings).decode("utf-8")


def makedirs(url: str, settings: Any = None) -> None:
    fs, path = filesystem(url, settings)
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def local_temp_path(suffix: str = "") -> Iterator[Path]:
    """A scratch file path that is removed afterwards."""
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="cpjump1-")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


@contextlib.contextmanager
def atomic_write(url: str, settings: Any = None, mode: str = "wb") -> Iterator[IO]:
    """Write ``url`` so that it appears only complete.

    The caller writes into the yielded file handle; local files are written beside the
    target under a temporary name and ``os.replace``-d; remote files are written to a local
    temporary file and uploaded whole when the block ends without error. On error nothing is
    left at ``url`` (nor a temporary file).
    """
    if not is_remote(url):
        target = Path(url.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, mode) as fh:
                yield fh
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return
    with local_temp_path() as tmp:
        with open(tmp, mode) as fh:
            yield fh
        put_file(tmp, url, settings)


@contextlib.contextmanager
def atomic_path(url: str, settings: Any = None, suffix: str | None = None) -> Iterator[Path]:
    """Like :func:`atomic_write` but yields a local *path* for libraries that want one."""
    if suffix is None:
        suffix = "".join(Path(basename(url)).suffixes)
    if not is_remote(url):
        target = Path(url.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
        try:
            yield tmp
            if not tmp.exists():
                raise StorageError(f"nothing was written for {url}")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return
    with local_temp_path(suffix=suffix) as tmp:
        yield tmp
        put_file(tmp, url, settings)


def put_file(local: str | os.PathLike, url: str, settings: Any = None) -> None:
    """Copy a local file to ``url`` (upload for remote; atomic replace for local)."""
    if not is_remote(url):
        target = Path(url.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
        return
    fs, path = filesystem(url, settings)
    retries = getattr(settings, "storage_retries", 3)
    _retry("upload", url, lambda: fs.put_file(str(local), path), retries)


def get_file(url: str, local: str | os.PathLike, settings: Any = None) -> Path:
    """Copy ``url`` to a local file (download for remote)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(url):
        shutil.copyfile(url.removeprefix("file://"), local)
        return local
    fs, path = filesystem(url, settings)
    retries = getattr(settings, "storage_retries", 3)
    _retry("download", url, lambda: fs.get_file(path, str(local)), retries)
    return local


def remove(url: str, settings: Any = None, recursive: bool = False) -> None:
    fs, path = filesystem(url, settings)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


# --------------------------------------------------------------------------- fingerprints


def fingerprint(*parts: Any) -> str:
    """A stable sha256 of JSON-serialisable parts (file digests, settings, versions)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()


def file_digest(url: str, settings: Any = None) -> str:
    """sha256 of a (local or remote) file's bytes; for large remote files prefer :func:`file_stamp`."""
    h = hashlib.sha256()
    with open_file(url, "rb", settings) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_stamp(url: str, settings: Any = None) -> dict[str, Any]:
    """Cheap identity of a file: size plus modification time or ETag."""
    fs, path = filesystem(url, settings)
    info = fs.info(path)
    return {
        "size": info.get("size"),
        "stamp": info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified"),
    }


def write_marker(folder: str, fp: str, settings: Any = None, **extra: Any) -> None:
    """Mark ``folder`` complete for inputs fingerprinted as ``fp`` (written last, atomically)."""
    body = {"fingerprint": fp, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    with atomic_write(join(folder, MARKER_NAME), settings, mode="w") as fh:
        json.dump(body, fh, indent=2, default=str)


def read_marker(folder: str, settings: Any = None) -> dict[str, Any] | None:
    url = join(folder, MARKER_NAME)
    try:
        return json.loads(read_text(url, settings))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def marker_matches(folder: str, fp: str, settings: Any = None) -> bool:
    """True when ``folder`` holds a completion marker for exactly this fingerprint."""
    marker = read_marker(folder, settings)
    return bool(marker) and marker.get("fingerprint") == fp


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """The storage layout of DESIGN.md under one root. A plate is always batch + barcode."""

    root: str

    def load_data_dir(self, batch: str, plate: str) -> str:
        return join(self.root, "workspace", "load_data_csv", batch, plate)

    def illum_dir(self, batch: str, plate: str) -> str:
        return join(self.root, "workspace", "illum", batch, plate)

    def analysis_dir(self, batch: str, plate: str) -> str:
        return join(self.root, "workspace", "analysis", batch, plate)

    def analysis_shard_dir(self, batch: str, plate: str, shard: int | str) -> str:
        name = shard if isinstance(shard, str) else f"shard-{shard:04d}"
        return join(self.analysis_dir(batch, plate), name)

    def backend_dir(self, batch: str, plate: str) -> str:
        return join(self.root, "workspace", "backend", batch, plate)

    def single_cell_file(self, batch: str, plate: str) -> str:
        return join(self.backend_dir(batch, plate), f"{plate}.parquet")

    def profiles_dir(self, batch: str, plate: str) -> str:
        return join(self.root, "profiles", batch, plate)

    def profile_file(self, batch: str, plate: str, suffix: str = "", ext: str = ".csv.gz") -> str:
        return join(self.profiles_dir(batch, plate), f"{plate}{suffix}{ext}")

    def deep_profiles_dir(self, batch: str, plate: str) -> str:
        return join(self.root, "deep_profiles", batch, plate)

    def benchmark_dir(self, name: str) -> str:
        return join(self.root, "benchmark", name)

    def qc_dir(self, stage: str, batch: str, plate: str) -> str:
        return join(self.root, "qc", stage, batch, plate)


def layout(settings: Any) -> Layout:
    return Layout(settings.storage_root)


def plate_images_dir(images_root: str, batch: str, plate: str, settings: Any = None) -> str:
    """The image folder of a plate: ``<root>/<batch>/images/<plate>`` or, as in the Cell
    Painting Gallery, ``<root>/<batch>/images/<plate>__<acquisition time>``.

    Raises :class:`~cpjump1.errors.InputDataError` naming the folder searched when neither exists.
    """
    from cpjump1.errors import InputDataError

    base = join(images_root, batch, "images")
    direct = join(base, plate)
    if exists(direct, settings):
        return direct
    candidates = sorted(
        e for e in listdir(base, settings) if basename(e).startswith(f"{plate}__")
    )
    if candidates:
        return candidates[-1] if is_remote(base) else candidates[-1]
    raise InputDataError(
        f"plate {plate} of batch {batch}: no image folder {plate} or {plate}__<time> under {base}"
    )
