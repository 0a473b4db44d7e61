"""open_clip model configs shipped with mode_ray, registered so stock open_clip finds them by name."""

from __future__ import annotations

from functools import cache
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


@cache
def register_model_configs() -> None:
    """Make the bundled configs (e.g. `mode-tiny`) visible to `open_clip.create_model`."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
