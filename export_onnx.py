"""Export a checkpoint's network to ONNX for ONNX Runtime (inference.py --backend onnxruntime).

    python export_onnx.py --ckpt CKPT --out-dir DIR                   # the offline network
    python export_onnx.py --ckpt CKPT --out-dir DIR --stream --int8   # + streaming step, int8

What is exported (``torch.onnx.export(..., dynamo=True)``) is the network between the STFT and
the iSTFT, on real tensors:

- ``hifi_tse`` (offline or causal): ``network.onnx``, the unit-level spectrum ``spec`` (B, 2, F,
  T) (real and imaginary parts as channels; any T) and the reference's encoding ``ref_frames``
  (B, S, K, D) (any S), plus ``ref_embedding`` (B, 256) for a model with a pretrained speaker
  encoder, -> ``est`` (B, 2, F, T), the estimate's unit-level spectrum. With ``--stream`` (causal
  models): ``stream.onnx``, the per-hop step on t >= 1 new frames (batch 1), with every state an
  input and an output: ``n_past`` (int64, the real frames in the attention caches, 0 at the
  start, at most ``cache_frames``) and, for each block i, ``h<i>``/``c<i>`` (the LSTM's state)
  and ``key<i>``/``value<i>`` (``cache_frames`` = ``attn_lookback - 1`` frames, zeros at the
  start); outputs ``est`` and ``h<i>_out`` ... ``value<i>_out``.
- ``td_speakerbeam``: its whole network is time-domain: ``mix`` (B, N) (any N), ``ref_vector``
  (B, C) and ``scale`` (B, 1) (the level the mixture is divided by and the estimate multiplied
  by, as its ``extract`` does) -> ``est`` (B, N).

Not exported, and left to the runtime: the STFT and iSTFT (ONNX has no inverse STFT, and ONNX
Runtime's STFT is slow on the CPU), the level (the mixture's RMS, or a causal model's running
RMS: a sequential loop over frames), and the reference's encoding, which the checkpoint's model
computes once in PyTorch. The other families (spex_plus, semamba, sgmse_refiner) and hifi_tse's
Mamba variant are refused with one line: the Mamba scan recurses log2(T) times, which
torch.export unrolls for the example's length only (measured: exact up to 63 frames, 3e-4 off
beyond). ``--int8`` also writes ``*.int8.onnx``, ONNX Runtime's dynamic quantisation
(``quantize_dynamic``, int8 weights).

The folder also gets ``onnx_export.json``: the family, model_args, STFT and level, every graph's
inputs and outputs, a fingerprint of the exported weights (a run with other weights is
refused), and the parity measured right after the export (ONNX Runtime against PyTorch at two
lengths other than the example, and the stream; int8 against fp32). See doc/onnx.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extraction.onnx_runtime import (
    EXPORT_FORMAT,
    EXPORT_META,
    GRAPH_FILES,
    OFFLINE,
    STREAM,
    OnnxModel,
    int8_file,
    not_exported,
    weights_fingerprint,
)
from extraction.streaming import StreamingExtractor
from models.hifi_tse.export import (
    STATE_OUT,
    OfflineNetwork,
    StreamStep,
    fixed_stream_state,
    stream_reference,
)
from models.layers.conditioning import SpeakerReference
from models.registry import (
    ARCH_KEY,
    CheckpointError,
    model_from_payload,
    normalised_args,
    read_checkpoint,
)

EXAMPLE_SECONDS = 0.5  # the traced example: 51 frames at the 10 ms hop
CHECK_SECONDS = (0.3, 1.3)  # parity lengths, other than the example's
REF_SECONDS = 1.0
STREAM_EXAMPLE_FRAMES = 3
SEED = 0


class ExportError(ValueError):
    """A model or option that is not exported; the message is one line naming the checkpoint."""


# ---------------------------------------------------------------------------------------------
# The exported modules: positional tensors in, tensors out
# ---------------------------------------------------------------------------------------------


class _TimeDomainNetwork(nn.Module):
    """td_speakerbeam's ``extract`` with an explicit scale."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mix: torch.Tensor, ref_vector: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        return self.model.extract(mix, ref_vector, scale)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def check_exportable(model: nn.Module, *, stream: bool, name: str) -> None:
    """Refuse, in one line, what export_onnx.py does not export (module docstring)."""
    reason = not_exported(model)
    if reason is not None:
        raise ExportError(f"{name}: {reason}")
    if stream and not getattr(model, "causal", False):
        raise ExportError(f"{name}: --stream needs a causal hifi_tse (model.causal: true)")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Warnings, and log records below ERROR, off: the exporter reports its progress and the
    quantiser every tensor it leaves alone."""
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(module: nn.Module, args: tuple[Any, ...], path: Path, *, input_names: list[str],
            output_names: list[str], dynamic_shapes: tuple[Any, ...]) -> None:
    # torch.export traces nn.LSTM through a decomposition that unrolls the time steps, so the
    # sequence length becomes a constant of the graph (pytorch#115092). torch.onnx swaps in a
    # while-loop decomposition while it captures the graph, but not while it decomposes it
    # afterwards, where the constant comes back; holding the swap over the whole export keeps
    # the exported LSTM's length dynamic (measure_parity checks other lengths). Not under
    # no_grad: the band-split layers cache their padded weights there, by data pointer, which
    # the exporter's fake tensors do not have.
    from torch.export._patches import register_lstm_while_loop_decomposition  # torch >= 2.13

    with _quiet(), register_lstm_while_loop_decomposition():
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes,
                                    verbose=False)
    program.save(str(path), external_data=False)
    _name_dims(path, input_names, dynamic_shapes)


def _name_dims(path: Path, input_names: list[str], dynamic_shapes: tuple[Any, ...]) -> None:
    """The graph's dynamic axes under their ``Dim`` names (the exporter may call them s27,
    s46, ...), for the readers of the graph and of ``EXPORT_META``."""
    import onnx  # here: only an export needs it

    flat: list[Any] = []
    for spec in dynamic_shapes:
        flat.extend(spec if isinstance(spec, list) else [spec])
    wanted = dict(zip(input_names, (s for s in flat if s is not None), strict=True))
    model = onnx.load(str(path))
    graph = model.graph
    rename = {}
    for value in graph.input:
        for axis, dim in (wanted.get(value.name) or {}).items():
            param = value.type.tensor_type.shape.dim[axis].dim_param
            if param:
                rename[param] = dim.__name__
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    onnx.save(model, str(path))


def _signal(seconds: float, sr: int, gen: torch.Generator, batch: int = 1) -> torch.Tensor:
    """Noise with a level change half way (the running level then matters)."""
    n = round(seconds * sr) + 123  # not a whole number of hops
    wave = 0.1 * torch.randn(batch, n, generator=gen)
    wave[:, n // 2 :] *= 5.0
    return wave


def _export_hifi_tse(model: nn.Module, out_dir: Path, *, stream: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(SEED)
    sr = model.sample_rate
    with torch.no_grad():
        z_ref = model.encode_reference(_signal(REF_SECONDS, sr, gen, batch=2))
        spec = model.stft(_signal(EXAMPLE_SECONDS, sr, gen, batch=2))
    ri = torch.stack([spec.real, spec.imag], dim=1)  # (2, 2, F, T): batch 2, so it stays dynamic
    batch, frames = torch.export.Dim("batch", min=1), torch.export.Dim("frames", min=2)
    ref_frames = torch.export.Dim("ref_frames", min=2)
    embedding = z_ref.embedding
    names = ["spec", "ref_frames", *(["ref_embedding"] if embedding is not None else [])]
    graphs = {}
    _export(OfflineNetwork(model), (ri, z_ref.frames, embedding), out_dir / GRAPH_FILES[OFFLINE],
            input_names=names, output_names=["est"],
            dynamic_shapes=({0: batch, 3: frames}, {0: batch, 1: ref_frames},
                            None if embedding is None else {0: batch}))
    graphs[OFFLINE] = {"file": GRAPH_FILES[OFFLINE]}
    if stream:
        one = SpeakerReference(z_ref.frames[:1], None if embedding is None else embedding[:1])
        with torch.no_grad():
            reference = stream_reference(model, one)
        states = fixed_stream_state(model, 1)
        # The reference's keys and values have a dynamic length (S); the rest is fixed.
        ref_dims = [{2: ref_frames} if name.endswith(("_key", "_value")) else {}
                    for name in reference]
        _export(StreamStep(model, list(reference)),
                (ri[:1, ..., :STREAM_EXAMPLE_FRAMES], torch.tensor(0, dtype=torch.int64),
                 list(reference.values()), list(states.values())),
                out_dir / GRAPH_FILES[STREAM],
                input_names=["spec", "n_past", *reference, *states],
                output_names=["est", *(name + STATE_OUT for name in states)],
                dynamic_shapes=({3: torch.export.Dim("frames", min=1)}, {}, ref_dims,
                                [{} for _ in states]))
        graphs[STREAM] = {"file": GRAPH_FILES[STREAM],
                          "cache_frames": model.blocks[0].cache_frames,
                          "n_blocks": len(model.blocks)}
    return graphs


def _export_td_speakerbeam(model: nn.Module, out_dir: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(SEED)
    sr = model.sample_rate
    mix = _signal(EXAMPLE_SECONDS, sr, gen, batch=2)
    with torch.no_grad():
        z_ref = model.encode_reference(_signal(REF_SECONDS, sr, gen, batch=2))
    scale = mix.square().mean(-1, keepdim=True).sqrt()
    batch, samples = torch.export.Dim("batch", min=1), torch.export.Dim("samples", min=2)
    _export(_TimeDomainNetwork(model), (mix, z_ref, scale), out_dir / GRAPH_FILES[OFFLINE],
            input_names=["mix", "ref_vector", "scale"], output_names=["est"],
            dynamic_shapes=({0: batch, 1: samples}, {0: batch}, {0: batch}))
    return {OFFLINE: {"file": GRAPH_FILES[OFFLINE]}}


def _describe(path: Path) -> dict[str, list[dict[str, Any]]]:
    """A graph's inputs and outputs as the ONNX file declares them."""
    import onnx  # here: only an export needs it

    graph = onnx.load(str(path)).graph

    def one(value: Any) -> dict[str, Any]:
        kind = value.type.tensor_type
        return {"name": value.name,
                "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in kind.shape.dim]}

    return {"inputs": [one(v) for v in graph.input], "outputs": [one(v) for v in graph.output]}


def _quantise(path: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation (int8 weights, activations quantised on the
    fly) of a graph, next to it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # here: only --int8

    out = path.with_name(int8_file(path.name))
    with _quiet():
        quantize_dynamic(path, out, weight_type=QuantType.QInt8)
    return out


def _stft_meta(model: nn.Module) -> dict[str, Any] | None:
    stft = getattr(model, "stft", None)
    if stft is None:
        return None
    return {"n_fft": stft.n_fft, "win_length": stft.win_length, "hop_length": stft.hop_length,
            "window": "hann (torch.hann_window, periodic) of win_length, zero-padded to n_fft "
                      "and centred", "center": True,
            "padding": "the signal zero-padded to a whole number of hops, then n_fft/2 zeros "
                       "on each side (dsp/stft.py)"}


def _level_meta(model: nn.Module, arch: str) -> dict[str, Any]:
    if arch == "td_speakerbeam":
        return {"kind": "rms_scale", "where": "input scale: the mixture's RMS + 1e-8 (or one "
                "scale per file), applied inside the graph"}
    level = {"kind": "rms_scale", "where": "outside the graph: spec = STFT(mix / scale), the "
             "waveform iSTFT(est) * scale; scale = RMS + 1e-8 (dsp/level.py)"}
    if getattr(model, "causal", False):
        level = {"kind": "running_level", "rms_decay": model.rms_decay,
                 "where": "outside the graph: spec = STFT(mix) / level per frame, the estimate "
                 "est * level (Generator.running_level); rms_scale when one scale per file "
                 "is given"}
    return level


def si_sdr_db(estimate: np.ndarray, reference: np.ndarray) -> float:
    """SI-SDR (dB) in float64 without losses.separation's floor (which caps it near 100 dB):
    parity between two runs of one model lies above it."""
    est = np.asarray(estimate, dtype=np.float64).reshape(-1)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    target = ref * (np.dot(est, ref) / np.dot(ref, ref))
    noise = np.dot(est - target, est - target)
    return float("inf") if noise == 0 else float(10 * np.log10(np.dot(target, target) / noise))


def measure_parity(model: nn.Module, out_dir: Path, *, int8: bool) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on noise at ``CHECK_SECONDS`` (other lengths than the
    traced example's): the waveform's SI-SDR (dB) and max abs error, the network output's
    (spectrum or waveform) max abs error; the stream against PyTorch's stream; int8 against
    fp32. Raises when the graph does not run at those lengths."""
    gen = torch.Generator().manual_seed(SEED + 1)
    sr = model.sample_rate
    ref = _signal(REF_SECONDS, sr, gen)
    fp32 = OnnxModel(model, out_dir, threads=1)
    q8 = OnnxModel(model, out_dir, int8=True, threads=1) if int8 else None
    parity: dict[str, Any] = {"offline": [], "int8": []}
    with torch.no_grad():
        z_ref = model.encode_reference(ref)
        mixes = [_signal(s, sr, gen) for s in CHECK_SECONDS]
        for mix in mixes:
            torch_wave, ort_wave = model.extract(mix, z_ref)[0], fp32.extract(mix, z_ref)[0]
            row = {"samples": mix.shape[1],
                   "si_sdr_db": round(si_sdr_db(ort_wave, torch_wave), 2),
                   "max_abs_error": float((ort_wave - torch_wave).abs().max()),
                   "max_abs": float(torch_wave.abs().max())}
            if hasattr(model, "stft"):  # the network's own output: the spectrum
                spec = model.stft(mix / (mix.square().mean().sqrt() + 1e-8))
                torch_spec = model._extract_frames(spec, z_ref)
                ort_spec = fp32.network(spec, z_ref)
                row["spectrum_max_abs_error"] = float((ort_spec - torch_spec).abs().max())
                row["spectrum_max_abs"] = float(torch_spec.abs().max())
            parity["offline"].append(row)
            if q8 is not None:
                parity["int8"].append({"samples": mix.shape[1], "si_sdr_vs_fp32_db": round(
                    si_sdr_db(q8.extract(mix, z_ref)[0], ort_wave), 2)})
        if fp32.streams:
            mix = mixes[-1][0].numpy()
            hop = model.stft.hop_length
            outs = []
            for backend in (model, fp32):
                stream = StreamingExtractor(backend, z_ref)
                step = 3 * hop
                chunks = [stream.push(mix[i : i + step]) for i in range(0, mix.shape[0], step)]
                outs.append(np.concatenate([*chunks, stream.flush()]))
            parity["stream"] = {"samples": mix.shape[0], "chunk_hops": 3,
                                "si_sdr_db": round(si_sdr_db(outs[1], outs[0]), 2),
                                "max_abs_error": float(np.abs(outs[1] - outs[0]).max()),
                                "max_abs": float(np.abs(outs[0]).max())}
    if not parity["int8"]:
        del parity["int8"]
    return parity


def export(model: nn.Module, model_args: dict[str, Any], out_dir: Path, *, stream: bool = False,
           int8: bool = False, ema: bool = True, name: str = "model") -> dict[str, Any]:
    """Export ``model`` (built from ``model_args``) into ``out_dir`` (module docstring); returns
    the metadata written to ``EXPORT_META``, parity included."""
    model = model.eval().float()
    arch = normalised_args(model_args)[ARCH_KEY]
    check_exportable(model, stream=stream, name=name)
    out_dir.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    if arch == "td_speakerbeam":
        graphs = _export_td_speakerbeam(model, out_dir)
    else:
        graphs = _export_hifi_tse(model, out_dir, stream=stream)
    for info in graphs.values():
        info.update(_describe(out_dir / info["file"]))
        info["int8"] = _quantise(out_dir / info["file"]).name if int8 else None
    import onnxruntime  # here: only an export needs it

    meta = {"format": EXPORT_FORMAT, "family": arch, "model_args": normalised_args(model_args),
            "sample_rate": model.sample_rate, "stft": _stft_meta(model),
            "level": _level_meta(model, arch), "graphs": graphs,
            "reference": "encode_reference of the checkpoint's model, in PyTorch",
            "weights": weights_fingerprint(model), "ema": ema, "checkpoint": name,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "export_seconds": round(time.perf_counter() - begin, 1)}
    meta_path = out_dir / EXPORT_META
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    meta["parity"] = measure_parity(model, out_dir, int8=int8)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export a checkpoint's network to ONNX (doc/onnx.md).",
        epilog="What is exported and what is not: see the docstring of export_onnx.py.")
    parser.add_argument("--ckpt", type=Path, required=True, help="a hifi_tse or td_speakerbeam "
                        "checkpoint (.pt)")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="folder for the .onnx files and onnx_export.json")
    parser.add_argument("--stream", action="store_true",
                        help="also the per-hop streaming step (causal hifi_tse)")
    parser.add_argument("--int8", action="store_true",
                        help="also a dynamically quantised int8 copy of every graph")
    parser.add_argument("--no-ema", action="store_true", help="raw generator, not its EMA")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def _summary(meta: dict[str, Any]) -> list[str]:
    lines = []
    parity = meta["parity"]
    for row in parity["offline"]:
        spectrum = (f", spectrum max abs error {row['spectrum_max_abs_error']:.2e}"
                    if "spectrum_max_abs_error" in row else "")
        lines.append(f"  offline, {row['samples']} samples: SI-SDR {row['si_sdr_db']:.1f} dB "
                     f"against PyTorch, max abs error {row['max_abs_error']:.2e}{spectrum}")
    if "stream" in parity:
        row = parity["stream"]
        lines.append(f"  stream, {row['samples']} samples in {row['chunk_hops']}-hop chunks: "
                     f"SI-SDR {row['si_sdr_db']:.1f} dB, max abs error {row['max_abs_error']:.2e}")
    for row in parity.get("int8", []):
        lines.append(f"  int8, {row['samples']} samples: SI-SDR {row['si_sdr_vs_fp32_db']:.1f} "
                     "dB against fp32")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt = read_checkpoint(args.ckpt)
        use_ema = not args.no_ema
        model = model_from_payload(ckpt, use_ema=use_ema, name=str(args.ckpt))
        meta = export(model, ckpt["model_args"], args.out_dir, stream=args.stream,
                      int8=args.int8, ema=use_ema and ckpt.get("ema") is not None,
                      name=str(args.ckpt))
    except (CheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 (the CLI's one-line error)
        return 1
    files = [f for info in meta["graphs"].values() for f in (info["file"], info["int8"]) if f]
    print(f"{args.ckpt} -> {args.out_dir}: {', '.join(files)}, {EXPORT_META} "  # noqa: T201
          f"({meta['export_seconds']:.0f} s)")
    print("\n".join(_summary(meta)))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
