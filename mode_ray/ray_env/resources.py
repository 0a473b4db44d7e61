"""What each stage will ask Ray for, and whether a cluster of given nodes can ever give it.

Ray waits for a request it cannot place ("The job may hang forever unless the cluster scales up"): right on a
cluster whose autoscaler adds nodes, a silent hang on an embedded Ray that never grows. So every stage states
its requests here, from the config, and `mode_ray.ray_env.runtime.require_resources` checks them before the stage
starts. Ray-free: plain arithmetic over the config and the nodes' totals.
"""

from __future__ import annotations

from dataclasses import dataclass

from mode_ray.config import Config, DeploymentConfig


@dataclass(frozen=True)
class Need:
    """`count` Ray actors/workers of `cpus` and `gpus` each, all at once, plus `extra_cpus` for the tasks
    that feed them (Ray Data's reads); `setting` names the config keys that decide it."""

    setting: str
    what: str
    cpus: float
    gpus: float = 0.0
    count: int = 1
    extra_cpus: float = 0.0

    def bundles(self) -> list[dict[str, float]]:
        """As resource bundles, for the autoscaler's request_resources."""
        one = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        return [one] * self.count + ([{"CPU": self.extra_cpus}] if self.extra_cpus else [])


def _have(nodes: list[dict[str, float]]) -> str:
    cpu, gpu = (sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU"))
    return f"Ray has {cpu:g} CPU and {gpu:g} GPU" + (f" on {len(nodes)} nodes" if len(nodes) > 1 else "")


def shortfalls(needs: list[Need], nodes: list[dict[str, float]]) -> list[str]:
    """Why a stage's `needs` (all held at once) can never be placed on nodes with these total resources (one
    dict per node): each actor must fit one node, and all of them the cluster. Empty when they fit."""
    problems = []
    for need in needs:
        if not any(n.get("CPU", 0.0) >= need.cpus and n.get("GPU", 0.0) >= need.gpus for n in nodes):
            asked = f"{need.cpus:g} CPU" + (f" + {need.gpus:g} GPU" if need.gpus else "")
            problems.append(f"{need.setting}: a {need.what} asks for {asked}, more than any node has ({_have(nodes)})")
    if problems:
        return problems
    for kind in ("CPU", "GPU"):
        asked = {n.setting: n.count * (n.cpus if kind == "CPU" else n.gpus) for n in needs}
        if kind == "CPU":
            asked = {k: v + n.extra_cpus for (k, v), n in zip(asked.items(), needs, strict=True)}
        if sum(asked.values()) > sum(n.get(kind, 0.0) for n in nodes):
            parts = "; ".join(f"{k}: {v:g}" for k, v in asked.items() if v)
            problems.append(f"this stage asks for {sum(asked.values()):g} {kind} at once ({parts}) but {_have(nodes)}")
    return problems


def embedding_needs(cfg: Config) -> list[Need]:
    e = cfg.embedding
    setting = (
        f"embedding.num_cpus_per_actor={e.num_cpus_per_actor:g}, num_gpus_per_actor={e.num_gpus_per_actor:g}, "
        f"min_actors={e.min_actors} (+ 0.5 CPU for the read tasks)"
    )
    # The validate tasks beside the pool ask for 0.5 CPU each; without one free, the pool never gets rows.
    return [Need(setting, "caption-embedding actor", e.num_cpus_per_actor, e.num_gpus_per_actor, e.min_actors, 0.5)]


def clustering_needs(cfg: Config) -> list[Need]:
    gpus = 1.0 if cfg.clustering.use_gpu else 0.0
    return [Need(f"clustering.use_gpu={cfg.clustering.use_gpu}", "k-means task", 1.0, gpus)]


def assignment_needs(cfg: Config) -> list[Need]:
    e = cfg.embedding
    setting = f"embedding.num_cpus_per_actor={e.num_cpus_per_actor:g}, min_actors={e.min_actors}"
    return [Need(setting, "centroid-assignment actor", e.num_cpus_per_actor, 0.0, e.min_actors)]


def training_needs(cfg: Config) -> list[Need]:
    """One trial: its Train workers and its read tasks (more trials run when more fit; one must)."""
    r = cfg.training.run
    setting = (
        f"training.run.num_workers={r.num_workers}, cpus_per_worker={r.cpus_per_worker:g}, use_gpu={r.use_gpu}, "
        f"data_cpus_per_trial={r.data_cpus_per_trial:g}"
    )
    gpus = 1.0 if r.use_gpu else 0.0
    return [Need(setting, "training worker", r.cpus_per_worker, gpus, r.num_workers, r.data_cpus_per_trial)]


def eval_needs(cfg: Config) -> list[Need]:
    setting = f"eval.num_cpus={cfg.eval.num_cpus:g}, use_gpu={cfg.eval.use_gpu} (+ 0.5 CPU for the read tasks)"
    gpus = 1.0 if cfg.eval.use_gpu else 0.0
    return [Need(setting, "image-feature actor", cfg.eval.num_cpus, gpus, 1, 0.5)]


def serve_needs(cfg: Config, n_models: int) -> list[Need]:
    """Every replica Serve starts at once: the ingress and one or all models' deployments."""
    s = cfg.serve
    groups = n_models if s.layout == "per_expert" else 1

    def replicas(name: str, dep: DeploymentConfig, count: int) -> Need:
        setting = f"serve.{name}: num_cpus={dep.num_cpus:g}, num_gpus={dep.num_gpus:g}, min_replicas={dep.min_replicas}"
        setting += f" × {count} deployments (serve.layout={s.layout})" if count > 1 else ""
        return Need(setting, f"{name} replica", dep.num_cpus, dep.num_gpus, count * max(1, dep.min_replicas))

    return [replicas("ingress", s.ingress, 1), replicas("experts", s.experts, groups)]
