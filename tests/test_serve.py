"""The Serve endpoint over real HTTP on 127.0.0.1: the HF zero-shot shape, the offline numbers online,
4xx for every bad input, a load test, a replica dying, checkpoints from s3://."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mode_ray.demo import demo_data
from mode_ray.samples.shards import iter_tar_rows
from tests.conftest import served_config, undeploy

MAX_REQUEST_BYTES = 300_000
IMAGES_PER_TASK = 8


@pytest.fixture(scope="module")
def served(evaluated_run):
    from mode_ray.stages.serve import deploy

    eval_cfg, _ = evaluated_run
    cfg = served_config(
        eval_cfg,
        f"serve.max_request_bytes={MAX_REQUEST_BYTES}",
        "serve.max_image_pixels=1000000",
        "serve.max_labels=20",
        "serve.request_timeout_s=20",
        "serve.layout=per_expert",
        "serve.body_timeout_s=3",  # the trickling body's bounded wait, short (the default is 10 s)
    )
    url = deploy(cfg)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield cfg, url, client
    undeploy(cfg)


def _b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()


def _eval_images(cfg) -> dict[str, list[tuple[str, bytes, int]]]:
    """task → [(key as the eval report writes it, image bytes, label index)]."""
    out: dict[str, list] = {t: [] for t in demo_data.CLASS_NAMES}
    for tar in sorted(Path(cfg.eval.shards).rglob("*.tar")):
        with open(tar, "rb") as f:
            for row in iter_tar_rows(f, str(tar)):
                meta = json.loads(row["json"])
                for task, names in demo_data.CLASS_NAMES.items():
                    value = meta["attributes"].get(task)
                    if value is not None and len(out[task]) < IMAGES_PER_TASK:
                        out[task].append((f"{tar}#{row['key']}", row["image"], names.index(value)))
    return out


def _request(image: bytes, labels, **extra) -> dict:
    return {"inputs": _b64(image), "parameters": {"candidate_labels": list(labels), **extra}}


def test_ensemble_online_matches_the_offline_evaluation(served):
    cfg, _, client = served
    preds = pd.read_parquet(Path(cfg.run_root) / "eval" / "predictions.parquet")
    routing = {(r["task"], r["method"]): r for r in json.loads((Path(cfg.run_root) / "eval/routing.json").read_text())}
    for task, images in _eval_images(cfg).items():
        labels, templates = demo_data.CLASS_NAMES[task], list(demo_data.TASK_TEMPLATES[task])
        offline = preds[(preds.task == task) & (preds.model == "ensemble-reference")].set_index("key")
        agree = online_right = offline_right = 0
        for key, image, label in images:
            r = client.post(
                "/",
                json=_request(image, labels, hypothesis_templates=templates, return_expert_weights=True),
            )
            assert r.status_code == 200, r.text
            body = r.json()
            scores = [p["score"] for p in body["predictions"]]
            assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-4)
            assert sorted(p["label"] for p in body["predictions"]) == sorted(labels)
            weights = [body["expert_weights"][f"expert-{e}"] for e in range(2)]
            np.testing.assert_allclose(weights, routing[(task, "reference")]["weights"], atol=1e-6)
            predicted = labels.index(body["predictions"][0]["label"])
            agree += predicted == offline.loc[key, "pred"]
            online_right += predicted == label
            offline_right += offline.loc[key, "pred"] == label
        assert agree >= len(images) - 1, task  # same images, same routing: the same answers (floats aside)
        assert online_right >= offline_right - 1, task


def test_hf_client_batch_route_and_single_models(served, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # The suite runs with HF_HUB_OFFLINE=1 (no downloads), which also blocks the client from calling our
    # own 127.0.0.1 endpoint; lift it for this client only.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cfg, url, client = served
    key, image, label = _eval_images(cfg)["color"][0]
    labels = list(demo_data.CLASS_NAMES["color"])
    hf = InferenceClient(model=url).zero_shot_image_classification(image, candidate_labels=labels)
    assert sorted(e.label for e in hf) == sorted(labels)
    single = client.post("/v1/zero-shot-image-classification", json=_request(image, labels)).json()
    assert [e.label for e in hf] == [e["label"] for e in single]
    batch_body = {"inputs": [_b64(image)] * 3, "parameters": {"candidate_labels": labels}}
    batch = client.post("/v1/zero-shot-image-classification/batch", json=batch_body)
    assert batch.status_code == 200 and len(batch.json()) == 3
    assert [e["label"] for e in batch.json()[2]] == [e["label"] for e in single]
    for model in ("expert-0", "expert-1", "generalist", "generalist-matched", "seed"):
        r = client.post("/", json=_request(image, labels, model=model, return_expert_weights=True))
        assert r.status_code == 200 and r.json()["model"] == model and r.json()["expert_weights"] is None
    calibrated = client.post("/", json=_request(image, labels, routing="calibrated", return_expert_weights=True))
    assert max(calibrated.json()["expert_weights"].values()) > 0.8


def test_health_experts_and_openapi(served):
    cfg, _, client = served
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/v1/experts").json()
    assert info["encoder_id"] == "minilm:all-MiniLM-L6-v2" and info["n_fine"] == 16
    experts = {e["id"]: e for e in info["experts"]}
    assert set(experts) == {"expert-0", "expert-1", "seed", "generalist", "generalist-matched"}
    prep = json.loads((Path(cfg.run_root) / "prep" / "summary.json").read_text())
    assert sum(experts[f"expert-{e}"]["cluster_size"] for e in (0, 1)) == prep["in_manifest"]
    assert experts["expert-0"]["checkpoint"].endswith("experts/expert-0/export")
    spec = client.get("/openapi.json").json()
    assert {"/", "/v1/zero-shot-image-classification", "/v1/zero-shot-image-classification/batch"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["ZeroShotParameters"]["properties"]
    assert {"candidate_labels", "hypothesis_template", "model", "routing", "return_expert_weights"} <= set(props)
    assert {"400", "408", "413", "422"} <= set(spec["paths"]["/"]["post"]["responses"])
    # The schema states the limits the server enforces (serve.max_labels=20 here) and the models it has.
    labels = props["candidate_labels"]
    assert (labels["minItems"], labels["maxItems"], labels["uniqueItems"]) == (2, 20, True)
    assert labels["items"]["maxLength"] == cfg.serve.max_label_chars and labels["items"]["pattern"]
    assert set(props["model"]["enum"]) == {"ensemble", *experts}
    batch = spec["components"]["schemas"]["BatchZeroShotRequest"]["properties"]["inputs"]
    assert batch["maxItems"] == cfg.serve.max_batch_images and batch["items"]["contentEncoding"] == "base64"


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 255).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_every_bad_input_gets_its_4xx(served):
    cfg, _, client = served
    _, image, _ = _eval_images(cfg)["shape"][0]
    labels = ["circle", "square"]
    cases = {
        "bad base64": (400, {"inputs": "%%%not base64%%%", "parameters": {"candidate_labels": labels}}),
        "not an image": (400, _request(b"just some text, not pixels", labels)),
        "one label": (422, _request(image, ["circle"])),
        "empty label": (422, _request(image, ["circle", "  "])),
        "too many labels": (422, _request(image, [f"class {i}" for i in range(21)])),
        "unknown model": (404, _request(image, labels, model="expert-7")),
        "no moe yet": (404, _request(image, labels, model="moe")),
        "bad routing": (422, _request(image, labels, routing="random")),
        "template without slot": (422, _request(image, labels, hypothesis_template="a photo")),
        "decompression bomb": (413, _request(_png(3000, 3000), labels)),
        "no parameters": (422, {"inputs": _b64(image)}),
    }
    for name, (status, body) in cases.items():
        r = client.post("/", json=body)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["error"], name
    assert client.post("/", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    # Oversized bodies are refused from their Content-Length, and when streamed without one.
    big = json.dumps(_request(b"x" * MAX_REQUEST_BYTES, labels)).encode()
    r = client.post("/", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    r = client.post("/", content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]))
    assert r.status_code == 413


def test_hostile_requests_are_refused_cheaply_and_others_still_answered(served):
    import socket
    from urllib.parse import urlparse

    cfg, url, client = served
    _, image, _ = _eval_images(cfg)["shape"][0]
    labels = ["circle", "square"]
    nested = b'{"inputs": "x", "parameters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = {
        "10,000 labels": (422, json.dumps(_request(image, [f"c{i}" for i in range(10_000)])).encode()),
        "a 1 MB label": (413, json.dumps(_request(image, ["circle", "x" * 1_000_000])).encode()),
        "a 200 kB label": (422, json.dumps(_request(image, ["circle", "x" * 200_000])).encode()),
        "deeply nested JSON": (400, nested),
        "a template as code": (200, json.dumps(_request(image, labels, hypothesis_template="{} {0.__class__} {x}"))),
    }
    for name, (status, body) in cases.items():
        start = time.perf_counter()
        r = client.post("/", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and (status == 200 or r.json()["error"]), (name, r.status_code, r.text[:200])
        assert time.perf_counter() - start < 10, name  # refused cheaply

    # A body that trickles in: a bounded wait (serve.body_timeout_s), then 408 — meanwhile others are answered.
    host, port = urlparse(url).hostname, urlparse(url).port
    with socket.create_connection((host, port), timeout=60) as slow:
        slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        assert client.post("/", json=_request(image, labels)).status_code == 200
        start = time.perf_counter()
        answer = slow.recv(4096)
        assert b" 408 " in answer.split(b"\r\n", 1)[0], answer[:200]
        assert time.perf_counter() - start <= cfg.serve.body_timeout_s + 5

    # Large images at once: each answered or refused, none lost, and the server still healthy.
    def noise_png(side: int) -> bytes:  # incompressible: ~3 bytes a pixel
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    bodies = [_request(noise_png(side), labels) for side in (200, 500) * 4]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda body: client.post("/", json=body).status_code, bodies))
    assert codes == [200, 413] * 4 and client.get("/health").status_code == 200, codes


def test_load_concurrent_clients_no_errors(served):
    cfg, url, _ = served
    images = [img for task in _eval_images(cfg).values() for _, img, _ in task[:2]]
    labels = list(demo_data.CLASS_NAMES["shape"])
    deadline = time.perf_counter() + 6.0
    latencies: list[float] = []
    errors: list[str] = []

    def client_loop(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            n = 0
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                r = c.post("/", json=_request(images[(i + n) % len(images)], labels))
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")
                n += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client_loop, range(8)))
    assert not errors, errors[:3]
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    print(f"\nload: 8 clients, {len(latencies)} requests in 6 s, p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    assert len(latencies) >= 8


def test_a_dead_expert_replica_is_replaced_and_requests_never_hang(served):
    import ray

    cfg, _, client = served
    _, image, _ = _eval_images(cfg)["shape"][0]
    body = _request(image, ["circle", "square", "star"])
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "model-expert-1" in a["name"]]
    assert names, "the expert-1 replica actor"
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    statuses = []
    deadline = time.perf_counter() + 90
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        r = client.post("/", json=body, timeout=40)
        assert time.perf_counter() - start < 40  # failed cleanly or answered; never hung
        assert r.status_code in (200, 503), r.text
        statuses.append(r.status_code)
        if r.status_code == 200 and 503 in statuses or len(statuses) > 3 and statuses[-3:] == [200] * 3:
            break
        time.sleep(0.5)
    assert statuses[-1] == 200, statuses  # Serve brought a new replica up


def test_single_layout_gives_the_same_answers(served):
    from ray import serve

    from mode_ray.serve.app import build_app

    cfg, url, client = served
    single = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"layout": "single"})})
    serve.run(build_app(single), name="single", route_prefix="/single")
    try:
        labels = list(demo_data.CLASS_NAMES["shape"])
        for _, image, _ in _eval_images(cfg)["shape"][:3]:
            body = _request(image, labels, return_expert_weights=True)
            a, b = client.post("/", json=body).json(), client.post("/single/", json=body).json()
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
            np.testing.assert_allclose([p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]])
        info = client.get("/single/v1/experts").json()
        assert info["layout"] == "single" and {e["id"] for e in info["experts"]} == {
            "expert-0",
            "expert-1",
            "generalist",
            "generalist-matched",
            "seed",
        }
    finally:
        serve.delete("single")


def test_expert_models_load_from_s3_run_roots(served, s3_endpoint):
    import s3fs

    from mode_ray.config import S3Config
    from mode_ray.serve.experts import ExpertModels

    cfg, _, _ = served
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    local = Path(cfg.run_root) / "experts" / "expert-0" / "export"
    remote = "mode-test/serve-run/experts/expert-0/export"
    for f in local.iterdir():
        fs.put(str(f), f"{remote}/{f.name}")
    s3 = S3Config(endpoint_url=s3_endpoint)
    _, image, _ = _eval_images(cfg)["shape"][0]
    labels, templates = ["circle", "square"], ["a {} shape."]
    from_s3 = ExpertModels({"expert-0": f"s3://{remote}"}, s3).logits(["expert-0"], [image], labels, templates)
    from_disk = ExpertModels({"expert-0": str(local)}).logits(["expert-0"], [image], labels, templates)
    np.testing.assert_allclose(from_s3["expert-0"]["logits"], from_disk["expert-0"]["logits"], atol=1e-6)


def test_serve_config_file_builds_the_app(served):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from mode_ray.serve.app import app_builder

    cfg, _, _ = served
    spec = yaml.safe_load((Path(__file__).parents[1] / "configs" / "serve.yaml").read_text())
    ServeDeploySchema.parse_obj(spec)  # what `serve deploy` checks
    app_spec = spec["applications"][0]
    assert app_spec["import_path"] == "mode_ray.serve.app:app_builder"
    config = Path(__file__).parents[1] / app_spec["args"]["config"]
    args = {"config": str(config), "overrides": [f"run_root={cfg.run_root}"]}
    assert app_builder(args) is not None
    with pytest.raises(ValueError, match="config"):
        app_builder({})
