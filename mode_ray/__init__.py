"""mode_ray: CLIP data experts (MoDE) and CLIP mixtures of experts (CLIP-MoE) on Ray."""

__version__ = "0.1.0"
