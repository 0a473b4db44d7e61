"""Import open_clip without the optional tower libraries a process's model does not use.

Importing open_clip imports transformers (for Hugging Face text towers) and timm (for timm image towers)
whenever they are installed: ~2.3 s of a core of its ~4.5 s on the 2-core machine, paid again by every fresh
Ray worker process that builds a model — each training job's workers, at every trial. open_clip itself treats
both as optional (`try: import … except ImportError`) and has no lazy mode, so a process that will only ever
build one known model without such towers imports open_clip with the two hidden from the import system for
that moment: open_clip then takes them as absent, as on an install without them, and they import normally
afterwards (sentence-transformers, a tokenizer that needs them). Only for processes that build that one model
for their whole life (a training job's workers): open_clip, once imported, cannot build those towers there.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
TOWER_LIBRARIES = {"transformers": ("text_cfg", "hf_model_name"), "timm": ("vision_cfg", "timm_model_name")}


def _config_file(model_name: str) -> Path | None:
    """The model's config file, ours or open_clip's bundled one, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    folders = [CONFIG_DIR] + [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])]
    return next((f for d in folders if (f := d / f"{model_name}.json").is_file()), None)


def unused_tower_libraries(model_name: str) -> list[str]:
    """The tower libraries `model_name`'s config does not use; [] where the config cannot be read here."""
    path = _config_file(model_name)
    if path is None:
        return []
    config = json.loads(path.read_text())
    return [lib for lib, (tower, key) in TOWER_LIBRARIES.items() if not config.get(tower, {}).get(key)]


def import_open_clip_for(model_name: str) -> None:
    """Import open_clip for a process that only builds `model_name` (see the module's docstring)."""
    if "open_clip" in sys.modules:
        return
    hidden = [lib for lib in unused_tower_libraries(model_name) if lib not in sys.modules]
    for lib in hidden:
        sys.modules[lib] = None  # type: ignore[assignment]  # `import lib` now raises ImportError
    try:
        import open_clip  # noqa: F401
    finally:
        for lib in hidden:
            del sys.modules[lib]
