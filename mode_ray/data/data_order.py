"""The same inputs give the same bytes. Ray Data keeps every dataset's order on the driver (it would hand
blocks over as their tasks finish, so the number of actors and their timing would reorder rows), and
`OrderedParquet` writes each task's rows in that order, named by task index.

Why a sink of our own: Ray's Parquet writer hands a task's blocks to pyarrow's `write_dataset` with threads
on, which writes a partition's rows in whichever order its threads finish (seen: the same manifest rows in
another order run to run), and it names files by a random per-write id."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from mode_ray.config import S3Config
from mode_ray.run_root.storage import get_fs, is_local


def keep_order() -> None:
    """Every dataset made on this driver from now on yields its rows in input order."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True


class OrderedParquet(Datasink):
    """`url/part-TASK.parquet`, or with `partition_col` Hive folders `url/COL=VALUE/part-TASK.parquet` (the
    column dropped from the rows, as Ray's and pyarrow's partitioned writes do); rows in the order they came."""

    def __init__(
        self,
        url: str,
        s3: S3Config | None = None,
        partition_col: str | None = None,
        row_group_size: int | None = None,
    ) -> None:
        self.url, self.s3, self.partition_col = url.rstrip("/"), s3, partition_col
        self.row_group_size = row_group_size

    def write(self, blocks: Any, ctx: Any) -> None:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="default")
        name = f"part-{ctx.task_idx:06d}.parquet"
        if self.partition_col is None:
            self._write(table, f"{self.url}/{name}")
            return
        column = table[self.partition_col]
        for value in np.unique(column.to_numpy()):
            rows = table.filter(pc.equal(column, pa.scalar(value, column.type))).drop_columns(self.partition_col)
            self._write(rows, f"{self.url}/{self.partition_col}={value}/{name}")

    def _write(self, table: pa.Table, url: str) -> None:
        fs, path = get_fs(url, self.s3)
        if is_local(url):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as out:
            pq.write_table(table, out, row_group_size=self.row_group_size)
