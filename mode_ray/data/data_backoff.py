"""A Ray Data execution callback that pauses the scheduling loop while it has nothing in flight.

Ray Data 2.60's scheduling loop blocks only in `ray.wait()` on running tasks. Once a training trial's reads
are all done, or held back by the object store budget, its split coordinator loops without a pause until the
trainer has consumed everything: measured at ~45% of a core per trial on 2 cores, which halved the steps of
two trials running side by side. Ray has no setting for it; an execution callback is the hook the executor
offers (`DataContext.custom_execution_callback_classes`). A new task still starts within `PAUSE_S` of room
opening up.
"""

from __future__ import annotations

import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

PAUSE_S = 0.05


class IdleBackoff(ExecutionCallback):
    def on_execution_step(self, executor: Any) -> None:
        topology = getattr(executor, "_topology", None) or {}
        if not any(op.num_active_tasks() for op in topology):
            time.sleep(PAUSE_S)


def quiet_training_data() -> None:
    """This process's Ray Data context, for the datasets a training trial builds: no progress bars (the
    trial's executor runs in a coordinator actor: nobody reads them) and the idle pause above."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if IdleBackoff not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(IdleBackoff)
