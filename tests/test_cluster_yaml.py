"""cluster.yaml (AWS) and cluster-local.yaml (fake multi-node) pass Ray's own config checks and have the shape
the workload needs.  No cluster is started and nothing touches the network.

Validation is Ray's: `ray.autoscaler._private.util.prepare_config` (what `ray up` runs first: merge with the
provider's defaults.yaml, merge setup commands, docker checks, per-type min/max workers) and then
`ray.autoscaler._private.util.validate_config` (the JSON schema ray-schema.json plus the cross-field checks).
The provider-specific step that `ray up` runs after those (AWS `bootstrap_config` and instance-type resource
detection: key pairs, subnets, security groups, IAM, describe-instance-types) calls the AWS APIs, so it is left
out here.  The fake multi-node provider's defaults file (fake_multi_node/example.yaml) is not in the Ray wheel,
and its autoscaler reads cluster-local.yaml as is, so that file is complete by itself and goes through
prepare_config with empty defaults.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private import util as autoscaler_util
from ray.autoscaler._private.providers import _get_default_config

REPO = Path(__file__).resolve().parents[1]
HEAD = "ray.head.default"
CPU_GROUP = "ray.worker.cpu"
GPU_GROUP = "ray.worker.gpu"
PROJECT_DIR = "/home/ray/mode_ray"


def _raw(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _prepared(name: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    raw = _raw(name)
    try:
        _get_default_config(raw["provider"])
    except FileNotFoundError:  # fake_multinode: no example.yaml in the wheel (see the module docstring)
        monkeypatch.setattr(autoscaler_util, "_get_default_config", lambda provider: {})
    config = autoscaler_util.prepare_config(raw)
    autoscaler_util.validate_config(config)
    return config


@pytest.fixture(params=["cluster.yaml", "cluster-local.yaml"])
def any_config(request, monkeypatch) -> dict:
    return _prepared(request.param, monkeypatch)


@pytest.fixture
def aws(monkeypatch) -> dict:
    return _prepared("cluster.yaml", monkeypatch)


def test_raw_files_validate_as_the_autoscaler_reads_them():
    # The head's autoscaler validates the file it is given without prepare_config (ray start
    # --autoscaling-config cluster-local.yaml; the bootstrap config ray up writes for cluster.yaml).
    autoscaler_util.validate_config(_raw("cluster-local.yaml"))
    assert _raw("cluster.yaml")["provider"]["type"] == "aws"
    assert _raw("cluster-local.yaml")["provider"]["type"] == "fake_multinode"


def test_shape_head_cpu0_autoscaling_cpu_and_gpu_groups(any_config):
    types = any_config["available_node_types"]
    assert any_config["head_node_type"] == HEAD
    assert set(types) == {HEAD, CPU_GROUP, GPU_GROUP}
    assert types[HEAD]["resources"]["CPU"] == 0  # the head schedules no work
    assert types[HEAD].get("max_workers", 0) == 0

    cpu, gpu = types[CPU_GROUP], types[GPU_GROUP]
    assert cpu["min_workers"] == 0 < cpu["max_workers"]
    assert cpu["resources"]["CPU"] > 0 and cpu["resources"].get("GPU", 0) == 0
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    assert gpu["resources"]["GPU"] > 0 and gpu["resources"]["CPU"] > 0

    assert any_config["idle_timeout_minutes"] > 0
    assert 0 < cpu["max_workers"] + gpu["max_workers"] <= any_config["max_workers"]


def test_local_file_mirrors_the_cloud_file_with_a_short_idle_timeout(monkeypatch):
    aws, local = _prepared("cluster.yaml", monkeypatch), _prepared("cluster-local.yaml", monkeypatch)
    assert set(aws["available_node_types"]) == set(local["available_node_types"])
    assert local["idle_timeout_minutes"] <= 2 < aws["idle_timeout_minutes"] <= 60
    assert local["provider"]["disable_node_updaters"] is True  # fake nodes are local raylets, nothing to set up


def test_aws_gpu_group_may_use_spot_and_every_node_can_reach_s3(aws):
    types = aws["available_node_types"]
    assert types[GPU_GROUP]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types[HEAD]["node_config"]  # never lose the head to a spot reclaim
    for node_type in types.values():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), arn
    assert aws["provider"]["cache_stopped_nodes"] is False


def test_aws_runs_rays_official_260_gpu_image(aws):
    docker = aws["docker"]
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311-(gpu|cu\d+)", docker["image"]), docker["image"]
    assert "head_image" not in docker and "worker_image" not in docker  # one image on every node
    for node_type in aws["available_node_types"].values():
        assert "worker_image" not in node_type.get("docker", {})


def test_aws_setup_installs_the_project_everywhere_gpu_extra_on_gpu_nodes(aws):
    assert aws["file_mounts"][PROJECT_DIR] == "."  # the working tree, synced by ray up and to every worker
    plain = re.compile(rf"pip install .*-e '?{re.escape(PROJECT_DIR)}'?(\s|$)")
    gpu = re.compile(rf"pip install .*-e '{re.escape(PROJECT_DIR)}\[gpu\]'")
    # After prepare_config, head/worker_setup_commands hold the global setup_commands too.
    assert any(plain.search(c) for c in aws["head_setup_commands"])
    assert any(plain.search(c) for c in aws["worker_setup_commands"])  # the CPU group uses the global list
    assert "worker_setup_commands" not in aws["available_node_types"][CPU_GROUP]
    gpu_cmds = aws["available_node_types"][GPU_GROUP]["worker_setup_commands"]  # replaces the global list
    assert any(gpu.search(c) for c in gpu_cmds)
    assert not any(gpu.search(c) for c in aws["head_setup_commands"] + aws["worker_setup_commands"])


def test_aws_token_auth_on_head_and_workers(aws):
    def ray_start(cmds: list[str]) -> str:
        (cmd,) = [c for c in cmds if "ray start" in c]
        return cmd

    head, worker = ray_start(aws["head_start_ray_commands"]), ray_start(aws["worker_start_ray_commands"])
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    for cmd in (head, worker):
        assert re.search(r"(^|[\s;])RAY_AUTH_MODE=token ray start", cmd), cmd
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]  # shells and drivers in the container
    # The token itself: the laptop's ~/.ray/auth_token at Ray's default path on every node.
    assert aws["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
