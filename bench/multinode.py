"""Several nodes: the pipeline as a `ray job submit` job on Ray's fake multi-node cluster, a node lost mid-training.

    python bench/multinode.py [--lose-node] [--workers 2] [--timeout 1800]

cluster-local.yaml's cluster on this machine (a head with 0 CPUs; worker nodes of 2 CPUs launched and removed by
the real autoscaler; bench/autoscale_local.py starts it, token auth included) and an S3-compatible server
(moto) on 127.0.0.1. The job (`python -m jobs.run --only demo-data --only prep --only train --only eval`) runs a
tiny config on an `s3://` run root, every training job at `--workers` Ray Train workers of 1.5 CPUs, so no
node holds two of them and each job's DDP group spans nodes. Ray's state API, polled while it runs, says
where every `RayTrainWorker` ran: the head must hold none. With `--lose-node`, a second run in its own run
root waits until the two jobs that start first have each written a checkpoint to the bucket, then kills one
worker node whose training worker is alive — every process of that node (its raylet, object store, agents and
workers), not one process — and the job must still finish: Ray Train restarts the worker group from the checkpoint
(`training.run.max_failures`) on the nodes the autoscaler brings. Both runs' models are compared by weights
hash (each rank's, from metrics.json): the same bytes is the goal; each model's `resumed_at_steps` says
which restarted and from which checkpoint.

Prints a timeline (nodes joining and leaving, the kill), where the training workers ran, and the comparison;
tears down only its own processes. No GPU needed: gloo on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoscale_local import _free_port, _terminate, start_fake_head, use_token_auth  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "mode-bench"
TINY = (
    "data.demo.samples=240",
    "data.demo.shards=2",
    "data.demo.eval_samples=60",
    "data.demo.eval_shards=1",
    "data.demo.faults=false",
    "embedding.batch_size=128",
    "clustering.n_fine=8",
    "clustering.n_coarse=2",
    "training.model=mode-tiny",
    "training.samples_per_epoch=512",
    "training.epochs=4",
    "training.batch_size=32",
    "training.warmup_steps=2",
    "training.run.checkpoint_every_epochs=1",
    "training.use_seed=false",  # the experts and the generalist side by side: the job's wiring, not the recipe
    "training.run.cpus_per_worker=1.5",  # one training worker a 2-CPU node: every DDP group spans nodes
    "training.run.max_failures=4",
    "moe.enabled=false",
    "eval.retrieval=false",
)
STAGES = ("demo-data", "prep", "train", "eval")


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.time()

    def mark(self, what: str) -> None:
        print(f"  {time.time() - self.t0:7.1f}s  {what}", flush=True)


def node_processes(node_id: str) -> list[int]:
    """Every process of one fake node: the provider starts its raylet, object store and agents with the node's
    id in RAY_OVERRIDE_NODE_ID_FOR_TESTING, and its workers inherit it."""
    marker = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
    return pids


def lose_node(node: dict, timeline: Timeline) -> None:
    """SIGKILL every process of the node, as a machine that lost power."""
    pids = node_processes(node["NodeID"])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    timeline.mark(f"node …{node['NodeID'][-6:]} lost: {len(pids)} processes SIGKILLed")


def run(args, url: str, endpoint: str, head_ids: set[str], lose: bool) -> dict:
    """One job in its own run root; returns where its workers ran, its status and each model's weight hashes."""
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    client, jobs = s3_client(endpoint), JobSubmissionClient(url)
    run_id = f"mn-{uuid.uuid4().hex[:8]}"
    sets = [*TINY, f"run_root=s3://{BUCKET}/{run_id}", f"data.s3.endpoint_url={endpoint}"]
    sets.append(f"training.run.num_workers={args.workers}")
    entry = ["python", "-m", "jobs.run", "--config", "configs/demo.yaml", *[f"--only={s}" for s in STAGES]]
    entry += [f"--set={s}" for s in sets]
    timeline = Timeline()
    # No `working_dir`: the fake nodes share this machine's disk and one temp dir, so one node's runtime-env
    # agent deleting its unused copy of the package deletes every node's (a job driver's cwd vanished under it).
    # This checkout is installed in the venv every node runs; the driver starts in it.
    job = jobs.submit_job(entrypoint=f"cd {REPO} && " + " ".join(entry))
    timeline.mark(f"job {job} submitted ({'a node lost mid-training' if lose else 'undisturbed'}), run root {run_id}")
    worker_nodes, seen_nodes, killed = {}, set(), None
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        status = jobs.get_job_status(job)
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        for node_id in set(alive) - seen_nodes - head_ids:
            cpus = alive[node_id]["Resources"].get("CPU", 0)
            timeline.mark(f"node …{node_id[-6:]} joined ({cpus:.0f} CPU)")
        for node_id in seen_nodes - set(alive) - head_ids:
            timeline.mark(f"node …{node_id[-6:]} gone")
        seen_nodes = set(alive)
        with contextlib.suppress(Exception):  # the state API can time out under load: next poll
            for actor in list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker")], limit=1000):
                worker_nodes[actor.actor_id] = actor.node_id
        if lose and killed is None:
            # train_runs/<job run>/checkpoint_…: the first two jobs start together, so once two runs hold a
            # checkpoint the live workers' jobs (almost surely) have one to resume from; metrics.json says
            runs = {k.split("/")[2] for k in keys(client, f"{run_id}/train_runs/") if "/checkpoint_" in k}
            live = [
                a.node_id
                for a in list_actors(
                    address=url, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
                )
                if a.node_id not in head_ids
            ]
            if len(runs) >= 2 and live:
                killed = live[0]
                lose_node(alive[killed], timeline)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    else:
        jobs.stop_job(job)
        status = "TIMEOUT"
    timeline.mark(f"job ended: {status}")
    logs = jobs.get_job_logs(job)
    models, resumed_at = {}, {}
    for key in keys(client, f"{run_id}/experts/"):
        if key.endswith("/metrics.json"):
            metrics = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            models[key.split("/")[-2]] = metrics["weights_sha256_by_rank"]
            if metrics["resumed_at_steps"]:
                resumed_at[key.split("/")[-2]] = metrics["resumed_at_steps"]  # each restarted attempt's first step
    on_head = [a for a, n in worker_nodes.items() if n in head_ids]
    return {
        "status": str(status),
        "log_tail": logs.strip().splitlines()[-15:],
        "workers": len(worker_nodes),
        "worker_nodes": len(set(worker_nodes.values())),
        "workers_on_head": len(on_head),
        "killed_node": killed,
        "models": models,
        "resumed_at_steps": resumed_at,
        "seconds": time.time() - timeline.t0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lose-node", action="store_true", help="a second run loses a node mid-training")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers per job")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="mode-ray-mn-")  # short: Ray's unix sockets live under it
    use_token_auth(tmp)
    os.environ.update(HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)  # moto's: every process of the cluster inherits them from the head
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request

    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    config = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    # One CPU node more than a job needs: with its node updaters off, the fake provider never marks a node
    # up to date, so the autoscaler never declares a lost one dead and replaces it (on a cloud it does, after
    # AUTOSCALER_HEARTBEAT_TIMEOUT_S): the replacement comes from the spare.
    config["available_node_types"]["ray.worker.cpu"]["max_workers"] += 1
    config["max_workers"] += 1
    dashboard = _free_port()
    head, address = start_fake_head(config, tmp, dashboard_port=dashboard)
    import ray

    results = {}
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        head_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        url = f"http://127.0.0.1:{dashboard}"
        results["undisturbed"] = run(args, url, endpoint, head_ids, lose=False)
        if args.lose_node:
            results["node lost"] = run(args, url, endpoint, head_ids, lose=True)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        _terminate(head, tmp)
        moto.stop()
    print()
    for name, r in results.items():
        print(
            f"{name}: {r['status']} in {r['seconds']:.0f}s; {r['workers']} training workers on {r['worker_nodes']} "
            f"node(s), {r['workers_on_head']} on the head; restarted (model: from steps): "
            f"{r['resumed_at_steps'] or 'none'}"
        )
        if "SUCCEEDED" not in r["status"]:
            print("\n".join("    " + line for line in r["log_tail"]))
    ok = all("SUCCEEDED" in r["status"] and r["workers_on_head"] == 0 and r["models"] for r in results.values())
    if args.lose_node and ok:
        a, b = results["undisturbed"]["models"], results["node lost"]["models"]
        same = [m for m in a if a[m] == b.get(m)]
        print(f"weights the same bytes after the lost node: {len(same)} of {len(a)} models ({', '.join(same)})")
        ok = len(same) == len(a) == len(b)
    Path(tmp, "multinode.json").write_text(json.dumps(results, indent=1))
    print(f"results: {tmp}/multinode.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
