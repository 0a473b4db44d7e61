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

from mode_ray.samples import RAW_SCHEMA
from mode_ray.shards import iter_tar_rows

ROWS_PER_BLOCK = 256


class ShardDatasource(FileBasedDatasource):
    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, urls: list[str], filesystem: Any = None) -> None:
        super().__init__(urls, filesystem=filesystem)
        # Ray may hand paths back without their scheme; map them to the URL the user gave.
        self._names = {url.split("://", 1)[-1]: url for url in urls}

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
