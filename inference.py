"""Extract the target speaker from real recordings with a trained HiFi-TSE checkpoint.

    python inference.py --ckpt CKPT --mix mix.wav --ref ref.wav -o out.wav
    python inference.py --ckpt CKPT --mix mix.wav --ref a.wav --ref b.wav -o out.wav
    python inference.py --ckpt CKPT --mix-dir MIXES --ref ref.wav --out-dir OUT
    python inference.py --ckpt CKPT --mix-dir MIXES --ref-dir REFS --out-dir OUT
    python inference.py --ckpt CKPT --list jobs.csv          # columns mix,ref,out

Inputs may have any sample rate, bit depth and channel count: channels are averaged and the
signal is resampled with soxr to the model's rate (its checkpoint's ``sample_rate``, 48 kHz unless
it was trained at another; the first file at each other rate is announced in one line). The
output is mono float WAV (or the format its suffix names) at the model's rate, or at the
mixture's own rate with ``--keep-sr``, and always
has the mixture's duration: ``round(n_in * sr_out / sr_in)`` samples. Every output is written to
a temporary file in its folder and renamed when complete, so a failure never leaves a partial
file behind.

Folder pairing (``--ref-dir``): a mixture ``ID-mixed.<ext>`` pairs with ``ID-ref.<any ext>`` and
is written as ``ID-extracted.wav`` (the triplet naming evaluate.py reads, so a triplet folder
can be passed as both ``--mix-dir`` and ``--ref-dir``); when the folder holds ``*-mixed.*``
files only those are mixtures. Any other mixture ``NAME.<ext>`` pairs with the reference of the
same file name (or, failing that, the one file ``NAME.<any ext>``) and is written as
``NAME.wav``. In a CSV list, relative paths are relative to the CSV file's folder.

What happens to a recording (windows, one level per file, the reference cache, pooled
references, the reference checks, ``--pcs``) is the extractor library's: extraction/__init__.py.
``--stream`` runs a causal model (``model.causal: true``) hop by hop instead, as a live system
would (extraction/streaming.py), and prints the compute time per hop.

``--backend onnxruntime --onnx-dir DIR`` runs the network that export_onnx.py exported into DIR
in ONNX Runtime on the CPU (``--int8``: its int8 copy), for files and for ``--stream``; the STFT,
the level, the windows and the reference's encoding (from ``--ckpt``) stay in PyTorch
(extraction/onnx_runtime.py, doc/onnx.md). A model or graph that was not exported is refused.

Errors: a bad input prints one line ``error: <path>: <problem>`` to stderr, writes no output
for that pair and makes the exit code 1 (the other pairs of a folder or list still run).
Checkpoints are read once (``models.registry.read_checkpoint``) with ``weights_only=True``: a
file holding arbitrary pickled objects is refused.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from dsp.audio import SAMPLE_RATE, AudioError
from extraction.extractor import Extractor, InferenceError, Job, resolve_device
from extraction.onnx_runtime import OnnxBackendError, OnnxModel
from extraction.windows import OVERLAP_SECONDS, WINDOW_SECONDS
from models.registry import CheckpointError, load_model

log = logging.getLogger(__name__)

MIXED_SUFFIX, REF_SUFFIX, OUT_SUFFIX = "-mixed", "-ref", "-extracted"
OUT_EXT = ".wav"
AUDIO_EXTS = frozenset(
    {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64"}
)
CSV_COLUMNS = ("mix", "ref", "out")


def _audio_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InferenceError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTS)


def _pair_reference(mix: Path, ref_dir: Path, refs: list[Path]) -> Path:
    """The reference of ``mix`` in ``ref_dir`` by the pairing rule (module docstring)."""
    if mix.stem.endswith(MIXED_SUFFIX):
        stem = mix.stem[: -len(MIXED_SUFFIX)] + REF_SUFFIX
        found = [p for p in refs if p.stem == stem]
    else:
        stem = mix.stem
        same_name = ref_dir / mix.name
        found = [same_name] if same_name in refs else [p for p in refs if p.stem == stem]
    if len(found) != 1:
        problem = "no reference" if not found else f"{len(found)} references"
        raise InferenceError(f"{mix}: {problem} named {stem}.* in {ref_dir}")
    return found[0]


def _out_name(mix: Path) -> str:
    if mix.stem.endswith(MIXED_SUFFIX):
        return mix.stem[: -len(MIXED_SUFFIX)] + OUT_SUFFIX + OUT_EXT
    return mix.stem + OUT_EXT


def folder_jobs(
    mix_dir: Path, out_dir: Path, *, ref: Path | None = None, ref_dir: Path | None = None
) -> tuple[list[Job], list[InferenceError]]:
    """Pairs for a mixture folder with one reference or a reference folder, and the mixtures
    that could not be paired."""
    mixes = _audio_files(mix_dir)
    if any(p.stem.endswith(MIXED_SUFFIX) for p in mixes):
        mixes = [p for p in mixes if p.stem.endswith(MIXED_SUFFIX)]
    if not mixes:
        raise InferenceError(f"{mix_dir}: no audio files")
    refs = _audio_files(ref_dir) if ref_dir is not None else []
    jobs, errors = [], []
    for mix in mixes:
        try:
            pair = ref if ref is not None else _pair_reference(mix, ref_dir, refs)
        except InferenceError as err:
            errors.append(err)
            continue
        jobs.append(Job(mix=mix, ref=pair, out=out_dir / _out_name(mix)))
    return jobs, errors


def list_jobs(csv_path: Path) -> list[Job]:
    """Jobs from a CSV file with a header naming (at least) the columns mix, ref, out."""
    if not csv_path.is_file():
        raise InferenceError(f"{csv_path}: no such file")
    base = csv_path.parent
    try:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InferenceError(f"{csv_path}: missing column(s) {', '.join(missing)}")
            jobs = []
            for row in reader:
                cells = {c: (row.get(c) or "").strip() for c in CSV_COLUMNS}
                empty = [c for c, v in cells.items() if not v]
                if empty:
                    raise InferenceError(
                        f"{csv_path}: line {reader.line_num}: empty {', '.join(empty)}"
                    )
                jobs.append(Job(**{c: base / v for c, v in cells.items()}))
    except (UnicodeDecodeError, csv.Error) as err:
        raise InferenceError(f"{csv_path}: not a readable CSV file ({err})") from None
    if not jobs:
        raise InferenceError(f"{csv_path}: no rows")
    return jobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Extract the target speaker (HiFi-TSE).",
        epilog="Pairing rules, windows and level handling: see the docstring of inference.py.",
    )
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="a checkpoint of any model family (.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mix", type=Path, help="one mixture")
    source.add_argument("--mix-dir", type=Path, help="a folder of mixtures")
    source.add_argument("--list", type=Path, help="CSV file with columns mix,ref,out")
    refs = parser.add_mutually_exclusive_group()
    refs.add_argument("--ref", type=Path, action="append",
                      help="reference of the target speaker; repeat it for several (pooled)")
    refs.add_argument("--ref-dir", type=Path, help="folder of references paired by file name")
    parser.add_argument("-o", "--out", type=Path, help="output file (with --mix)")
    parser.add_argument("--out-dir", type=Path, help="output folder (with --mix-dir)")
    parser.add_argument("--keep-sr", action="store_true", help="write at the mixture's own rate")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--half", action="store_true", help="bf16/fp16 autocast (CUDA only)")
    parser.add_argument("--no-ema", action="store_true", help="raw generator, not its EMA")
    parser.add_argument("--pcs", action="store_true",
                        help="perceptual contrast stretching (PCS400 at 48 kHz) of every output")
    parser.add_argument("--window", type=float, default=WINDOW_SECONDS, metavar="SECONDS")
    parser.add_argument("--overlap", type=float, default=OVERLAP_SECONDS, metavar="SECONDS")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--stream", action="store_true",
                        help="run a causal model hop by hop as a live system would, and print "
                        "the per-hop compute time (p50 / p99) against the hop")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                        help="run the network in PyTorch or, exported (export_onnx.py), in ONNX "
                        "Runtime on the CPU")
    parser.add_argument("--onnx-dir", type=Path,
                        help="export_onnx.py's folder for --backend onnxruntime")
    parser.add_argument("--int8", action="store_true",
                        help="the dynamically quantised int8 graphs (--backend onnxruntime)")
    args = parser.parse_args(argv)
    if args.mix is not None and (args.ref is None or args.out is None):
        parser.error("--mix needs --ref and -o/--out")
    if args.mix_dir is not None and (args.out_dir is None or (args.ref or args.ref_dir) is None):
        parser.error("--mix-dir needs --out-dir and one of --ref / --ref-dir")
    if args.list is not None and (args.ref or args.ref_dir or args.out or args.out_dir):
        parser.error("--list takes mix, ref and out from the CSV file only")
    if args.mix is None and args.out is not None:
        parser.error("-o/--out goes with --mix; use --out-dir with --mix-dir")
    if args.mix_dir is None and args.out_dir is not None:
        parser.error("--out-dir goes with --mix-dir; use -o/--out with --mix")
    if not 0 <= args.overlap < args.window:
        parser.error("--overlap must be >= 0 and shorter than --window")
    if args.stream and args.half:
        parser.error("--stream runs in float32: drop --half")
    if args.backend == "onnxruntime":
        if args.onnx_dir is None:
            parser.error("--backend onnxruntime needs --onnx-dir (export_onnx.py's folder)")
        if args.half:
            parser.error("--half is for --backend torch on CUDA")
        if args.device not in ("auto", "cpu"):
            parser.error("--backend onnxruntime runs on the CPU: drop --device")
    elif args.onnx_dir is not None or args.int8:
        parser.error("--onnx-dir and --int8 go with --backend onnxruntime")
    return args


def _error(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)  # noqa: T201 (the CLI's one-line error)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    errors: list[Exception] = []
    try:
        if args.mix is not None:
            jobs = [Job(mix=args.mix, ref=args.ref[0], out=args.out,
                        extra_refs=tuple(args.ref[1:]))]
        elif args.mix_dir is not None:
            jobs, errors = folder_jobs(
                args.mix_dir, args.out_dir, ref=args.ref[0] if args.ref else None,
                ref_dir=args.ref_dir
            )
            jobs = [replace(job, extra_refs=tuple((args.ref or [])[1:])) for job in jobs]
        else:
            jobs = list_jobs(args.list)
        device = resolve_device("cpu" if args.backend == "onnxruntime" else args.device)
        model = load_model(args.ckpt, use_ema=not args.no_ema)
    except (InferenceError, CheckpointError) as err:
        _error(err)
        return 1
    if args.stream and not getattr(model, "causal", False):
        _error(f"{args.ckpt}: --stream needs a causal model (model.causal: true)")
        return 1
    if args.backend == "onnxruntime":
        try:
            model = OnnxModel(model, args.onnx_dir, int8=args.int8, threads=args.threads)
        except OnnxBackendError as err:
            _error(err)
            return 1
        if args.stream and not model.streams:
            _error(f"{args.onnx_dir}: no streaming step exported (export_onnx.py --stream)")
            return 1
    if model.sample_rate != SAMPLE_RATE:
        log.info("%s: the model runs at %d Hz", args.ckpt, model.sample_rate)
    extractor = Extractor(
        model,
        device=device,
        half=args.half,
        window_seconds=args.window,
        overlap_seconds=args.overlap,
        pcs=args.pcs,
    )
    for err in errors:
        _error(err)
    for job in jobs:
        try:
            run = extractor.run_stream if args.stream else extractor.run
            result = run(job, keep_sr=args.keep_sr)
        except (AudioError, InferenceError) as err:
            errors.append(err)
            _error(err)
            continue
        except OSError as err:
            errors.append(err)
            _error(f"{job.out}: cannot write ({err.strerror or err})")
            continue
        except torch.OutOfMemoryError:
            errors.append(MemoryError())
            _error(f"{job.mix}: out of memory on {device} (try a shorter --window)")
            continue
        print(  # noqa: T201 (the CLI's result line)
            f"{job.mix} -> {job.out}: {result.duration:.2f} s in {result.seconds:.2f} s, "
            f"RTF {result.rtf:.3f}"
        )
        if result.hop_seconds:
            hop_ms = 1e3 * model.stft.hop_length / model.sample_rate
            print(  # noqa: T201
                f"  per-hop compute: p50 {1e3 * result.hop_percentile(50):.2f} ms, p99 "
                f"{1e3 * result.hop_percentile(99):.2f} ms for a {hop_ms:g} ms hop "
                f"({len(result.hop_seconds)} hops)"
            )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
