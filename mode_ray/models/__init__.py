"""Model definitions (plain torch/open_clip; nothing here knows about Ray)."""
