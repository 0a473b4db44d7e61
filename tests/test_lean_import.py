"""open_clip imported for one model without the tower libraries that model does not use (a training worker's
import): what is hidden, that the model still builds, and that the libraries import normally afterwards; and
TorchDynamo deferred until torchvision's one helper from it is called, which then gets the real answers; and
scikit-learn deferred while sentence-transformers imports, the same way."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mode_ray.models.lean_import import named_config, unused_tower_libraries

LEAN_IMPORT = """
import sys
from mode_ray.models.lean_import import import_open_clip_for
import_open_clip_for("mode-tiny")
import open_clip.hf_model, open_clip.timm_model
assert open_clip.hf_model.transformers is None and open_clip.timm_model.timm is None
assert "transformers" not in sys.modules and "timm" not in sys.modules
from mode_ray.models.clip import build_clip
model = build_clip("mode-tiny")[0]
assert sum(p.numel() for p in model.parameters()) > 0
assert "torch._dynamo" not in sys.modules  # deferred: torchvision's helper from it imports it when called
import transformers, timm  # after the import, both load as usual (sentence-transformers, HF tokenizers)
import torch, torchvision.ops
assert torchvision.ops.roi_align(torch.ones(1, 1, 4, 4), torch.tensor([[0, 0, 0, 2, 2.0]]), (1, 1)).item() == 1.0
roi = sys.modules["torchvision.ops.roi_align"]
assert roi.is_compile_supported("cpu") is True and roi.is_compile_supported("meta") is False  # the real answers
assert sys.modules["torch._dynamo.utils"].__file__.endswith("utils.py")  # and now the real module is loaded
print("ok")
"""
WHOLE_IMPORT = """
import sys
from mode_ray.models.lean_import import import_open_clip_without
import_open_clip_without([])  # whole: its tower libraries import TorchDynamo after torchvision, the real one
import torch
assert sys.modules["torch._dynamo.utils"].__file__.endswith("utils.py")
layer = torch.nn.Linear(2, 2)
optimizer = torch.optim.AdamW(layer.parameters())
layer(torch.ones(1, 2)).sum().backward()
optimizer.step()
print("ok")
"""
CAPTION_ENCODER = """
import sys
from mode_ray.encoders import build_encoder
encoder = build_encoder("minilm", device="cpu")
assert "sklearn" not in sys.modules  # deferred: sentence-transformers' one function from it imports it when called
first = encoder.encode(["a red star", "two green circles"])
assert first.shape == (2, encoder.dim)
import torch
from sentence_transformers.util import manhattan_sim
sparse = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).to_sparse()
assert manhattan_sim(sparse, sparse).tolist() == [[0.0, -3.0], [-3.0, 0.0]]  # through scikit-learn, the real one
assert sys.modules["sklearn.metrics"].__file__.endswith("__init__.py")
import numpy as np
np.testing.assert_array_equal(encoder.encode(["a red star", "two green circles"]), first)
print("ok")
"""
INPUT_SPEC = """
import sys
from mode_ray.train.inputs import input_spec
names = ("mode-tiny", "ViT-B-32", "ViT-SO400M-14-SigLIP", "convnext_base", "RN50")
specs = {name: input_spec(name) for name in names}
assert "open_clip" not in sys.modules and "torch" not in sys.modules, "imported"
from open_clip.transform import PreprocessCfg
from mode_ray.models.clip import model_config
for name, spec in specs.items():
    cfg = model_config(name)
    pre = PreprocessCfg(**cfg.get("preprocess_cfg", {}))
    assert (spec.mean, spec.std) == (tuple(pre.mean), tuple(pre.std)), name
    side = cfg["vision_cfg"]["image_size"]
    assert spec.size == (side if isinstance(side, int) else side[0]), name
    assert spec.context_length == cfg["text_cfg"]["context_length"], name
print("ok")
"""
TOKENIZER = """
from mode_ray.train.inputs import input_spec
from mode_ray.train.transforms import tokenize
assert tokenize(["a red circle"], "mode-tiny").shape == (1, input_spec("mode-tiny").context_length) == (1, 32)
print("ok")
"""
# The modules whose functions Ray Data's tasks run (a task worker imports a function's module): prep's row
# filters and validation, eval's rows, the training reads.
TASK_MODULES = """
import sys
import mode_ray.samples.rejects, mode_ray.samples.validate, mode_ray.eval.rows, mode_ray.data.train_data
heavy = sorted(m for m in ("torch", "faiss", "open_clip", "sentence_transformers") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""


@pytest.fixture(scope="module")
def fresh_processes() -> dict[str, subprocess.Popen]:
    """Each script in a new interpreter of its own (nothing imported yet, as a Ray worker starts), all started
    at once: each is mostly imports, one core's worth, so side by side they take the time of about one. Each
    prints "ok" when done."""
    scripts = {"lean_import": LEAN_IMPORT, "whole_import": WHOLE_IMPORT, "input_spec": INPUT_SPEC,
               "tokenizer": TOKENIZER, "tasks": TASK_MODULES, "caption_encoder": CAPTION_ENCODER}  # fmt: skip
    procs = {name: subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, script in scripts.items()}  # fmt: skip
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.communicate()


def _passed(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip() == "ok", err[-2000:]


def unused(*names: str) -> list[str]:
    return unused_tower_libraries(named_config(n) for n in names)


def test_only_the_towers_no_config_names_are_left_out() -> None:
    assert unused("mode-tiny") == ["transformers", "timm"]  # ours: open_clip's own towers
    assert unused("roberta-ViT-B-32") == ["timm"]  # open_clip's bundled HF text tower
    assert unused("convnext_base") == ["transformers"]  # a timm image tower
    assert unused("mode-tiny", "convnext_base") == ["transformers"]  # an actor for both: what neither uses
    assert unused("no-such-model") == [] == unused("mode-tiny", "no-such-model")  # unknown: imported whole


def test_a_lean_import_builds_the_model_and_leaves_the_libraries_importable(fresh_processes) -> None:
    _passed(fresh_processes["lean_import"])


def test_a_whole_import_leaves_torchdynamo_whole(fresh_processes) -> None:
    """open_clip imported with its tower libraries (a model that uses one, an export that cannot be read):
    they import TorchDynamo after torchvision, and it is the real one throughout (an optimizer steps)."""
    _passed(fresh_processes["whole_import"])


def test_the_caption_encoder_imports_without_scikit_learn_which_loads_when_called(fresh_processes) -> None:
    """The MiniLM caption encoder (every prep's embedding actor, every router) imports sentence-transformers
    without scikit-learn; the one function of it that sentence-transformers uses then calls the real one."""
    _passed(fresh_processes["caption_encoder"])


def test_an_exports_config_is_read_from_the_export(tmp_path) -> None:
    from mode_ray.models.clip import build_clip, export_open_clip, model_config
    from mode_ray.models.lean_import import export_config

    export_open_clip(build_clip("mode-tiny")[0], "mode-tiny", str(tmp_path / "export"))
    assert export_config(str(tmp_path / "export")) == model_config("mode-tiny")
    assert export_config(str(tmp_path / "nowhere")) is None  # unreadable: open_clip imported whole


def test_a_models_input_spec_is_open_clips_preprocessing_read_without_importing_it(fresh_processes) -> None:
    """What an MCL stage's driver task needs to size its rows, without the ~4.5 s import of open_clip (and
    torch) on the MoE chain's critical path; equal to open_clip's own `PreprocessCfg` for every kind of config."""
    _passed(fresh_processes["input_spec"])


def test_our_models_tokenizer_has_its_configs_context_length(fresh_processes) -> None:
    """In a fresh process (a read task's), the tokenizer of one of our configs pads to that config's context,
    not open_clip's default 77 for a name it does not know."""
    _passed(fresh_processes["tokenizer"])


def test_ray_datas_task_functions_import_without_torch(fresh_processes) -> None:
    """A Ray Data task worker that filters prep's rows, reads eval's images or a trial's rows never imports
    torch, faiss or open_clip (~3-4 core-s a worker process on 2 cores): those functions live in light modules."""
    _passed(fresh_processes["tasks"])
