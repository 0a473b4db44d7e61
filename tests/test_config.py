from __future__ import annotations

import copy
import os

import pytest

from mode_ray.config import ConfigError, load_config
from tests.conftest import REPO


def test_demo_and_cloud_configs_load():
    demo = load_config(REPO / "configs/demo.yaml")
    assert demo.run_root == os.path.abspath("runs/demo")  # local paths made absolute for Ray workers
    assert demo.data.shards == os.path.join(demo.run_root, "data/train")  # {run_root} expanded
    assert demo.data.demo is not None and demo.embedding.encoder == "minilm"
    cloud = load_config(REPO / "configs/cloud.yaml")
    assert cloud.run_root.startswith("s3://") and str(cloud.data.shards).startswith("s3://")
    assert cloud.embedding.encoder == "hf:princeton-nlp/sup-simcse-bert-base-uncased"
    assert (cloud.clustering.n_fine, cloud.clustering.n_coarse) == (1024, 4)
    assert cloud.training.betas == (0.9, 0.98) and cloud.training.model.startswith("ViT-B-16")
    # what the trimmed files leave to the defaults and the preset: the references' values
    assert (cloud.training.epochs, cloud.training.lr, cloud.training.warmup_steps) == (32, 5e-4, 2000)
    assert (cloud.moe.mcl_optim.lr, cloud.moe.mcl_optim.kind, cloud.moe.router_optim.lr) == (1e-5, "reference", 1e-6)
    assert (cloud.moe.router_optim.warmup_steps, cloud.moe.router_optim.grad_clip_norm) == (200, None)
    assert (demo.moe.mcl_optim.lr, demo.moe.mcl_optim.warmup_steps, demo.moe.router_optim.lr) == (2e-4, 8, 2e-3)
    assert demo.training.grad_clip_norm == 5.0 and demo.moe.mcl_optim.grad_clip_norm is None


# Keys a recipe file sets at their default on purpose, each commented there: what a user of the file sets.
SHOWN_DEFAULTS = {
    "own-data.yaml": {"data.shards", "data.caption_field", "eval.shards", "eval.tasks"},
    "cloud.yaml": {"embedding.dtype"},
}


@pytest.mark.parametrize("name", ["demo.yaml", "own-data.yaml", "cloud.yaml"])
def test_recipe_files_set_only_what_differs_from_the_defaults(name):
    """Each key a recipe file sets changes its loaded config (or is one it shows on purpose)."""
    import yaml

    from mode_ray.config import config_from_dict

    overrides = ["data.shards=/tmp/x", "eval.shards=/tmp/y"] if name == "own-data.yaml" else []
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    full = config_from_dict(raw, overrides)

    def leaves(node, where=()):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, (*where, key))
            else:
                yield (*where, key)

    def without(path):
        out = copy.deepcopy(raw)
        node = out
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return out

    def same(path):
        try:
            return config_from_dict(without(path), overrides) == full
        except ConfigError:
            return False

    at_default = {".".join(p) for p in leaves(raw) if same(p)}
    assert at_default == SHOWN_DEFAULTS.get(name, set())


def test_own_data_config_generates_nothing_and_needs_the_shards(tmp_path):
    with pytest.raises(ConfigError, match="data.shards: .*required"):
        load_config(REPO / "configs/own-data.yaml")
    own = load_config(REPO / "configs/own-data.yaml", [f"data.shards={tmp_path}", f"eval.shards={tmp_path}/held"])
    demo = load_config(REPO / "configs/demo.yaml")
    assert own.data.demo is None and not own.eval.demo_tasks
    assert own.training == demo.training and own.clustering == demo.clustering  # the demo's small budgets


def test_overrides_apply_with_yaml_types():
    cfg = load_config(
        REPO / "configs/demo.yaml",
        [
            "run_root=/tmp/x",
            "clustering.n_fine=8",
            "data.shards=[a.tar, b.tar]",
            "clustering.balanced=false",
            "ray.address=null",
        ],
    )
    assert cfg.run_root == "/tmp/x"
    assert cfg.eval.shards == "/tmp/x/data/eval"  # follows the new run root
    assert cfg.clustering.n_fine == 8 and cfg.clustering.balanced is False
    assert cfg.data.shards == [os.path.abspath("a.tar"), os.path.abspath("b.tar")]
    assert cfg.ray.address is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.no_such_key=1", "data.no_such_key"),
        ("nosection.key=1", "nosection"),
        ("training.lr=fast", "training.lr"),
        ("clustering.n_fine=1", "clustering.n_fine"),
        ("embedding.device=tpu", "embedding.device"),
        ("data.caption_field=title", "data.caption_field"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo.yaml", [override])
    assert named in str(err.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(REPO / "configs/demo.yaml", ["clustering.n_fine"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_root: x\n")
    with pytest.raises(ConfigError, match="data"):
        load_config(bad)
