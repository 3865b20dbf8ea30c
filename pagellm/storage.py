"""Stage inputs and outputs addressed by a local path or a URI (s3://, gs://, hdfs://, file://
through pyarrow.fs; other schemes through fsspec), so that a multi-node run shares them.

A stage reads URI inputs from a local copy (``fetch``: downloaded once per call into the cache)
and writes a URI output into a local staging directory that is uploaded when the stage
succeeds (``output``); a stage resumed on another machine first downloads what the URI holds.
Ray Train's checkpoints go straight to the URI (``train_storage``: Ray Train's
``storage_path``), where every worker node reads and writes them; so do the PPO role actors'
checkpoints (``local_copy`` to read a location on whichever node an actor runs, ``staged`` to
write one, ``write_text`` / ``read_text`` / ``subdirs`` for the driver's small files).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pyarrow.fs as pafs

from pagellm.errors import InputError

CACHE = Path(os.environ.get("PAGELLM_CACHE", Path.home() / ".cache" / "pagellm"))


def is_uri(location) -> bool:
    return "://" in str(location)


def join(location, *parts: str) -> str:
    """``location``/``parts``, for a path or a URI alike."""
    return "/".join([str(location).rstrip("/"), *parts])


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it (a local path: the local filesystem)."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception:  # noqa: BLE001 - pyarrow knows no such scheme: try fsspec
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _staging(uri: str, kind: str) -> Path:
    return CACHE / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _copy(src_fs, src: str, dst_fs, dst: str) -> None:
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs, use_threads=True)


def fetch(location) -> Path:
    """A local directory holding ``location``: itself when local, else a fresh download."""
    if not is_uri(location):
        return Path(location)
    fs, path = resolve(str(location))
    if not _exists(fs, path):
        raise InputError(f"{location} does not exist")
    local = _staging(str(location), "inputs")
    shutil.rmtree(local, ignore_errors=True)
    _copy(fs, path, pafs.LocalFileSystem(), str(local))
    return local


@contextmanager
def local_copy(location) -> Iterator[Path]:
    """A local directory holding ``location`` for the duration of the block: itself when local,
    else a private download removed after (safe when several processes of a node read one URI)."""
    if not is_uri(location):
        yield Path(location)
        return
    fs, path = resolve(str(location))
    if not _exists(fs, path):
        raise InputError(f"{location} does not exist")
    with tempfile.TemporaryDirectory(prefix="pagellm-") as tmp:
        _copy(fs, path, pafs.LocalFileSystem(), tmp)
        yield Path(tmp)


@contextmanager
def staged(location) -> Iterator[Path]:
    """Where to write ``location``: itself when local, else a private directory uploaded (merged
    into what the URI holds) when the block succeeds."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="pagellm-") as tmp:
        yield Path(tmp)
        upload(tmp, location)


def upload(local, location) -> None:
    """Copy the local directory ``local`` into ``location`` (a path or a URI)."""
    fs, path = resolve(str(location))
    _copy(pafs.LocalFileSystem(), str(Path(local).absolute()), fs, path)


def write_text(location, text: str) -> None:
    fs, path = resolve(str(location))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(location) -> str:
    fs, path = resolve(str(location))
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def exists(location) -> bool:
    fs, path = resolve(str(location))
    return _exists(fs, path)


def subdirs(location) -> list[str]:
    """Names of the directories directly in ``location`` (none when it does not exist)."""
    fs, path = resolve(str(location))
    if not _exists(fs, path):
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def remove(location) -> None:
    fs, path = resolve(str(location))
    if _exists(fs, path):
        fs.delete_dir(path)


@contextmanager
def output(location, resume: bool = False) -> Iterator[Path]:
    """Where a stage writes ``location``: itself when local; for a URI a staging directory
    uploaded after the stage succeeds (with ``resume``, first filled from the URI)."""
    if not is_uri(location):
        yield Path(location)
        return
    fs, path = resolve(str(location))
    local = _staging(str(location), "outputs")
    if not resume:
        shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True, exist_ok=True)
    if resume and _exists(fs, path):
        _copy(fs, path, pafs.LocalFileSystem(), str(local))
    yield local
    _copy(pafs.LocalFileSystem(), str(local), fs, path)


def train_storage(location, stage: str = "") -> Optional[str]:
    """Ray Train's ``storage_path`` for a stage writing ``location``: under the URI itself
    (shared by the nodes), or None for a local output (then next to it, OUT/logs/ray_train)."""
    if not is_uri(location):
        return None
    base = str(location).rstrip("/") + (f"/{stage}" if stage else "")
    return base + "/logs/ray_train"
