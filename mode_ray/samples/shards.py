"""Finding webdataset shards on any file system, and reading one tar without losing what precedes damage.

Plain fsspec/tarfile code (no Ray); the prep stage wraps `iter_tar_rows` in a Ray Data datasource.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from braceexpand import braceexpand

from mode_ray.config import S3Config
from mode_ray.run_root.storage import get_fs
from mode_ray.samples.validate import IMAGE_SUFFIXES

_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: the key ends at the first dot


def _with_protocol(path: str, like: str) -> str:
    if "://" not in like:
        return path
    protocol = like.split("://", 1)[0]
    return f"{protocol}://{path}"


def list_shards(spec: str | list[str], s3: S3Config | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand a directory, glob, brace pattern or list into tar URLs.

    Returns (readable shard URLs, [(url, why)] for named shards that are missing or cannot be stat'ed),
    so a missing shard becomes a reject instead of failing the whole run.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    found: list[str] = []
    problems: list[tuple[str, str]] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            fs, path = get_fs(url, s3)
            try:
                if any(ch in path for ch in "*?["):
                    matches = [p for p in fs.glob(path) if p.endswith(".tar")]
                    if not matches:
                        problems.append((url, "glob matched no .tar files"))
                    found += [_with_protocol(p, url) for p in matches]
                elif fs.isdir(path):
                    matches = [p for p in fs.find(path) if p.endswith(".tar")]
                    if not matches:
                        problems.append((url, "directory holds no .tar files"))
                    found += [_with_protocol(p, url) for p in matches]
                else:
                    fs.info(path)
                    found.append(url)
            except FileNotFoundError:
                problems.append((url, "shard not found"))
            except (PermissionError, OSError) as err:
                problems.append((url, f"{type(err).__name__}: {err}"))
    unique = sorted(set(found), key=lambda u: (_natural_key(u.rsplit("/", 1)[-1]), u))
    return unique, problems


def _natural_key(url: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", url)]


def _empty_row(key: str | None, shard: str) -> dict[str, Any]:
    row = dict.fromkeys(("json", "txt", "cls", "npy", "image", "read_error"))
    return {"key": key, "shard": shard, **row}


class _TailReader:
    """Remembers the last bytes read, so the end-of-archive marker can be checked after streaming."""

    def __init__(self, raw: IO[bytes], keep: int = 1 << 16) -> None:
        self.raw, self.keep, self.pos, self.tail = raw, keep, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        self.tail = (self.tail + data)[-self.keep :]
        return data

    def has_end_marker(self, offset: int) -> bool:
        start = offset - (self.pos - len(self.tail))
        block = self.tail[start : start + tarfile.BLOCKSIZE] if start >= 0 else b""
        return len(block) == tarfile.BLOCKSIZE and not any(block)


def iter_tar_rows(stream: IO[bytes], shard: str) -> Iterator[dict[str, Any]]:
    """Yield one raw row per sample of a tar stream (members of a sample adjacent, as webdataset requires).

    A tar that breaks off (truncated download, corrupt header) does not lose what came before: complete
    samples are yielded, the sample being read is yielded with `read_error`, and a final row with key None
    says the rest of the shard is unreadable. Only uncompressed tars (the webdataset norm) are read.
    """
    current: dict[str, Any] | None = None
    done_keys = 0
    member = ""
    reader = _TailReader(stream)
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                member = info.name
                match = _KEY_SUFFIX.match(info.name)
                if match is None:
                    continue
                key, suffix = match.group(1), match.group(2).lower()
                if current is None or key != current["key"]:
                    if current is not None:
                        yield current
                        done_keys += 1
                    current = _empty_row(key, shard)
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                if suffix == "json":
                    current["json"] = data
                elif suffix == "txt":
                    current["txt"] = data
                elif suffix in ("cls", "npy"):  # the zero-shot suite's labels (single, multi-label)
                    current[suffix] = data
                elif suffix in IMAGE_SUFFIXES and current["image"] is None:
                    current["image"] = data
            # tarfile ends quietly when a file is cut at a member boundary or inside a header; a real
            # archive ends with a zero block, so check for it.
            if not reader.has_end_marker(tar.offset):
                raise tarfile.ReadError("the tar ends without its end-of-archive marker (truncated)")
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        why = f"{type(err).__name__}: {err} (at member {member or 'start'}, after {done_keys} complete samples)"
        if current is not None:
            current["read_error"] = f"sample cut off by a damaged shard: {why}"
            yield current
        tail = _empty_row(None, shard)
        tail["read_error"] = f"rest of shard unreadable: {why}"
        yield tail
        return
    if current is not None:
        yield current
