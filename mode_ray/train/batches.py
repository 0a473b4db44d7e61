"""A worker's training data as one endless, resumable stream of batches. Torch's model libraries stay out of
this module, so a worker can start its data pipeline before it imports the loop (`mode_ray.train.ray_adapter`):
the pipeline's first blocks are read by other processes while this one imports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mode_ray.train.job import TrainJob
    from mode_ray.train.loop import Runtime


def job_batches(job: TrainJob, rt: Runtime) -> Batches:
    """This rank's share of the job's global batch, from its own stream, started now."""
    per_worker_batch = max(2, job.inputs.batch_size // (rt.world_size * job.inputs.grad_accum_steps))
    shuffle = 0 if job.data.kind == "mcl" else job.inputs.shuffle_buffer  # an MCL plan's order is the point
    seed = (job.inputs.seed * 1000 + rt.rank) * 100_000
    return Batches(rt, f"train_rank{rt.rank}", per_worker_batch, shuffle, seed)


class Batches:
    """The worker's data as one endless stream of batches: executions of its dataset, one after another, each
    the same rows in the same order (a function of the job's seed), so (execution, position) is where the
    stream stands and a resumed job continues exactly there. The first execution starts in a thread at once,
    so the pipeline warms up while the worker builds its model (waiting on Ray releases the GIL)."""

    def __init__(self, rt: Runtime, dataset: str, batch_size: int, shuffle_buffer: int, seed: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        # the local shuffle buffer draws its own order per execution, from the seed
        self.start = lambda execution: rt.batches(dataset, batch_size, shuffle_buffer, seed + execution)
        self.batch_size, self.executions, self.position = batch_size, 0, 0
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None
        pool = ThreadPoolExecutor(1, thread_name_prefix="first-batch")
        self._first: Any = pool.submit(self._begin, 0)
        pool.shutdown(wait=False)  # the submitted start still runs; the thread exits after it

    def _begin(self, execution: int) -> tuple[Iterator[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
        iterator = iter(self.start(execution))
        return iterator, next(iterator, None)

    def resume(self, execution: int, position: int) -> None:
        """Continue `position` batches into execution `execution` (the batches before are read and dropped)."""
        if (execution, position) == (0, 0):
            return
        self._first.result()  # the warm-up's execution 0, not needed
        self._first = None
        self.executions, self.position = execution, 0
        self._iterator = iter(self.start(execution))
        for _ in range(position):
            next(self)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._first is not None:
            self._iterator, batch = self._first.result()
            self._first = None
        else:
            batch = next(self._iterator, None)  # type: ignore[arg-type]
        while batch is None:  # this execution ran out: start the next
            if self.position == 0:
                raise RuntimeError(f"an execution of the data gave no batch of {self.batch_size} rows")
            self.executions, self.position = self.executions + 1, 0
            self._iterator, batch = self._begin(self.executions)
        self.position += 1
        return batch
