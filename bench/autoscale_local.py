"""Autoscaling on one machine: scale-up from zero and idle scale-down on cluster-local.yaml (fake multi-node).

    python bench/autoscale_local.py [--config cluster-local.yaml] [--idle-minutes M] [--task-seconds 5]

Starts the head the documented way for the fake provider (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`, see cluster-local.yaml) with the head node type's resources (CPU 0), submits one
task that needs a CPU the head does not have, and prints the timeline: task submitted -> worker node joined
-> task ran -> task done -> worker node removed after the idle timeout.  Then it tears the cluster down.

Isolated from any other Ray on the machine: its own GCS port, client/agent ports, temp dir and auth token
(RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH in that temp dir, like cluster.yaml's token auth).  Teardown
never runs `ray stop` (which would stop every Ray here): SIGTERM to its own `ray start --block` (which stops
the processes it started), then any process whose command line names its private temp dir (fake worker
raylets), by pid.  Wall time: the idle timeout plus about a minute (head start, node launch, monitor ticks).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")  # the venv's own ray, same version as this interpreter
    return str(beside) if beside.exists() else "ray"


def pids_naming(text: str, prefix: str = "") -> list[int]:
    """Processes (not this one) whose command line starts with `prefix` and contains `text` — here our private
    temp dir, so never another Ray's; bench/faults.py finds Ray workers by title (`ray::Class`) with it."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(prefix) and text in cmdline:
            pids.append(int(proc.name))
    return pids


def _terminate(head: subprocess.Popen, tmp: str) -> None:
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # ray start --block stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_naming(tmp)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while pids and time.time() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.2)
        if not pids:
            return


def use_token_auth(tmp: str) -> None:
    """Token auth as cluster.yaml has it, with a fresh token in `tmp`; every process started from here (the
    head, its fake nodes, `ray job submit`) inherits it."""
    token_path = Path(tmp) / "auth_token"
    token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    token_path.chmod(0o600)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0")


def start_fake_head(config: dict, tmp: str, dashboard_port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` for the fake provider on private ports and temp dir, with `config` as its
    autoscaling config (written into `tmp`) and the head node type's resources; returns (the process, the GCS
    address) once the GCS listens. `dashboard_port`: with the dashboard there (the job API), else without."""
    import ray

    head_resources = dict(config["available_node_types"][config["head_node_type"]]["resources"])
    port, ip = _free_port(), ray.util.get_node_ip_address()
    # Fake worker nodes join the GCS at provider.gcs_address (default: this host's port 6379, which another
    # Ray may own): point them at ours.
    config = {**config, "provider": {**config["provider"], "gcs_address": f"{ip}:{port}"}}
    config_path = Path(tmp) / "cluster-local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    dashboard = (
        ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        if dashboard_port
        else ["--include-dashboard=false"]
    )
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--temp-dir={tmp}/ray",
        f"--autoscaling-config={config_path}",
        f"--num-cpus={head_resources.pop('CPU', 0)}",  # the head advertises what its node type in the file says
        f"--num-gpus={head_resources.pop('GPU', 0)}",
        "--object-store-memory=100000000",
        *dashboard,
        "--disable-usage-stats",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]
    log_path = Path(tmp) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:  # wait for the head's GCS to listen; ray.init then waits for the head's raylet itself
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}; see {log_path}")
        if time.time() > deadline:
            _terminate(head, tmp)
            raise TimeoutError(f"no GCS on {ip}:{port}; see {log_path}")
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(1)
            s.connect((ip, port))
            return head, f"{ip}:{port}"
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "cluster-local.yaml"))
    parser.add_argument("--idle-minutes", type=float, default=None, help="override idle_timeout_minutes")
    parser.add_argument("--task-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="give up (and still tear down) after this")
    args = parser.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    assert config["provider"]["type"] == "fake_multinode", "needs a fake_multinode config"
    if args.idle_minutes is not None:
        config["idle_timeout_minutes"] = args.idle_minutes
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"].get("CPU", 0)

    tmp = tempfile.mkdtemp(prefix="mode-ray-as-")  # short: Ray's unix sockets live under it

    use_token_auth(tmp)  # before Ray is imported: this process is a driver of the cluster too
    import ray

    t_start = time.time()
    head, address = start_fake_head(config, tmp)
    t0 = None

    def mark(what: str, at: float | None = None) -> float:
        at = time.time() if at is None else at
        print(f"  {at - (t0 or at):7.1f}s  {what}", flush=True)
        return at

    try:
        deadline = time.time() + args.timeout
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        print(f"head up in {time.time() - t_start:.1f}s (GCS {address}, temp dir {tmp})")
        head_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}

        @ray.remote(num_cpus=1)
        def hold(seconds: float) -> tuple[float, float, str]:
            start = time.time()
            time.sleep(seconds)
            return start, time.time(), ray.get_runtime_context().get_node_id()

        t0 = time.time()
        ref = hold.remote(args.task_seconds)
        mark(f"task submitted (num_cpus=1; the head has CPU {head_cpus})", t0)

        joined = done = removed = None
        task_node = None
        while time.time() < deadline:
            alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
            if joined is None:
                new = [i for i in alive if i not in head_ids]
                if new:
                    res = {k: v for k, v in alive[new[0]]["Resources"].items() if k in ("CPU", "GPU")}
                    joined = mark(f"worker node joined: {new[0][:12]}... {res}")
            if done is None and ray.wait([ref], timeout=0)[0]:
                started, done, task_node = ray.get(ref)
                mark(f"task started on {task_node[:12]}...", started)
                mark("task finished: the node is idle from here", done)
            if task_node is not None and task_node not in alive:
                idle_s = 60 * config["idle_timeout_minutes"]
                removed = mark(f"worker node removed after {time.time() - done:.1f}s idle (idle timeout {idle_s:.0f}s)")
                break
            time.sleep(0.5)
        else:
            print(f"timed out after {args.timeout:.0f}s; autoscaler log: {tmp}/ray/session_latest/logs/monitor.*")
            return 1

        print("\nsummary:")
        print(f"  scale-up   (submit -> node joined):        {joined - t0:6.1f}s")
        print(f"  scale-down (task done -> node removed):    {removed - done:6.1f}s")
        print(f"  whole run  (head start -> node removed):   {removed - t_start:6.1f}s")
        return 0
    finally:
        try:
            ray.shutdown()
        finally:
            _terminate(head, tmp)
            left = pids_naming(tmp)
            print(f"torn down ({'nothing left' if not left else f'still running: {left}'}); logs kept in {tmp}")


if __name__ == "__main__":
    sys.exit(main())
