"""What the pages show about a run, read from the run's own files only: each data expert's share of the data
(samples, fine clusters, example pairs, the words that mark its captions), the report's rows and files, and a
few evaluation images to try.

Bounded whatever the run's size: EXAMPLES_PER_EXPERT thumbnails of at most THUMB_PX a side per expert,
captions cut at CAPTION_CHARS, terms from the first CAPTIONS_PER_EXPERT captions of each partition, TRY_IMAGES
images to try, each at most TRY_PX a side.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from mode_ray.config import Config
from mode_ray.run_root.layout import RunPaths
from mode_ray.run_root.names import expert_name
from mode_ray.run_root.storage import exists, get_fs, join, parquet_dataset, read_bytes, read_json

EXAMPLES_PER_EXPERT = 8
THUMB_PX = 64
TRY_PX = 224
CAPTION_CHARS = 200
CAPTIONS_PER_EXPERT = 2000
TERMS = 8
TRY_IMAGES = 8
TRY_PER_TASK = 2
# The report's files a page may ask for, by name (nothing else of the run is served), and their media types.
REPORT_FILES = {
    "report.md": "text/markdown; charset=utf-8",
    "report.csv": "text/csv; charset=utf-8",
    "report.png": "image/png",
    "training_curves.png": "image/png",
    "moe_usage.png": "image/png",
}


def data_url(image: bytes, side: int) -> str:
    """The image as a JPEG data: URL no larger than `side` a side (small, and never the stored bytes as they are)."""
    with Image.open(io.BytesIO(image)) as img:
        img = img.convert("RGB")
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _partition(cfg: Config, expert: int, columns: list[str], rows: int) -> dict[str, list[Any]]:
    """The first `rows` rows of one coarse partition of the manifest (empty when it has none)."""
    folder = join(RunPaths(cfg.run_root).manifest, f"coarse_id={expert}")
    if not exists(folder, cfg.data.s3):
        return {c: [] for c in columns}
    return parquet_dataset(folder, cfg.data.s3).head(rows, columns=columns).to_pydict()


def _examples(cfg: Config, expert: int) -> list[dict[str, Any]]:
    """Example pairs of an expert, one per fine cluster first (its clusters are what it holds), then more."""
    part = _partition(cfg, expert, ["caption", "image", "fine_id"], 16 * EXAMPLES_PER_EXPERT)
    first_of = {}  # fine cluster → its first row
    for i, fine in enumerate(part["fine_id"]):
        first_of.setdefault(fine, i)
    firsts = list(first_of.values())
    order = firsts + sorted(set(range(len(part["fine_id"]))) - set(firsts))
    out = []
    for i in order[:EXAMPLES_PER_EXPERT]:
        try:
            thumbnail = data_url(part["image"][i], THUMB_PX)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # the manifest holds decodable images only; a file changed since is shown without it
        caption = str(part["caption"][i] or "")[:CAPTION_CHARS]
        out.append({"thumbnail": thumbnail, "caption": caption, "fine": int(part["fine_id"][i])})
    return out


def top_terms(documents: list[str]) -> list[list[str]]:
    """Each document's TERMS words of highest tf-idf against the others (scikit-learn's TfidfVectorizer)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not any(d.strip() for d in documents):
        return [[] for _ in documents]
    vectorizer = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b", sublinear_tf=True)
    matrix = vectorizer.fit_transform(documents).toarray()
    words = vectorizer.get_feature_names_out()
    return [[str(words[j]) for j in np.argsort(-row, kind="stable")[:TERMS] if row[j] > 0] for row in matrix]


def report_rows(cfg: Config) -> dict[str, Any]:
    """The report's accuracy per model and task (with its compute), and which report files exist."""
    paths, s3 = RunPaths(cfg.run_root), cfg.data.s3
    files = [name for name in REPORT_FILES if exists(join(paths.eval, name), s3)]
    if "report.csv" not in files:
        return {"tasks": [], "rows": [], "files": files}
    rows: dict[str, dict[str, Any]] = {}
    tasks: list[str] = []
    for r in csv.DictReader(io.StringIO(read_bytes(join(paths.eval, "report.csv"), s3).decode())):
        if r["metric"] != "accuracy":
            continue
        row = rows.setdefault(r["model"], {"model": r["model"], "kind": r["kind"], "accuracy": {}})
        row["accuracy"][r["task"]] = float(r["value"])
        row["compute_samples"] = int(r["compute_samples"]) if r["compute_samples"] else None
        row["train_seconds"] = float(r["train_seconds"]) if r["train_seconds"] else None
        if r["task"] not in tasks:
            tasks.append(r["task"])
    return {"tasks": tasks, "rows": list(rows.values()), "files": files}


def explorer_data(cfg: Config, n_experts: int, fine_to_coarse: np.ndarray, present: list[int]) -> dict[str, Any]:
    """Everything the experts page shows, computed once per ingress replica."""
    paths, s3 = RunPaths(cfg.run_root), cfg.data.s3
    per_expert = read_json(paths.prep_summary, s3).get("per_expert", {}) if exists(paths.prep_summary, s3) else {}
    fine_counts = np.bincount(fine_to_coarse, minlength=n_experts)
    captions = [
        " ".join(str(c or "") for c in _partition(cfg, e, ["caption"], CAPTIONS_PER_EXPERT)["caption"]) for e in present
    ]
    report = report_rows(cfg)
    accuracy = {row["model"]: row["accuracy"] for row in report["rows"]}
    experts = [
        {
            "id": expert_name(e),
            "samples": per_expert.get(str(e)),
            "fine_clusters": int(fine_counts[e]),
            "examples": _examples(cfg, e),
            "terms": terms,
            "accuracy": accuracy.get(expert_name(e), {}),
        }
        for e, terms in zip(present, top_terms(captions), strict=True)
    ]
    return {"experts": experts, "report": report}


def _eval_rows(location: str | list[str], cfg: Config) -> Iterator[dict[str, Any]]:
    from mode_ray.samples.shards import iter_tar_rows, list_shards

    shards, _ = list_shards(location, cfg.data.s3)
    for url in shards[:1]:
        fs, path = get_fs(url, cfg.data.s3)
        with fs.open(path, "rb") as stream:
            yield from iter_tar_rows(stream, url)


def try_images(cfg: Config) -> list[dict[str, Any]]:
    """A few evaluation images to try, each with its task's class names and its own class (webdataset
    classification tasks only: their labels are in the samples)."""
    from mode_ray.eval.tasks import configured_tasks, is_classification, webdataset_label

    try:
        tasks = [t for t in configured_tasks(cfg) if t.source == "webdataset" and is_classification(t)]
    except (ValueError, OSError):
        return []  # no evaluation configured that can be read: no examples, the page still works
    out: list[dict[str, Any]] = []
    for task in tasks:
        found = 0
        for row in _eval_rows(task.location, cfg):
            if found == TRY_PER_TASK or len(out) == TRY_IMAGES:
                break
            if row.get("image") is None or row.get("json") is None:
                continue
            index, _ = webdataset_label(json.loads(row["json"]), task)
            if index is None:
                continue
            try:
                image = data_url(row["image"], TRY_PX)
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
            names = list(task.class_names or [])
            out.append({"task": task.name, "image": image, "labels": names, "answer": names[index]})
            found += 1
    return out
