"""A model whose network runs in ONNX Runtime: what export_onnx.py writes, read back.

export_onnx.py exports the network between the STFT and the iSTFT (hifi_tse: the unit-level
spectrum, real and imaginary parts as channels, in and out; td_speakerbeam: the waveform, its
whole network being time-domain) and, for a causal hifi_tse, the per-hop streaming step with
every state as an explicit input and output. Everything around the network stays in PyTorch:
the STFT and iSTFT, the level (the whole mixture's RMS, or a causal model's running RMS, whose
loop over frames would otherwise sit in the graph), and the reference, which the checkpoint's
model encodes once (``encode_reference``) and whose encoding the graphs take as inputs (the
streaming step takes what the conditioning derives from it, computed once per stream:
models/hifi_tse/export.py).

``OnnxModel`` wraps the checkpoint's model and keeps its contract (``encode_reference``,
``extract(mix, z_ref, scale)``, and ``stream_frames`` for a causal one), so ``Extractor`` (its
windows, one level per file, cross-fades) and ``StreamingExtractor`` (its STFT framing and
overlap-add) run it unchanged; only the network call goes through ONNX Runtime. The export's
folder holds the graphs and ``EXPORT_META`` (what the graphs take and give, the family, the
STFT, the model's arguments and a fingerprint of the exported weights), so a run needs that
folder and the checkpoint, and a folder exported from other weights than the checkpoint's is
refused.

The streaming graph's attention cache has a fixed shape: ``cache_frames`` (``attn_lookback -
1``) frames of keys and values per block, zeros before the stream starts, of which the last
``n_past`` are real; the mask hides the rest, so the stream gives what the PyTorch stream gives
(``TFGridNetBlock.step_fixed``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dsp.level import rms_scale
from models.hifi_tse.export import STATE_NAMES, STATE_OUT, fixed_stream_state, stream_reference
from models.layers.conditioning import EncodedReference, SpeakerReference
from models.registry import FAMILIES

EXPORT_META = "onnx_export.json"
EXPORT_FORMAT = 1
OFFLINE, STREAM = "offline", "stream"  # the graphs' keys in EXPORT_META
GRAPH_FILES = {OFFLINE: "network.onnx", STREAM: "stream.onnx"}
INT8_SUFFIX = ".int8.onnx"  # network.onnx -> network.int8.onnx
# Families and their graphs; what is not here is not exported (export_onnx.py says why).
EXPORTED_FAMILIES = ("hifi_tse", "td_speakerbeam")
# Graph inputs and outputs (models/hifi_tse/export.py). hifi_tse offline: spec, ref_frames[,
# ref_embedding] -> est; stream: spec, n_past, the reference's tensors (stream_reference), then
# h<i>, c<i>, key<i>, value<i> for each block i -> est, then the same states with STATE_OUT
# appended. td_speakerbeam: mix, ref_vector, scale -> est.


class OnnxBackendError(ValueError):
    """An export folder that cannot run this checkpoint, or a graph that was not exported; the
    message is one line naming the folder."""


def family_of(model: nn.Module) -> str:
    """The registered family name of a model instance."""
    for fam in FAMILIES.values():
        if type(model) is fam.model:
            return fam.name
    raise TypeError(f"{type(model).__name__} is not a registered family's model")


def not_exported(model: nn.Module) -> str | None:
    """Why export_onnx.py does not export ``model`` (one line), or None when it does."""
    arch = family_of(model)
    if arch not in EXPORTED_FAMILIES:
        return f"{arch} is not exported (export_onnx.py exports {' and '.join(EXPORTED_FAMILIES)})"
    if any(hasattr(m, "mamba") for m in model.modules()):
        return ("hifi_tse with sequence_layer mamba is not exported: its parallel scan recurses "
                "log2(T) times, which torch.export unrolls for the example's length only")
    return None


def int8_file(name: str) -> str:
    """The dynamically quantised copy of a graph file: ``network.onnx`` -> ``network.int8.onnx``."""
    return name.removesuffix(".onnx") + INT8_SUFFIX


def weights_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of the model's state dict (names, shapes, dtypes, values): which weights a
    folder was exported from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def read_export(folder: Path) -> dict[str, Any]:
    """The ``EXPORT_META`` of an export folder, checked for its format."""
    path = Path(folder) / EXPORT_META
    if not path.is_file():
        raise OnnxBackendError(f"{folder}: not an ONNX export (no {EXPORT_META}; run "
                               "export_onnx.py --ckpt CKPT --out-dir DIR)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OnnxBackendError(f"{path}: unreadable ({err})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise OnnxBackendError(f"{path}: export format {meta.get('format')!r}, this version "
                               f"reads {EXPORT_FORMAT}: export again")
    return meta


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort  # here: only a run with this backend needs it

    options = ort.SessionOptions()
    # No spin-waiting after a run: between network calls the STFT, the level and the overlap-add
    # run in PyTorch on the same cores, and spinning pool threads would take them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


class OnnxModel(nn.Module):
    """The checkpoint's ``model`` with its network run by ONNX Runtime from an export folder
    (``folder``; its int8 copies with ``int8``), under the model's contract (module docstring).

    ``threads``: ONNX Runtime's intra-op threads (None: its default, every core).
    """

    def __init__(self, model: nn.Module, folder: Path | str, *, int8: bool = False,
                 threads: int | None = None) -> None:
        super().__init__()
        folder = Path(folder)
        reason = not_exported(model)
        if reason is not None:
            raise OnnxBackendError(f"{folder}: {reason}")
        meta = read_export(folder)
        if meta["family"] != family_of(model):
            raise OnnxBackendError(f"{folder}: a {meta['family']} export, not the checkpoint's "
                                   f"{family_of(model)}")
        if meta["weights"] != weights_fingerprint(model):
            raise OnnxBackendError(
                f"{folder}: exported from other weights than this checkpoint's (export it again, "
                f"or match --no-ema: the export used the {'EMA' if meta['ema'] else 'raw'} "
                "weights)")
        self.model = model.eval()
        self.meta = meta
        self.family = meta["family"]
        self.sample_rate = model.sample_rate
        self.causal = bool(getattr(model, "causal", False))
        self.int8 = int8
        self.sessions: dict[str, Any] = {}
        for graph, info in meta["graphs"].items():
            name = info["int8"] if int8 else info["file"]
            if name is None:
                raise OnnxBackendError(f"{folder}: no int8 copy of the {graph} graph (export "
                                       "with --int8)")
            if not (folder / name).is_file():
                raise OnnxBackendError(f"{folder}: {name} is missing")
            self.sessions[graph] = _session(folder / name, threads)

    @property
    def stft(self) -> nn.Module:
        return self.model.stft

    @property
    def streams(self) -> bool:
        """Whether the folder holds the per-hop streaming step (export_onnx.py --stream)."""
        return STREAM in self.sessions

    def encode_reference(self, ref: torch.Tensor) -> EncodedReference:
        """The reference encoded by the checkpoint's model, in PyTorch (once per reference)."""
        return self.model.encode_reference(ref)

    def _reference_inputs(self, z_ref: SpeakerReference) -> dict[str, np.ndarray]:
        inputs = {"ref_frames": _array(z_ref.frames)}
        if z_ref.embedding is not None:
            inputs["ref_embedding"] = _array(z_ref.embedding)
        return inputs

    def network(self, spec: torch.Tensor, z_ref: SpeakerReference) -> torch.Tensor:
        """The offline graph on a unit-level spectrum. Shape: (B, F, T) complex -> same"""
        ri = _array(torch.stack([spec.real, spec.imag], dim=1))  # (B, 2, F, T)
        (est,) = self.sessions[OFFLINE].run(None, {"spec": ri, **self._reference_inputs(z_ref)})
        est = torch.from_numpy(est).to(spec.device)
        return torch.complex(est[:, 0], est[:, 1])

    @torch.no_grad()
    def extract(
        self, mix: torch.Tensor, z_ref: EncodedReference, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The family's ``extract`` with the network in ONNX Runtime: the same level (the
        given ``scale``, else the mixture's RMS, or a causal model's running RMS), STFT and
        iSTFT in PyTorch.

        Shape: mix (B, N), z_ref as ``encode_reference`` gives it, scale (B, 1) -> (B, N)
        """
        if self.family == "td_speakerbeam":
            scale = rms_scale(mix) if scale is None else scale.float()
            (est,) = self.sessions[OFFLINE].run(None, {
                "mix": _array(mix), "ref_vector": _array(z_ref), "scale": _array(scale)})
            return torch.from_numpy(est).to(mix.device)
        model, n_samples = self.model, mix.shape[-1]
        if self.causal and scale is None:
            spec = model.stft(mix.float())
            level = model.running_level(spec, model.level_state(mix.shape[0], mix.device))[0]
            est = self.network(spec / level[:, None], z_ref) * level[:, None]
            return model.stft.inverse(est, n_samples)
        scale = rms_scale(mix) if scale is None else scale.float()
        est = self.network(model.stft(mix.float() / scale), z_ref)
        return model.stft.inverse(est, n_samples) * scale

    @torch.no_grad()
    def stream_frames(
        self, spec: torch.Tensor, z_ref: SpeakerReference, state: dict[str, Any] | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The causal model's ``stream_frames`` with the step in ONNX Runtime: the running
        level in PyTorch, the blocks' states (fixed shapes) passed in and out of the graph.

        Shape: spec (1, F, t) complex -> (1, F, t) complex, state
        """
        if not self.streams:
            raise OnnxBackendError("the export has no streaming step (export_onnx.py --stream)")
        model = self.model
        if state is None:
            named = fixed_stream_state(model, spec.shape[0], spec.device)
            blocks = [{name: named[f"{name}{i}"] for name in STATE_NAMES}
                      for i in range(len(model.blocks))]
            reference = {k: _array(v) for k, v in stream_reference(model, z_ref).items()}
            state = {"level": model.level_state(spec.shape[0], spec.device), "blocks": blocks,
                     "reference": reference, "n_past": 0}
        level, level_state = model.running_level(spec, state["level"])
        unit = spec / level[:, None]
        inputs = {"spec": _array(torch.stack([unit.real, unit.imag], dim=1)),
                  "n_past": np.array(state["n_past"], dtype=np.int64), **state["reference"]}
        for i, block in enumerate(state["blocks"]):
            inputs.update({f"{name}{i}": _array(block[name]) for name in STATE_NAMES})
        session = self.sessions[STREAM]
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs),
                           strict=True))
        est = torch.from_numpy(outputs["est"]).to(spec.device)
        blocks = [{name: torch.from_numpy(outputs[f"{name}{i}{STATE_OUT}"])
                   for name in STATE_NAMES} for i in range(len(state["blocks"]))]
        n_past = min(state["n_past"] + spec.shape[-1], self.meta["graphs"][STREAM]["cache_frames"])
        est = torch.complex(est[:, 0], est[:, 1]) * level[:, None]
        return est, {"level": level_state, "blocks": blocks, "reference": state["reference"],
                     "n_past": n_past}
