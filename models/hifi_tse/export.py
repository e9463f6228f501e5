"""hifi_tse's network on real tensors with flat, named inputs and outputs: what export_onnx.py
exports to ONNX and extraction/onnx_runtime.py feeds (doc/onnx.md).

Two forms, both between the STFT and the iSTFT and at unit level (the level is the caller's):

- ``OfflineNetwork``: ``spec`` (B, 2, F, T) (real and imaginary parts as channels) and the
  encoded reference (``ref_frames`` (B, S, K, D), ``ref_embedding`` (B, E) where the model has a
  pretrained speaker encoder) -> ``est`` (B, 2, F, T); ``Generator._extract_frames`` up to float
  rounding (the complex product is written out in real arithmetic).
- ``StreamStep`` (causal models): the next ``t`` frames, what the conditioning derives from the
  reference once (``stream_reference``: USEF's and every re-injection layer's keys and values,
  FiLM's scale and shift, the embedding; recomputing them at every hop would cost more than the
  hop), ``n_past`` and every block's state in fixed shapes (``fixed_stream_state``: the LSTM's
  h and c, ``cache_frames`` frames of attention keys and values, the last ``n_past`` of them
  real) -> the frames and the new states; ``Generator.stream_frames`` frame for frame, without
  its running level.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.conditioning import SpeakerReference

STATE_NAMES = ("h", "c", "key", "value")  # per block i: h<i>, c<i>, key<i>, value<i>
STATE_OUT = "_out"  # the step's outputs: h<i>_out, ...


def extract_frames_real(model: nn.Module, spec_ri: torch.Tensor,
                        z_ref: SpeakerReference) -> torch.Tensor:
    """The offline network on real tensors. Shape: (B, 2, F, T) at unit level -> (B, 2, F, T)"""
    ri = spec_ri.permute(0, 3, 2, 1)  # (B, T, F, 2)
    z = model.conditioned_blocks(model.encoder.from_real(ri), z_ref)
    return model.decoder.forward_real(z, ri).permute(0, 3, 2, 1)


def stream_reference(model: nn.Module, z_ref: SpeakerReference) -> dict[str, torch.Tensor]:
    """What the streaming step takes from the reference, by input name, computed once
    (``reference_cache``): ``usef_key``/``usef_value``, ``film_scale``/``film_shift`` (with
    FiLM), ``reinject<i>_key``/``reinject<i>_value`` per re-injection layer, ``ref_embedding``
    (with a pretrained speaker encoder)."""
    cache = model.reference_cache(z_ref)
    named = dict(zip(("usef_key", "usef_value"), cache["usef"], strict=True))
    if cache["film"] is not None:
        named.update(zip(("film_scale", "film_shift"), cache["film"], strict=True))
    for i, kv in sorted(cache["reinject"].items(), key=lambda item: int(item[0])):
        named.update(zip((f"reinject{i}_key", f"reinject{i}_value"), kv, strict=True))
    if z_ref.embedding is not None:
        named["ref_embedding"] = z_ref.embedding
    return named


def fixed_stream_state(model: nn.Module, batch: int = 1,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every block's state before the first frame, by input name: zeros, in the fixed shapes of
    ``TFGridNetBlock.step_fixed``.

    Shape: h<i>, c<i> (1, B*K, H), key<i> (B, heads, C, K*qk), value<i> (B, heads, C, K*D/heads)
    """
    if not model.causal:
        raise RuntimeError("a streaming state needs a causal model (model.causal: true)")
    k, d = model.encoder.grid.n_bands, model.encoder.proj_bias.shape[1]
    states = {}
    for i, block in enumerate(model.blocks):
        lstm, attn = block.inter.lstm, block.attn
        cache = (batch, attn.n_heads, block.cache_frames)
        shapes = {"h": (1, batch * k, lstm.hidden_size), "c": (1, batch * k, lstm.hidden_size),
                  "key": (*cache, k * attn.qk_per_band), "value": (*cache, k * d // attn.n_heads)}
        states.update({f"{name}{i}": torch.zeros(shapes[name], device=device)
                       for name in STATE_NAMES})
    return states


def stream_step_real(
    model: nn.Module, spec_ri: torch.Tensor, reference: dict[str, torch.Tensor],
    states: dict[str, torch.Tensor], n_past: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The causal network on the next frames (module docstring); returns the frames and the
    new states under the input names.

    Shape: spec_ri (B, 2, F, t) at unit level -> (B, 2, F, t), states
    """
    ri = spec_ri.permute(0, 3, 2, 1)  # (B, t, F, 2)
    z = model.usef.fused(model.encoder.from_real(ri),
                         (reference["usef_key"], reference["usef_value"]))
    if model.film is not None:
        z = model.film.modulate(z, (reference["film_scale"], reference["film_shift"]))
    embedding = reference.get("ref_embedding")
    new_states = {}
    for i, block in enumerate(model.blocks):
        if str(i) in model.reinject:
            kv = (reference[f"reinject{i}_key"], reference[f"reinject{i}_value"])
            z = model.reinject[str(i)].reinjected(z, kv, embedding)
        z, *state = block.step_fixed(z, *(states[f"{name}{i}"] for name in STATE_NAMES), n_past)
        new_states.update({f"{name}{i}": t for name, t in zip(STATE_NAMES, state, strict=True)})
    return model.decoder.forward_real(z, ri).permute(0, 3, 2, 1), new_states


class OfflineNetwork(nn.Module):
    """``extract_frames_real`` with positional tensors, for ``torch.onnx.export``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, spec: torch.Tensor, ref_frames: torch.Tensor,
                ref_embedding: torch.Tensor | None = None) -> torch.Tensor:
        return extract_frames_real(self.model, spec, SpeakerReference(ref_frames, ref_embedding))


class StreamStep(nn.Module):
    """``stream_step_real`` with positional tensors, for ``torch.onnx.export``: ``spec``,
    ``n_past``, the reference's tensors in ``reference_names`` order and the states in
    ``state_names`` order -> ``est``, then the states in that order."""

    def __init__(self, model: nn.Module, reference_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.reference_names = list(reference_names)
        self.state_names = list(fixed_stream_state(model))

    def forward(self, spec: torch.Tensor, n_past: torch.Tensor, reference: list[torch.Tensor],
                states: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        est, new = stream_step_real(
            self.model, spec, dict(zip(self.reference_names, reference, strict=True)),
            dict(zip(self.state_names, states, strict=True)), n_past)
        return (est, *(new[name] for name in self.state_names))
