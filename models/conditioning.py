"""The pieces that bring a pretrained speaker embedding (``model.speaker_embedding``,
models/ge2e.py) into every family's conditioning.

- ``SpeakerReference``: what ``encode_reference`` returns in the spectral families (hifi_tse,
  semamba): the reference's frames, which USEF and the re-injection layers attend to, and its
  speaker embedding (None without one).
- ``EmbeddingFiLM``: a per-channel scale and shift from an embedding vector, starting as the
  identity. hifi_tse and semamba apply it at every re-injection layer (an AdaLN-style
  reminder of the speaker in front of the deep blocks); their FiLM layer adds the embedding to
  its pooled speaker vector.
- ``pool_references`` / ``encode_references``: several references of one speaker as one
  (``inference.py --ref a.wav --ref b.wav``, evaluate.py's extra references).
- ``EmbeddingFusion``: the vector families (td_speakerbeam, spex_plus) combine it with their own
  reference embedding: added after a projection (TD-SpeakerBeam, before its multiplicative
  adaptation) or concatenated (SpEx+, whose TCN stacks take the wider vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from models.ge2e import EMBEDDING_DIM, GE2EEncoder, speaker_encoder

__all__ = ["EMBEDDING_DIM", "EmbeddingFiLM", "EmbeddingFusion", "EncodedReference",
           "GE2EEncoder", "SpeakerReference", "encode_references", "pool_references",
           "speaker_encoder"]


class SpeakerReference(NamedTuple):
    """A reference encoded once (``encode_reference``) for any number of mixture windows."""

    frames: torch.Tensor  # (B, S, K, D): the family's own encoding of the reference
    embedding: torch.Tensor | None  # (B, EMBEDDING_DIM) unit-norm, or None


# What any family's ``encode_reference`` returns: a vector (td_speakerbeam, spex_plus) or a
# ``SpeakerReference`` (hifi_tse, semamba); callers only pass it on to ``extract``.
EncodedReference = torch.Tensor | SpeakerReference


class EmbeddingFiLM(nn.Module):
    """``x * (1 + scale(e)) + shift(e)`` per channel; zero-initialised, so it starts as the
    identity and can only add conditioning.

    Shape:
        x (B, T, K, D), e (B, E) -> (B, T, K, D)
    """

    def __init__(self, *, embedding_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embedding_dim, 2 * feature_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(e.to(x.dtype)).chunk(2, dim=-1)  # (B, D) each
        return x * (1 + scale[:, None, None]) + shift[:, None, None]


class EmbeddingFusion(nn.Module):
    """A family's own reference vector combined with the pretrained embedding.

    ``mode="add"``: ``own + W e`` (same width as ``own``); ``mode="concat"``: ``[own, e]``
    (``own_dim + E`` wide, no parameters).

    Shape:
        own (B, C), e (B, E) -> (B, C) or (B, C + E)
    """

    def __init__(self, *, own_dim: int, mode: str, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        if mode not in ("add", "concat"):
            raise ValueError(f"fusion mode must be add or concat, got {mode!r}")
        self.mode = mode
        self.proj = nn.Linear(embedding_dim, own_dim) if mode == "add" else None
        self.out_dim = own_dim + (embedding_dim if mode == "concat" else 0)

    def forward(self, own: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return own + self.proj(e.to(own.dtype))
        return torch.cat([own, e.to(own.dtype)], dim=-1)


def pool_references(encoded: Sequence[EncodedReference]) -> EncodedReference:
    """Several references of one speaker, each encoded alone (``encode_reference``), as one.

    A vector (td_speakerbeam, spex_plus) is averaged. A ``SpeakerReference`` has its frames
    concatenated along time, so that USEF and the re-injection layers attend to every
    reference and FiLM pools its statistics over all of them, and its pretrained embeddings
    averaged and L2-normalised (Resemblyzer's ``embed_speaker``). Copies of one reference pool
    to that reference: the same output, up to float rounding.

    Shape:
        R references of batch B -> one of batch B (frames: (B, sum S_r, K, D))
    """
    if not encoded:
        raise ValueError("no references to pool")
    if len(encoded) == 1:
        return encoded[0]
    if isinstance(encoded[0], SpeakerReference):
        frames = torch.cat([r.frames for r in encoded], dim=1)
        if encoded[0].embedding is None:
            return SpeakerReference(frames, None)
        mean = torch.stack([r.embedding for r in encoded]).mean(0)
        return SpeakerReference(frames, mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.stack(list(encoded)).mean(0)


def encode_references(model: nn.Module, refs: torch.Tensor) -> EncodedReference:
    """Any family's encoding of R references per item, pooled (``pool_references``).

    Shape:
        refs (B, R, M) -> an encoded reference of batch B
    """
    return pool_references([model.encode_reference(refs[:, r]) for r in range(refs.shape[1])])
