"""Import open_clip without the optional tower libraries a process's models do not use.

Importing open_clip imports transformers (for Hugging Face text towers) and timm (for timm image towers)
whenever they are installed: ~2.3 s of a core of its ~4.5 s on the 2-core machine, paid again by every fresh
Ray process that builds a model — each training job's workers at every trial, the evaluation's and the MCL
stages' embedding actors, Serve's expert replicas. open_clip itself treats both as optional (`try: import …
except ImportError`) and has no lazy mode, so a process that will only ever build models it knows beforehand,
none with such towers, imports open_clip with the two hidden from the import system for that moment: open_clip
then takes them as absent, as on an install without them, and they import normally afterwards
(sentence-transformers, a tokenizer that needs them). Only for processes that live for those models (actors,
a training job's workers), never for pooled task workers: once imported, open_clip cannot build those
towers in that process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from mode_ray.config import S3Config
from mode_ray.models.clip import CONFIG_DIR

TOWER_LIBRARIES = {"transformers": ("text_cfg", "hf_model_name"), "timm": ("vision_cfg", "timm_model_name")}


def _open_clip_folders() -> list[Path]:
    """open_clip's package folder, found without importing it (`find_spec` of a top-level name imports nothing)."""
    spec = importlib.util.find_spec("open_clip")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def named_config(model_name: str) -> dict[str, Any] | None:
    """A model's config file, ours or open_clip's bundled one, read without importing open_clip."""
    folders = [CONFIG_DIR] + [p / "model_configs" for p in _open_clip_folders()]
    path = next((f for d in folders if (f := d / f"{model_name}.json").is_file()), None)
    return json.loads(path.read_text()) if path else None


@cache
def open_clip_constants() -> dict[str, Any]:
    """open_clip's `constants.py` (the default normalisation of its `PreprocessCfg`), run alone: importing
    `open_clip.constants` would run the package's `__init__` — torch, torchvision and every model, ~4.5 s of a
    core — in a process that only needs two tuples (an MCL stage's driver task, a trial's driver)."""
    path = next(f for d in _open_clip_folders() if (f := d / "constants.py").is_file())
    module_spec = importlib.util.spec_from_file_location("_open_clip_constants", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return {name: value for name, value in vars(module).items() if name.isupper()}


def export_config(url: str, s3: S3Config | None = None) -> dict[str, Any] | None:
    """An export's open_clip model config (a CLIP-MoE's: its base's); None where it cannot be read."""
    from mode_ray.models.clip import export_info
    from mode_ray.models.moe import MOE_CONFIG_FILE
    from mode_ray.run_root.storage import exists, join, read_bytes

    try:
        if exists(join(url, MOE_CONFIG_FILE), s3):
            return json.loads(read_bytes(join(url, MOE_CONFIG_FILE), s3))["open_clip_config"]
        return export_info(url, s3)[1]
    except (OSError, ValueError, KeyError):  # the load itself will say what is wrong
        return None


def unused_tower_libraries(configs: Iterable[dict[str, Any] | None]) -> list[str]:
    """The tower libraries none of `configs` uses; [] if one of them is unknown (None)."""
    configs = list(configs)
    if any(c is None for c in configs):
        return []
    used = {lib for c in configs for lib, (tower, key) in TOWER_LIBRARIES.items() if c.get(tower, {}).get(key)}
    return [lib for lib in TOWER_LIBRARIES if lib not in used]


# torchvision imports all of TorchDynamo (`torch._dynamo`, ~1.4 s of a core of open_clip's lean ~2 s) for a helper
# of `torch._dynamo.utils` that it calls only when its ops run under torch.compile (`torchvision.ops.roi_align`'s
# `is_compile_supported`); open_clip imports torchvision. While torchvision imports, that module is a stand-in whose
# functions import the real one when first called, so nothing behaves otherwise; TorchDynamo loads as usual when
# something uses it (torch.compile; a torch optimizer's constructor, so a training worker still pays it). What it
# saves is in the processes that only infer: the evaluation's and an MCL stage's embedders, Serve's replicas
# (an evaluation 18.5 → 16.0 s, 7.4 → 6.1 s warm). torch has no switch for this; torch itself imports it lazily.
DEFERRED_MODULE = "torch._dynamo.utils"


def _deferred_module(name: str) -> types.ModuleType:
    """A stand-in for module `name`: every attribute taken from it is a function calling the real one's."""
    stand_in = types.ModuleType(name)

    def __getattr__(attribute: str) -> Any:  # PEP 562: `from name import attribute` asks here
        if attribute.startswith("__"):  # a module's own attributes (`__file__`: inspect walks sys.modules)
            raise AttributeError(attribute)

        def call_real(*args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(name), attribute)(*args, **kwargs)

        return call_real

    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]
    return stand_in


def import_open_clip_without(libraries: list[str]) -> None:
    """Import open_clip with `libraries` hidden while it imports (see the module's docstring), and torchvision
    before it without TorchDynamo."""
    if "open_clip" in sys.modules:
        return
    import_torchvision_without_dynamo()
    hidden = [lib for lib in libraries if lib not in sys.modules]
    for lib in hidden:
        sys.modules[lib] = None  # type: ignore[assignment]  # `import lib` now raises ImportError
    try:
        import open_clip  # noqa: F401
    finally:
        for lib in hidden:
            del sys.modules[lib]


@contextmanager
def deferred(name: str) -> Iterator[None]:
    """Module `name` is a stand-in (`_deferred_module`) for the block's imports, unless it is loaded already.
    Only for the block: a library imported after it that imports `name`'s package for real must then find the
    real module."""
    if name in sys.modules:
        yield
        return
    stand_in = sys.modules[name] = _deferred_module(name)
    try:
        yield
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]


def import_torchvision_without_dynamo() -> None:
    """Import torchvision with TorchDynamo deferred (see above). The stand-in is in place for torchvision's own
    import only: a tower library imported after it (transformers, timm) may import the real TorchDynamo, whose
    modules must then find the real `utils`."""
    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules:
        return
    with deferred(DEFERRED_MODULE):
        import torchvision  # noqa: F401


def import_open_clip_for(model_name: str) -> None:
    """For a process that builds only `model_name` (a training job's workers)."""
    import_open_clip_without(unused_tower_libraries([named_config(model_name)]))


def import_open_clip_for_exports(urls: Iterable[str], s3: S3Config | None = None) -> None:
    """For an actor that loads only these exports (evaluation, an MCL stage's embedder, Serve's experts)."""
    if "open_clip" not in sys.modules:
        import_open_clip_without(unused_tower_libraries(export_config(u, s3) for u in urls))
