"""Starting (or joining) Ray from the config: an embedded local instance, or a cluster address."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from mode_ray.config import Config

# Passed to every worker, so the offline encoder and the s3 settings behave the same on a cluster.
_FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "RAY_DATA_LOGGING_CONFIG",
    "TRANSFORMERS_OFFLINE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
)


IDLE_WORKERS = 8
LOG_DIR: list[str] = []  # Ray's log folder of the running session, once known (printed with errors)
_STARTED_HERE: list[bool] = []  # [True] while the Ray this process started is up (it ends with the process)


def started_here() -> bool:
    """Whether the running Ray is the embedded one this process started (and will shut down)."""
    return bool(_STARTED_HERE)


def cluster_address(cfg: Config) -> str | None:
    """The Ray cluster to join: `ray.address`, or the one a `ray job submit` driver runs in (Ray sets
    RAY_ADDRESS for it); None means start an embedded Ray from the `ray` section."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_runtime(cfg: Config) -> Iterator[None]:
    """Use the running Ray if there is one (tests, `ray job submit`); else start one and shut it down after."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    quiet_at_the_source()
    embedded_ray_environment()
    from mode_ray.console.progress import verbose

    # Worker output goes to Ray's log folder; streamed to the driver only when asked for (--verbose).
    kwargs: dict = {
        "log_to_driver": verbose(),
        "logging_level": logging.INFO if verbose() else logging.WARNING,
    }
    address = cluster_address(cfg)
    if address:  # joining: the cluster's own resources apply; the `ray` section's local-start settings do not
        kwargs["address"] = address
        # A cluster's workers do not inherit this process's environment; an embedded Ray's do (its raylet
        # is our child), where a runtime environment would start every worker through Ray's setup_worker.py,
        # one more Python process each.
        kwargs["runtime_env"] = {"env_vars": {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}}
        ignored = [k for k in ("num_cpus", "object_store_memory_mb") if getattr(cfg.ray, k) is not None]
        if ignored:
            from mode_ray.console.progress import console

            console.print(f"  joining the Ray cluster at {address}: ray.{', ray.'.join(ignored)} ignored")
    else:
        _explicit_token_auth()
        kwargs["num_cpus"] = cfg.ray.num_cpus
        kwargs["include_dashboard"] = cfg.ray.include_dashboard
        if cfg.ray.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
    ray.init(**kwargs)
    _quiet_after_init()
    _STARTED_HERE[:] = [] if address else [True]
    try:
        yield
    finally:
        _STARTED_HERE.clear()
        ray.shutdown()


def _explicit_token_auth() -> None:
    """Token authentication for the embedded Ray, chosen explicitly.

    Ray 2.60 turns token authentication on for a new local `ray.init()` when RAY_AUTH_MODE is unset, and
    warns on the console that it did so (pointing at RAY_AUTH_MODE=disabled). The notice is for a mode picked
    on the user's behalf; Ray's docs (ray-security/token-auth) make `RAY_AUTH_MODE=token` the way to ask for
    it, and for a local `ray.init()` Ray then generates and uses the token itself (~/.ray/auth_token, or
    RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH when set). So ask for token mode: the same secure default, stated
    rather than defaulted, and no warning is due. Disabling it would open the embedded Ray (it runs any code
    it is sent) to anyone on the network, so only the user does that: a RAY_AUTH_MODE already set (token or
    disabled, as the test suite sets it) is left as it is; an empty one counts as unset. Only for an embedded
    start: a cluster we join has its own mode, which Ray reads from the environment and the cluster's token.

    Ray reads its configuration once, when imported, so setting the variable now also needs that cached copy
    re-read — what Ray itself does when it turns the mode on (`Config.initialize("")`); the raylet and the
    workers inherit the variable from this process.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._raylet import Config
    except ImportError:  # a Ray without it: leave the mode unset, Ray's own default (and notice) applies
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def embedded_ray_environment() -> None:
    """What a Ray started on this machine (embedded, or a test's `ray start` head) reads from the environment
    it inherits; set before it starts, never over a value the user set."""
    # Keep idle worker processes (Ray's default keeps one per CPU and kills the rest after a second idle):
    # each training trial's read tasks then reuse processes that already imported their libraries instead of
    # paying for it again (measured on 2 cores: a trial's first steps ran 3x slower beside cold processes).
    os.environ.setdefault("RAY_num_workers_soft_limit", str(IDLE_WORKERS))
    # Fractional-CPU actors and tasks are this workload's design, so more worker processes than CPUs start at
    # once; tell the raylet (its default expects one per CPU and warns on the console at every multiple).
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(IDLE_WORKERS))
    # Ray's log monitor (started by every local Ray, whatever `log_to_driver` says) globs the session's log
    # folder ten times a second until it holds 1,000 files; this makes it every 0.5 s from the first file. A
    # new worker's log is then picked up at most 0.5 s later; lines are never skipped (it reads each file from
    # its start). Measured on 2 cores with 400 log files: 1.1% → 0.5% of a core.
    os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")


def quiet_at_the_source() -> None:
    """Unless verbose: Ray Data's console logging at WARNING (its documented RAY_DATA_LOGGING_CONFIG; the full
    log still goes to Ray's session folder), Tune's silent output engine (its new one prints a header per
    experiment whatever the verbosity), no Hugging Face download/loading bars."""
    from mode_ray.console.progress import verbose

    if verbose():
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml"))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_after_init() -> None:
    """Ray's loggers after `ray.init` (which sets them up), Ray Data's progress bars off, the log folder noted."""
    from mode_ray.console.progress import console, quiet_ray_logs

    quiet_ray_logs()
    try:  # no public accessor for the session folder
        from ray._private.worker import _global_node

        LOG_DIR[:] = [os.path.join(_global_node.get_session_dir_path(), "logs")]
        console.print(f"  [dim]Ray's logs: {LOG_DIR[0]} (`mode-ray --verbose` shows them live)[/dim]")
    except Exception:  # noqa: BLE001 — only a hint
        pass


def log_hint() -> str:
    return f" (full logs: {LOG_DIR[0]})" if LOG_DIR else ""


class ResourceError(ValueError):
    """A stage asks for resources this Ray can never (embedded) or did not in time (cluster) provide."""


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def require_resources(cfg: Config, needs: list, stage: str, poll_s: float = 2.0, report_s: float = 30.0) -> None:
    """Before a stage starts: its requests (`mode_ray.ray_env.resources.Need`) fit what Ray reports. An embedded Ray
    never grows, so a misfit is an error at once naming the setting; on a cluster the autoscaler is asked for
    them (`request_resources`) and the stage waits, saying so, for at most `ray.resource_wait_s`."""
    import time

    from rich.markup import escape

    from mode_ray.console.progress import console
    from mode_ray.ray_env.resources import shortfalls

    problems = shortfalls(needs, _alive_nodes())
    if not problems:
        return
    if cluster_address(cfg) is None:
        raise ResourceError(f"{stage}: " + "; ".join(problems) + " (this embedded Ray cannot grow: change the setting)")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[b for need in needs for b in need.bundles()])
    started = last_report = time.monotonic()
    wait_s = cfg.ray.resource_wait_s
    console.print(f"  [yellow]{stage}: waiting up to {wait_s:.0f}s for the autoscaler: {escape(problems[0])}")
    try:
        while problems := shortfalls(needs, _alive_nodes()):
            waited = time.monotonic() - started
            if waited >= cfg.ray.resource_wait_s:
                raise ResourceError(
                    f"{stage}: after {waited:.0f}s (ray.resource_wait_s) the cluster still cannot place it: "
                    + "; ".join(problems)
                )
            if time.monotonic() - last_report >= report_s:
                console.print(f"  [yellow]{stage}: still waiting for nodes ({waited:.0f}s): {escape(problems[0])}")
                last_report = time.monotonic()
            time.sleep(poll_s)
    finally:
        request_resources(num_cpus=0)  # the stage's own requests keep the nodes from here on


def wait_for_released_cpus(timeout_s: float = 10.0) -> None:
    """Before a Ray Data write: wait (bounded) until earlier pipelines' actors have given their CPUs back.

    Ray Data stops an actor pool asynchronously; a pipeline started right after may find no free CPU, wait
    for it, and warn that it may hang. On the embedded Ray every CPU is ours, so wait for all of them; on a
    shared cluster for any; after `timeout_s` go on and let Ray schedule as usual.
    """
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total = ray.cluster_resources().get("CPU", 0)
        if started_here():  # every CPU is ours: all of them back (and reported, right after Ray starts)
            if total and ray.available_resources().get("CPU", 0) >= total:
                return
        elif ray.available_resources().get("CPU", 0) >= min(1.0, total):  # autoscaling from 0: do not wait
            return
        time.sleep(0.1)


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor has died; returns how many.

    Ray keeps a (non-detached) group until its creator actor *and* its job are dead. A trial's driver killed
    mid-run takes its TorchTrainer's controller with it, but the worker group's group — reserving each worker's
    CPUs — stays until the whole command ends: later trials and stages then wait for CPUs forever (found by
    bench/chaos.py). Ray has no public API that says who created a group, so the GCS table is read (private,
    hence the guard). A group made by a driver has no creator actor and is never touched."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        from ray._private.state import state
        from ray.core.generated.gcs_pb2 import PlacementGroupTableData

        table = [
            PlacementGroupTableData.FromString(raw)
            for raw in state._connect_and_get_accessor().get_placement_group_table()
        ]
    except Exception as err:  # noqa: BLE001 — a private API: if it moved, leave the groups to Ray
        logging.getLogger(__name__).warning("could not read Ray's placement groups (%s); none released", err)
        return 0
    job = ray.get_runtime_context().get_job_id()
    released = 0
    for group in table:
        orphan = group.creator_actor_dead and not ray.ActorID(group.creator_actor_id).is_nil()
        if orphan and not group.is_detached and group.creator_job_id.hex() == job and group.state != group.REMOVED:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            released += 1
    return released
