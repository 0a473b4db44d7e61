"""Each worker rank's training data, read in order, out of the worker's process.

Ray Train either splits a dataset between workers (`streaming_split`, which hands blocks to whichever worker
asks first: a rank's rows would depend on timing) or gives every worker the whole dataset, whose iterator then
runs Ray Data's scheduling loop inside the training process — where it held the GIL beside the training thread
and halved its steps (measured: a seed model's 500 steps took 113 s of compute against 52 s). So each rank gets
its own dataset, `train_rank{r}`, split into one: it runs in a coordinator actor of its own, in order.

The datasets reach the workers in the loop's config, not through the trainer's `datasets`: Ray Train hands
those out through a `DatasetManager` actor of every trial — one more process, a fresh one importing Ray Data —
only to call `streaming_split` for the workers, which a worker does itself here (and the runner's trainer
drops the callback that starts it: `runner.trial.trainer_class`). A worker's coordinator is its own, so a
restarted worker starts a fresh one, as a restarted worker group got a fresh `DatasetManager`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.data import DataIterator, Dataset

TRAIN_PREFIX = "train_rank"


def with_ingest_options(datasets: dict[str, Dataset], options: dict[str, Any]) -> dict[str, Dataset]:
    """Each dataset named and given its ingest options, as Ray Train's `DataConfig.configure` does."""
    out = {}
    for name, dataset in datasets.items():
        ds = dataset.copy(dataset)
        ds.set_name(name)
        ds.context.execution_options = options[name]
        out[name] = ds
    return out


def open_stream(name: str, dataset: Dataset) -> DataIterator:
    """On the worker: rank r's `train_rank{r}` as a stream of its own, run by a coordinator actor on this node;
    any other dataset (the hold-out) read by the worker itself, whole."""
    if not name.startswith(TRAIN_PREFIX):
        return dataset.iterator()
    import ray

    (stream,) = dataset.streaming_split(1, locality_hints=[ray.get_runtime_context().get_node_id()])
    return stream
