"""Data-prep benchmark: each figure next to a baseline measured in the same run, as a ratio.

    python bench/prep.py [--samples 8000] [--k 64] [--iters 20] [--assign-n 200000] [--assign-k 1024]

(a) caption embedding: the Ray Data embed stage (read → validate → embed → write) vs a bare single-process
    loop over the same encoder and batch size (goal: ≥ 0.8×);
(b) fine clustering on one sample and iteration count: our balanced k-means vs plain faiss spherical k-means
    (goal: ≤ 3× its time) vs the reference's balanced k-means (PyPI `balanced-kmeans`, the
    kernelmachine/balanced-kmeans logic; goal: ≥ 50× faster), with max/mean cluster size (goal ≤ 1.1);
(c) assignment: the faiss inner-product kernel the assign actors run vs a bare numpy matmul + argmax of the
    same shapes (goal: within 1.5×), plus the Ray Data assign stage's end-to-end rate.
Install the reference with `pip install -e '.[bench]'`; without it (b) skips that column.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_embedding(cfg, captions: list[str], half_shards: list[str], half_captions: int) -> np.ndarray:
    import ray

    from mode_ray.encoders import build_encoder
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.stages.prep import embed_stage, load_cluster_sample

    emb = cfg.embedding
    encoder, load_s = timed(build_encoder, emb.encoder, emb.device, emb.dtype, emb.batch_size)
    encoder.encode(captions[: emb.batch_size])  # warm-up
    _, bare_s = timed(encoder.encode, captions)
    bare_rate = len(captions) / bare_s

    ray.init(num_cpus=2, object_store_memory=512 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        # The stage on half the shards and on all of them: the difference cancels the fixed costs
        # (actor start-up and model load, listing, the rejects pass) and leaves the streaming rate.
        # A first pass on one shard warms Ray's worker processes, so neither timed pass pays for it.
        warm = cfg.model_copy(deep=True)
        warm.run_root, warm.data.shards = f"{cfg.run_root}-warm", half_shards[:1]
        embed_stage(warm, RunPaths(warm.run_root), True)
        half = cfg.model_copy(deep=True)
        half.run_root, half.data.shards = f"{cfg.run_root}-half", half_shards
        _, half_s = timed(embed_stage, half, RunPaths(half.run_root), True)
        paths = RunPaths(cfg.run_root)
        _, pipe_s = timed(embed_stage, cfg, paths, True)
        pipe_rate = len(captions) / pipe_s
        marginal_rate = (len(captions) - half_captions) / max(pipe_s - half_s, 1e-9)
        print("\n(a) caption embedding, captions/s")
        print(
            f"  bare single-process loop          {bare_rate:6.0f}   (batch {emb.batch_size}, {bare_s:.1f}s, "
            f"model load {load_s:.1f}s not counted)"
        )
        print(
            f"  Ray Data embed stage, end to end  {pipe_rate:6.0f}   ({pipe_s:.1f}s: start-up, read, validate, "
            "embed, write, rejects)"
        )
        print(f"  Ray Data embed stage, streaming   {marginal_rate:6.0f}   (all shards minus half the shards)")
        print(
            f"  ratio pipeline / bare: {marginal_rate / bare_rate:.2f}x streaming (goal >= 0.80), "
            f"{pipe_rate / bare_rate:.2f}x end to end at {len(captions)} captions"
        )
        cfg_all = cfg.model_copy(deep=True)
        cfg_all.clustering.sample_fraction = 1.0
        sample = load_cluster_sample(cfg_all, paths)
    finally:
        ray.shutdown()
    return sample


def bench_kmeans(x: np.ndarray, k: int, iters: int) -> None:
    from mode_ray import kmeans

    balanced, bal_s = timed(kmeans.spherical_kmeans, x, k, iterations=iters, tol=0.0, balanced=True)
    plain, plain_s = timed(kmeans.spherical_kmeans, x, k, iterations=iters, tol=0.0, balanced=False)

    def ratio(res) -> float:
        return float(res.sizes.max() / res.sizes.mean())

    print(f"\n(b) fine clustering: {len(x)} x {x.shape[1]} into {k} clusters, {iters} iterations")
    print(f"  ours, balanced         {bal_s:7.2f}s   max/mean size {ratio(balanced):.3f}", end="")
    print(f"   objective {balanced.objective:.4f}")
    print(
        f"  faiss spherical, plain {plain_s:7.2f}s   max/mean size {ratio(plain):.3f}   objective {plain.objective:.4f}"
    )
    print(f"  ratio ours / plain faiss: {bal_s / plain_s:.2f}x time (goal <= 3)")
    try:
        import torch
        from balanced_kmeans import kmeans_equal
    except ImportError:
        print("  reference balanced-kmeans not installed (pip install -e '.[bench]'): skipped")
        return
    # The package needs a batch dimension >= 2 (its squeeze() breaks batch 1): two copies of the same
    # problem run together, and half that time is reported per problem.
    xt = torch.from_numpy(x).unsqueeze(0).repeat(2, 1, 1)
    (ids, _), ref_s = timed(kmeans_equal, xt, num_clusters=k, cluster_size=len(x) // k, max_iters=iters, tol=0.0)
    ref_s /= 2
    sizes = torch.bincount(ids[0], minlength=k).numpy()
    print(f"  reference balanced-kmeans {ref_s:7.2f}s   max/mean size {sizes.max() / sizes.mean():.3f}")
    print(f"  ratio reference / ours: {ref_s / bal_s:.1f}x faster (goal >= 50)")


def bench_assignment(n: int, k: int, d: int = 384, repeats: int = 3) -> None:
    from mode_ray import kmeans

    rng = np.random.default_rng(0)
    x = kmeans.l2_normalize(rng.normal(size=(n, d)).astype(np.float32))
    cents = kmeans.l2_normalize(rng.normal(size=(k, d)).astype(np.float32))
    index = kmeans.ip_index(cents)

    def numpy_assign():
        sims = x @ cents.T
        return sims.argmax(axis=1)

    def faiss_assign():
        return index.search(x, 1)[1][:, 0]

    np.testing.assert_array_equal(numpy_assign(), faiss_assign())
    np_s = min(timed(numpy_assign)[1] for _ in range(repeats))
    fa_s = min(timed(faiss_assign)[1] for _ in range(repeats))
    print(f"\n(c) assignment kernel: {n} x {d} against {k} centroids (best of {repeats})")
    print(f"  numpy matmul + argmax  {n / np_s:10.0f} rows/s")
    print(f"  faiss IndexFlatIP      {n / fa_s:10.0f} rows/s")
    print(f"  ratio faiss / numpy time: {fa_s / np_s:.2f}x (goal <= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--kmeans-n", type=int, default=8192)
    parser.add_argument("--assign-n", type=int, default=200_000)
    parser.add_argument("--assign-k", type=int, default=1024)
    args = parser.parse_args()

    from pathlib import Path

    from mode_ray.config import load_config
    from mode_ray.demo import demo_data
    from mode_ray.samples.shards import iter_tar_rows

    with tempfile.TemporaryDirectory() as tmp:
        shards = f"{tmp}/shards"
        demo_data.generate(shards, samples=args.samples, shards=8, seed=0)
        captions: list[str] = []
        tars = sorted(str(p) for p in Path(shards).rglob("*.tar"))
        half_shards, half_captions = tars[: len(tars) // 2], 0
        for tar in tars:
            with open(tar, "rb") as f:
                captions += [json.loads(r["json"])["caption"] for r in iter_tar_rows(f, tar)]
            if tar in half_shards:
                half_captions = len(captions)
        repo = Path(__file__).resolve().parents[1]
        cfg = load_config(
            repo / "configs/demo.yaml", [f"run_root={tmp}/run", f"data.shards={shards}", "data.demo=null"]
        )
        sample = bench_embedding(cfg, captions, half_shards, half_captions)
    reps = -(-args.kmeans_n // len(sample))
    x = np.concatenate([sample] * reps)[: args.kmeans_n]
    x = x + 0.01 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)  # break exact duplicates
    bench_kmeans(x.astype(np.float32), args.k, args.iters)
    bench_assignment(args.assign_n, args.assign_k)


if __name__ == "__main__":
    main()
