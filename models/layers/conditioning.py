"""How a reference conditions the families: the spectral families' shared path (USEF, FiLM,
re-injection) and the pieces that bring a pretrained speaker embedding
(``model.speaker_embedding``, models/layers/ge2e.py) into every family's conditioning.

- ``ReferenceConditioned``: the base of hifi_tse and semamba: USEF cross-attention and FiLM
  where the mixture enters the blocks, ``SpeakerReinjectLayer`` in front of chosen blocks.

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
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers.ge2e import EMBEDDING_DIM, GE2EEncoder, speaker_encoder
from models.layers.usef import FiLMLayer, FrameAttention, USEFCrossAttention

__all__ = ["EMBEDDING_DIM", "EmbeddingFiLM", "EmbeddingFusion", "EncodedReference",
           "GE2EEncoder", "ReferenceConditioned", "SpeakerReference", "SpeakerReinjectLayer",
           "encode_references", "pool_references", "speaker_encoder"]


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


class SpeakerReinjectLayer(nn.Module):
    """Cross-attention from the current mixture stream to the reference embedding, added as a
    residual, so that deep blocks are reminded which speaker to keep. With ``embedding_dim`` > 0
    a pretrained speaker embedding then scales and shifts the stream (``EmbeddingFiLM``).

    Shape:
        x (B, T, K, D), z_ref (B, S, K, D), embedding (B, E) -> (B, T, K, D)
    """

    def __init__(
        self, *, feature_dim: int, n_heads: int, qk_per_band: int, embedding_dim: int = 0
    ) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(feature_dim)
        self.norm_ref = nn.LayerNorm(feature_dim)
        self.attn = FrameAttention(
            feature_dim=feature_dim, n_heads=n_heads, qk_per_band=qk_per_band
        )
        self.film = (EmbeddingFiLM(embedding_dim=embedding_dim, feature_dim=feature_dim)
                     if embedding_dim else None)

    def reference_keys_values(self, z_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's keys and values, which a stream computes once."""
        return self.attn.keys_values(self.norm_ref(z_ref))

    def reinjected(
        self, x: torch.Tensor, ref_kv: tuple[torch.Tensor, torch.Tensor],
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn.attend(self.norm_x(x), *ref_kv)
        return x if self.film is None else self.film(x, embedding)

    def forward(
        self, x: torch.Tensor, z_ref: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.reinjected(x, self.reference_keys_values(z_ref), embedding)


class ReferenceConditioned(nn.Module):
    """Base of the spectral families that attend to the reference's frames (hifi_tse, semamba):
    USEF cross-attention and FiLM where the mixture enters the blocks, a re-injection layer in
    front of chosen blocks, and the pretrained speaker embedding beside the frames.

    A subclass calls ``_build_entry`` where it wants these layers registered, then, after its
    ``blocks`` (an ``nn.ModuleList`` of grid blocks), ``_build_reinjection``; the registration
    order stays that of the parameters in checkpoints and optimizer states written before this
    class existed. It keeps a runtime ``grad_checkpoint`` flag (models/registry.py).
    """

    blocks: nn.ModuleList
    grad_checkpoint: bool

    def _build_entry(
        self, *, feature_dim: int, attn: dict[str, int], use_film: bool,
        speaker_embedding: str, sample_rate: int,
    ) -> dict[str, int]:
        """USEF, the pretrained encoder and FiLM; returns the re-injection layers' keywords."""
        self.usef = USEFCrossAttention(**attn)
        self.pretrained_encoder = speaker_encoder(speaker_embedding, sample_rate)
        emb = {"embedding_dim": EMBEDDING_DIM if self.pretrained_encoder is not None else 0}
        self.film = FiLMLayer(feature_dim=feature_dim, **emb) if use_film else None
        return {**attn, **emb}

    def _build_reinjection(self, reinject_at: list[int], reinject: dict[str, int]) -> None:
        """A ``SpeakerReinjectLayer`` in front of each block in ``reinject_at``."""
        n_blocks = len(self.blocks)
        if any(not 0 <= i < n_blocks for i in reinject_at):
            raise ValueError(f"reinject_at {reinject_at} names a block outside 0..{n_blocks - 1}")
        self.reinject = nn.ModuleDict(
            {str(i): SpeakerReinjectLayer(**reinject) for i in sorted(set(reinject_at))}
        )

    def speaker_reference(self, frames: torch.Tensor, ref: torch.Tensor) -> SpeakerReference:
        """The reference's own ``frames`` with its pretrained embedding (if the model has one).

        Shape: frames (B, S, K, D), ref (B, M) -> SpeakerReference
        """
        embedding = None if self.pretrained_encoder is None else self.pretrained_encoder(ref)
        return SpeakerReference(frames, embedding)

    def _block(
        self, i: int, z: torch.Tensor, frames: torch.Tensor, embedding: torch.Tensor | None
    ) -> torch.Tensor:
        if str(i) in self.reinject:
            z = self.reinject[str(i)](z, frames, embedding)
        return self.blocks[i](z)

    def _enter(self, z: torch.Tensor, z_ref: SpeakerReference) -> torch.Tensor:
        """USEF and FiLM where the mixture's features enter the blocks (frame by frame)."""
        z = self.usef(z, z_ref.frames)
        return z if self.film is None else self.film(z, z_ref.frames, z_ref.embedding)

    def conditioned_blocks(self, z: torch.Tensor, z_ref: SpeakerReference) -> torch.Tensor:
        """USEF and FiLM on the mixture's features, then every block with its re-injection;
        each block recomputed in backward under ``grad_checkpoint`` while training.

        Shape: z (B, T, K, D), z_ref frames (B, S, K, D) -> (B, T, K, D)
        """
        frames, embedding = z_ref
        z = self._enter(z, z_ref)
        use_ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i in range(len(self.blocks)):
            if use_ckpt:
                z = checkpoint(self._block, i, z, frames, embedding, use_reentrant=False)
            else:
                z = self._block(i, z, frames, embedding)
        return z

    def reference_cache(self, z_ref: SpeakerReference) -> dict[str, Any]:
        """What the conditioning computes from the reference alone (USEF's and every
        re-injection layer's keys and values, FiLM's scale and shift): a stream computes it once
        instead of at every hop."""
        frames, embedding = z_ref
        return {"usef": self.usef.reference_keys_values(frames),
                "film": None if self.film is None else self.film.scale_shift(frames, embedding),
                "reinject": {i: layer.reference_keys_values(frames)
                             for i, layer in self.reinject.items()}}

    def conditioned_blocks_step(
        self, z: torch.Tensor, z_ref: SpeakerReference, cache: dict[str, Any],
        states: list[Any] | None,
    ) -> tuple[torch.Tensor, list[Any]]:
        """``conditioned_blocks`` on the next frames of a stream, with the reference's
        ``reference_cache``, each (causal) block from its state after the frames before (None
        at the start); returns the new states.

        Shape: z (B, t, K, D) -> (B, t, K, D), one state per block
        """
        z = self.usef.fused(z, cache["usef"])
        if self.film is not None:
            z = self.film.modulate(z, cache["film"])
        states = [None] * len(self.blocks) if states is None else states
        new_states = []
        for i, block in enumerate(self.blocks):
            if str(i) in self.reinject:
                z = self.reinject[str(i)].reinjected(z, cache["reinject"][str(i)],
                                                     z_ref.embedding)
            z, state = block.step(z, states[i])
            new_states.append(state)
        return z, new_states
