"""Ray Data source for webdataset shards that survives damaged tars.

`ray.data.read_webdataset` fails the whole read task on a truncated tar and loses the samples already
read from it; this datasource reads the same shards (raw bytes, no decoding) through Ray's public
`FileBasedDatasource`, and turns damage into rows with `read_error` so they end up in rejects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from mode_ray.samples.shards import iter_tar_rows
from mode_ray.samples.validate import RAW_SCHEMA

ROWS_PER_BLOCK = 256


class _Unopenable:
    """Stands in for a shard that would not open: reading it raises the open's error as an OSError, which
    `iter_tar_rows` turns into the shard's reject row."""

    def __init__(self, err: Exception) -> None:
        self.err = err

    def read(self, *_: Any) -> bytes:
        raise OSError(f"could not open the shard: {type(self.err).__name__}: {self.err}")

    def close(self) -> None:
        pass

    def __enter__(self) -> _Unopenable:
        return self

    def __exit__(self, *_: Any) -> None:
        pass


class ShardDatasource(FileBasedDatasource):
    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, urls: list[str], filesystem: Any = None) -> None:
        super().__init__(urls, filesystem=filesystem)
        # Ray may hand paths back without their scheme; map them to the URL the user gave.
        self._names = {url.split("://", 1)[-1]: url for url in urls}

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        """A shard that cannot be opened (after the store's own retries) becomes a shard-level reject with the
        reason, like a shard damaged mid-read, instead of failing the whole read."""
        try:
            return super()._open_input_source(filesystem, path, **open_args)
        except Exception as err:  # noqa: BLE001 — any failure to open: the reason goes to rejects
            return _Unopenable(err)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        shard = self._names.get(path.split("://", 1)[-1], path)
        rows: list[dict[str, Any]] = []
        for row in iter_tar_rows(f, shard):
            rows.append(row)
            if len(rows) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
