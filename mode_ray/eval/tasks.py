"""Zero-shot tasks from config: which images, which label each has, which class names and templates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mode_ray.config import Config, EvalTaskConfig

if TYPE_CHECKING:
    from mode_ray.eval.suite import Suite

SKIP_NO_LABEL = "no_label"
SKIP_UNKNOWN_LABEL = "unknown_label"


def configured_tasks(cfg: Config, suite: Suite | None = None) -> list[EvalTaskConfig]:
    """eval.tasks, eval.benchmark's datasets, and the demo's five when eval.demo_tasks is on (over eval.shards).
    `suite`: eval.benchmark already resolved (its folders are read once); None resolves it here."""
    from mode_ray.eval.suite import as_webdataset_task, resolve_benchmark

    tasks = [as_webdataset_task(t, cfg.data.s3) if t.source == "clip_benchmark" else t for t in cfg.eval.tasks]
    suite = suite or resolve_benchmark(cfg.eval.benchmark, cfg.data.s3)
    tasks += suite.tasks if suite else []
    if cfg.eval.demo_tasks:
        if not cfg.eval.shards:
            raise ValueError("eval.demo_tasks needs eval.shards (the demo's eval split)")
        from mode_ray.demo.demo_data import eval_tasks

        tasks += eval_tasks(cfg.eval.shards, cfg.data.demo.difficulty if cfg.data.demo else "standard")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"eval task names must be unique: {names}")
    return tasks


def is_classification(task: EvalTaskConfig) -> bool:
    return task.kind in (None, "classification")


def templates_of(task: EvalTaskConfig, default: list[str]) -> list[str]:
    return list(task.templates or default)


def _dotted(meta: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(meta, dict) or part not in meta:
            return None
        meta = meta[part]
    return meta


def label_index(value: Any, class_names: list[str]) -> tuple[int | None, str | None]:
    """(class index, None) or (None, skip reason): a label is a class name or an index into class_names."""
    if value is None:
        return None, SKIP_NO_LABEL
    if isinstance(value, bool):
        return None, SKIP_UNKNOWN_LABEL
    if isinstance(value, int):
        return (value, None) if 0 <= value < len(class_names) else (None, SKIP_UNKNOWN_LABEL)
    text = str(value)
    if text in class_names:
        return class_names.index(text), None
    return None, SKIP_UNKNOWN_LABEL


def webdataset_label(meta: dict[str, Any] | None, task: EvalTaskConfig) -> tuple[Any, str | None]:
    """A classification task's class index, or a multi-label task's 0/1 list over its classes."""
    value = _dotted(meta, task.label_field or "")
    if task.kind != "multilabel":
        return label_index(value, task.class_names or [])
    if value is None:
        return None, SKIP_NO_LABEL
    if not isinstance(value, list) or len(value) != len(task.class_names or []):
        return None, SKIP_UNKNOWN_LABEL
    return [1 if v else 0 for v in value], None


def folder_classes(class_dirs: list[str], task: EvalTaskConfig) -> list[str]:
    """Class names of a folder task: the configured names (in sorted sub-folder order) or the folder names."""
    dirs = sorted(set(class_dirs))
    if task.class_names is None:
        return dirs
    if len(task.class_names) != len(dirs):
        raise ValueError(
            f"task {task.name!r}: {len(task.class_names)} class_names for {len(dirs)} sub-folders of {task.location}"
        )
    return list(task.class_names)
