"""Evaluate a checkpoint of any model family (doc/design.md, "Evaluation and inference"): what a TSE
model does to the target, to the wrong speaker, to silence, to quality without a target and to
words.

    python evaluate.py --ckpt runs/hifi_tse/best.pt --out-dir runs/hifi_tse/eval   # validation set
    python evaluate.py --ckpt best.pt --out-dir eval --triplets pairs/   # ID-mixed/-ref/-target.wav
    python evaluate.py --ckpt best.pt --out-dir eval --triplets homework/ --lufs -20 \
        --chunk 2 --overlap 0.5                                   # mix/ refs/ targets/, streamed
    python evaluate.py --ckpt best.pt --out-dir eval --csv real.csv --missing-target unknown \
        --transcripts text                                 # real recordings: no target, WER

The samples (``evaluation/sources.py``): the fixed validation list of the checkpoint's config,
a triplet folder (flat or ``mix/ refs/ targets/``), or a CSV list. The generator runs in the main
process through ``Extractor`` (extraction/) (``evaluation/runner.py``), exactly as inference.py
extracts; with ``--chunk`` also chunk by chunk, as a streaming system would. The metrics
(``evaluation/metrics.py``, groups chosen by ``eval.metrics`` or ``--metrics``) run in
``--jobs`` worker processes; one that crashes or hangs (``--metric-timeout``) costs that metric
on that sample (``evaluation/isolation.py``). Outputs (``evaluation/report.py``) in
``--out-dir``: ``per_sample.csv`` (each row appended as it is done; a rerun into the same folder
with the same settings scores only the missing IDs, one with other settings is refused),
``fingerprint.json``, ``summary.json``, ``report.md``, ``report.html`` (the same, with the
figures and audio players in the page), ``si_sdri_hist.png`` and the best, median and worst TP
samples' (and the worst confusions') audio and spectrograms under ``examples/``. ``--standard
SPLIT`` scores a split of the config's standard set (data/standard_sets.py) and adds its result
in the published convention (evaluation/conventions.py).

A bad sample (a missing, unreadable, empty, too short or non-finite file, a duplicate ID, a
target whose length is not its mixture's or that is silent, a voiceless reference) is skipped
with one line naming the file, and counted in the report. Exit code 0 when at least one sample
was scored; 1 with one line naming the file for bad input that stops the run (a checkpoint that
is not one, a folder without triplets, a malformed CSV header, results of other settings in
``--out-dir``), or when no sample could be scored. ``--strict`` stops at the first bad sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from config import (
    EVAL_METRIC_GROUPS,
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
)
from data.manifest import ManifestError
from data.standard_dataset import read_configured_set
from data.standard_sets import StandardSet
from dsp.audio import AudioError
from dsp.files import write_text_atomic
from evaluation import html_report, report
from evaluation.conventions import convention_lines
from evaluation.isolation import WorkerError
from evaluation.metrics import PESQ_MODES, MetricSettings
from evaluation.runner import METRIC_TIMEOUT_S, RunSettings, extract_all, load_sample, run_samples
from evaluation.scoring import LONG_INPUT_RULES, units_of
from evaluation.sources import (
    MISSING_TARGET,
    TP,
    EvalInputError,
    SampleSource,
    Skipped,
    csv_samples,
    one_line,
    read_transcripts,
    standard_samples,
    triplet_samples,
    validation_samples,
    with_transcripts,
)
from extraction.extractor import Extractor, InferenceError, resolve_device
from extraction.onnx_runtime import OnnxBackendError, OnnxModel
from losses.pesq_target import pesq_rate
from models.registry import (
    ARCH_KEY,
    CheckpointError,
    model_from_payload,
    normalised_args,
    read_checkpoint,
)

log = logging.getLogger("evaluate")
LUFS_DEFAULT = -20.0  # --lufs without a value: the SpEx+ homework protocol's level
SCRATCH_DIR = ".scratch"  # under --out-dir: the signals of the samples being scored
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class NothingScored(EvalInputError):
    """Not one sample could be scored."""


def resolve_config(args: argparse.Namespace, stored: dict[str, Any] | None) -> Config:
    """``--config`` if given, else the checkpoint's stored config; then the ``--set`` items."""
    if args.config is not None:
        return load_config(args.config, args.set)
    if stored is None:
        if args.triplets is None and args.csv is None:
            raise EvalInputError(
                f"{args.ckpt}: the checkpoint stores no config; pass --config for the "
                "validation set"
            )
        return load_config(None, args.set)
    try:
        cfg = from_dict(stored)
    except ConfigError as err:
        raise ConfigError(f"{args.ckpt}: stored config: {err}") from None
    return apply_overrides(cfg, args.set)


@dataclass
class Checkpoint:
    """What an evaluation takes from its checkpoint, read once."""

    model: torch.nn.Module  # any registered family
    arch: str
    cfg: Config  # the stored config (or --config), with the --set overrides
    use_ema: bool  # EMA weights: present, and neither --no-ema nor eval.use_ema false
    step: int | None


def load_checkpoint(args: argparse.Namespace) -> Checkpoint:
    """The model, config and step of ``args.ckpt`` from one read of the file."""
    ckpt = read_checkpoint(args.ckpt)
    cfg = resolve_config(args, ckpt.get("config"))
    use_ema = not args.no_ema and cfg.eval.use_ema and ckpt.get("ema") is not None
    model = model_from_payload(ckpt, use_ema=use_ema, name=str(args.ckpt))
    arch = normalised_args(ckpt["model_args"])[ARCH_KEY]  # it built: the arguments are good
    return Checkpoint(model=model, arch=arch, cfg=cfg, use_ema=use_ema, step=ckpt.get("step"))


def _groups(text: str) -> list[str]:
    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(EVAL_METRIC_GROUPS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown metric groups {', '.join(unknown)} (known: "
                                         f"{', '.join(EVAL_METRIC_GROUPS)})")
    return groups


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a TSE checkpoint of any family on the validation set, a folder of "
        "triplets or a CSV of paths.", epilog="Sources, metrics and outputs: see the docstrings "
        "of evaluate.py and evaluation/."
    )
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint (.pt)")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the results")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--triplets", type=Path, metavar="DIR",
                        help="ID-mixed.wav, ID-ref.wav[, ID-target.wav] in DIR or in "
                        "DIR/{mix,refs,targets}")
    source.add_argument("--csv", type=Path, metavar="FILE",
                        help="CSV of mix,ref,target[,id,transcript] paths")
    source.add_argument("--standard", metavar="SPLIT", nargs="?", const="",
                        help="a split of the standard set of the config's standard section "
                        "(doc/standard_sets.md), e.g. test or tt; alone: standard.test_split. "
                        "--set standard.root=... points at your copy")
    parser.add_argument("--missing-target", choices=MISSING_TARGET, default="absent",
                        help="a triplet or CSV row without a target is target-absent (absent, "
                        "simulated sets) or a real recording scored without a target (unknown)")
    parser.add_argument("--transcripts", type=Path, metavar="FILE",
                        help="the targets' words, one 'ID words...' line per sample (WER)")
    parser.add_argument("--config", type=Path,
                        help="YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, repeatable")
    parser.add_argument("--n-samples", type=int,
                        help="validation samples (default: eval.n_samples)")
    parser.add_argument("--metrics", type=_groups, metavar="GROUPS",
                        help=f"comma-separated metric groups (default: eval.metrics; known: "
                        f"{','.join(EVAL_METRIC_GROUPS)})")
    parser.add_argument("--sdr", action="store_true", help="also BSS-Eval SDR (mir_eval; slow)")
    parser.add_argument("--si-sdr", choices=("zero-mean", "torchmetrics"), default="zero-mean",
                        help="SI-SDR convention: zero-mean (ours, asteroid, ESPnet) or "
                        "torchmetrics' default (no mean removal)")
    parser.add_argument("--lufs", type=float, nargs="?", const=LUFS_DEFAULT, metavar="LUFS",
                        help=f"loudness-normalise each mixture (ITU-R BS.1770-4) before "
                        f"extraction; without a value {LUFS_DEFAULT:g} LUFS")
    parser.add_argument("--chunk", type=float, metavar="SECONDS",
                        help="also extract chunk by chunk, as a streaming system would, and "
                        "score that too (stream_* columns)")
    parser.add_argument("--overlap", type=float, default=0.0, metavar="SECONDS",
                        help="overlap of consecutive --chunk chunks (cross-faded)")
    parser.add_argument("--stream", action="store_true",
                        help="also extract hop by hop through a causal model, as a live system "
                        "would (stream_* columns; instead of --chunk)")
    parser.add_argument("--pcs", action="store_true",
                        help="perceptual contrast stretching on every estimate (models/pcs.py, "
                        "as inference.py --pcs)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="metric worker processes; 0 scores one sample at a time, in the main "
                        "process except the metrics that run C code (a child process)")
    parser.add_argument("--metric-timeout", type=float, default=METRIC_TIMEOUT_S,
                        metavar="SECONDS", help="time one sample's metrics may take per started "
                        "minute of its audio before they count as hung (default %(default)g)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad sample (exit 1) instead of skipping it")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: eval.device)")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                        help="run the network in PyTorch or, exported (export_onnx.py), in ONNX "
                        "Runtime on the CPU, as inference.py --backend does")
    parser.add_argument("--onnx-dir", type=Path,
                        help="export_onnx.py's folder for --backend onnxruntime")
    parser.add_argument("--int8", action="store_true",
                        help="the dynamically quantised int8 graphs (--backend onnxruntime)")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw generator weights, not the EMA ones")
    return parser


def _standard_set(cfg: Config, split: str) -> StandardSet:
    if not cfg.standard.layout:
        raise EvalInputError("--standard needs a standard set: set standard.layout and its "
                             "paths in the config (--config / --set standard.layout=...)")
    try:
        return read_configured_set(cfg.standard, split)
    except ValueError as err:  # SetLayoutError, or a choice the layout does not have
        raise EvalInputError(str(err)) from None


def _sources(args: argparse.Namespace, cfg: Config, sample_rate: int,
             standard: StandardSet | None) -> tuple[list[SampleSource], list[Skipped], str, str]:
    """The samples (loaded at ``sample_rate``; ``standard``: the set of ``--standard``), those
    skipped while listing them, a description, and a digest of the list:
    every candidate ID and the folder (resolved), the CSV's content or, for the validation set,
    the data config that makes the items."""
    skipped: list[Skipped] = []
    listed = ""
    if args.triplets is not None:
        sources, skipped = triplet_samples(args.triplets, missing_target=args.missing_target,
                                           strict=args.strict, sample_rate=sample_rate)
        desc = f"triplets in `{args.triplets}`"
        listed = str(args.triplets.resolve())
    elif args.csv is not None:
        sources, skipped = csv_samples(args.csv, missing_target=args.missing_target,
                                       strict=args.strict, sample_rate=sample_rate)
        desc = f"CSV `{args.csv}`"
        listed = _sha256(args.csv)
    elif standard is not None:
        sources, skipped = standard_samples(standard, strict=args.strict,
                                            sample_rate=sample_rate)
        desc = f"{standard.name} (`{cfg.standard.root or cfg.standard.lists}`)"
        listed = json.dumps([to_dict(cfg)["standard"], args.standard], sort_keys=True)
    else:
        n = args.n_samples if args.n_samples is not None else cfg.eval.n_samples
        if n < 1:
            raise EvalInputError(f"--n-samples must be >= 1, got {n}")
        if cfg.stft.sample_rate != sample_rate:
            raise EvalInputError(f"the config's stft.sample_rate is {cfg.stft.sample_rate} Hz, "
                                 f"the checkpoint's model runs at {sample_rate} Hz: its "
                                 "validation list would be mixed at another rate")
        sources = validation_samples(cfg, n)
        desc = f"validation set (first {n} of the fixed list, `{cfg.data.manifest_dir}`)"
        listed = json.dumps(to_dict(cfg)["data"], sort_keys=True)
    if args.transcripts is not None:
        sources = with_transcripts(sources, read_transcripts(args.transcripts), args.transcripts,
                                   {k.id for k in skipped})
    ids = sorted([*(s.id for s in sources), *(k.id for k in skipped)])
    digest = hashlib.sha256("\n".join([listed, *ids]).encode()).hexdigest()
    return sources, skipped, desc, digest


def _sha256(path: Path) -> str:
    """The file's digest: a checkpoint retrained in place keeps its path and maybe its step."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(args: argparse.Namespace, loaded: Checkpoint, groups: tuple[str, ...],
                 metrics: MetricSettings, desc: str, digest: str) -> dict[str, Any]:
    """The settings every row of ``--out-dir`` must share: a resumed run with other ones would
    mix incomparable rows."""
    return {
        "checkpoint": str(args.ckpt.resolve()), "checkpoint_sha256": _sha256(args.ckpt),
        "step": loaded.step,
        "weights": "EMA" if loaded.use_ema else "generator", "metrics": list(groups),
        "sdr": metrics.sdr, "pesq_sr": metrics.pesq_sr, "si_sdr": args.si_sdr,
        "lufs": args.lufs, "chunk": args.chunk, "stream": args.stream,
        "backend": _backend(args),
        "overlap": args.overlap if args.chunk is not None else None, "pcs": args.pcs,
        "missing_target": args.missing_target, "source_list_sha256": digest,
        "transcripts_sha256": None if args.transcripts is None else _sha256(args.transcripts),
    }


def _backend(args: argparse.Namespace) -> str:
    return "torch" if args.backend == "torch" else f"onnxruntime{' int8' if args.int8 else ''}"


def _network(args: argparse.Namespace, loaded: Checkpoint) -> torch.nn.Module:
    """The checkpoint's model, or the same model with its network run by ONNX Runtime."""
    if args.backend == "torch":
        if args.onnx_dir is not None or args.int8:
            raise EvalInputError("--onnx-dir and --int8 go with --backend onnxruntime")
        return loaded.model
    if args.onnx_dir is None:
        raise EvalInputError("--backend onnxruntime needs --onnx-dir (export_onnx.py's folder)")
    try:
        return OnnxModel(loaded.model, args.onnx_dir, int8=args.int8)
    except OnnxBackendError as err:
        raise EvalInputError(str(err)) from None


def _report_skip(item: Skipped) -> None:
    sys.stderr.write(f"evaluate.py: skipped {item.id}: {item.problem}\n")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run a whole evaluation from parsed arguments; returns the summary that was written."""
    loaded = load_checkpoint(args)
    cfg, use_ema = loaded.cfg, loaded.use_ema
    if cfg.eval.pesq_sr not in PESQ_MODES:
        raise ConfigError(f"config key 'eval.pesq_sr': PESQ runs at {sorted(PESQ_MODES)} Hz, "
                          f"not {cfg.eval.pesq_sr}")
    if not args.metric_timeout > 0:
        raise EvalInputError(f"--metric-timeout must be > 0, got {args.metric_timeout}")
    if args.stream and args.chunk is not None:
        raise EvalInputError("--stream and --chunk both fill the stream_* columns: pick one")
    if args.stream and not getattr(loaded.model, "causal", False):
        raise EvalInputError(f"{args.ckpt}: --stream needs a causal model (model.causal: true)")
    if args.chunk is not None and not 0 <= args.overlap < args.chunk:
        raise EvalInputError(f"--overlap {args.overlap} must be >= 0 and below --chunk "
                             f"{args.chunk}")
    model = _network(args, loaded)
    device = resolve_device("cpu" if args.backend == "onnxruntime"
                            else args.device or cfg.eval.device)
    run = RunSettings(jobs=max(0, args.jobs), lufs=args.lufs, chunk_seconds=args.chunk,
                      chunk_overlap_seconds=args.overlap, stream=args.stream,
                      metric_timeout_s=args.metric_timeout)
    if device.type == "cpu" and run.jobs > 0:
        # The metric workers take one core each; more generator threads than the cores left
        # only contend (an LSTM on a busy CPU slows down many times over).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - run.jobs))
    extractor = Extractor(model, device=device, pcs=args.pcs)
    if args.standard == "":
        args.standard = cfg.standard.test_split
    if (cfg.standard.layout and args.standard is None and args.triplets is None
            and args.csv is None):
        # A run trained on a standard set has no packed validation list: its validation split.
        args.standard = cfg.standard.val_split
        log.info("the checkpoint was trained on a standard set: evaluating its split %s",
                 args.standard)
    rate = loaded.model.sample_rate  # the checkpoint's: every file is resampled to it
    standard = None if args.standard is None else _standard_set(cfg, args.standard)
    sources, skipped, source_desc, digest = _sources(args, cfg, rate, standard)
    for item in skipped:
        _report_skip(item)
    groups = tuple(g for g in EVAL_METRIC_GROUPS if g in (args.metrics or cfg.eval.metrics))
    if "wer" in groups and not any(s.transcribed for s in sources):
        # An all-empty WER column would look like a result: no transcripts, no WER.
        log.info("no transcripts (--transcripts, ID.txt or a transcript column): no WER")
        groups = tuple(g for g in groups if g != "wer")
    metrics = MetricSettings(groups=groups, pesq_sr=pesq_rate(rate, cfg.eval.pesq_sr),
                             sample_rate=rate,
                             sdr=args.sdr or cfg.eval.sdr, zero_mean=args.si_sdr == "zero-mean",
                             stream=args.chunk is not None or args.stream)
    out_dir: Path = args.out_dir
    columns = metrics.columns()
    fields = [*report.ROW_FIELDS, *(["mix_lufs"] if run.lufs is not None else []), *columns,
              "notes"]
    fingerprint = _fingerprint(args, loaded, groups, metrics, source_desc, digest)
    done = report.resume_rows(out_dir, fields, fingerprint)
    log.info("evaluating %d samples (%s%s) on %s with %s weights, metrics %s, %d metric "
             "workers", len(sources), source_desc,
             f", {len(done)} already scored in {out_dir}" if done else "", device,
             "EMA" if use_ema else "generator", ",".join(groups), run.jobs)

    new_rows: dict[str, dict[str, Any]] = {}
    writer = report.RowWriter(out_dir, fields, fingerprint)

    def on_row(index: int, row: dict[str, Any]) -> None:
        writer.append(row)
        new_rows[row["id"]] = report.as_written(row, fields)

    def on_skip(item: Skipped) -> None:
        skipped.append(item)
        _report_skip(item)

    scratch = out_dir / SCRATCH_DIR
    shutil.rmtree(scratch, ignore_errors=True)  # what a killed run left
    try:
        run_samples(extractor, sources, settings=run, metrics=metrics, scratch=scratch,
                    on_row=on_row, on_skip=on_skip, done_ids=set(done), strict=args.strict)
    finally:
        writer.close()
        shutil.rmtree(scratch, ignore_errors=True)
    scored = {**done, **new_rows}
    order = [i for i, s in enumerate(sources) if s.id in scored]
    rows = [scored[sources[i].id] for i in order]
    if not rows:
        raise NothingScored(f"no sample could be scored ({len(skipped)} skipped, see above)")
    report.write_csv(out_dir / report.CSV_NAME, rows, fields)
    edges = list(cfg.eval.snr_band_edges_db)
    sir_edges = list(cfg.eval.sir_band_edges_db)
    summary = report.summarize(rows, columns, edges, sir_edges)
    report.plot_histogram(out_dir / report.HIST_NAME,
                          [r["si_sdri"] for r in rows if r["condition"] == TP and "si_sdri" in r])

    whole_file = replace(run, chunk_seconds=None, stream=False)  # examples: whole-file estimates

    def estimate_of(index: int) -> tuple[Any, Any]:
        sample, _ = load_sample(sources[order[index]], whole_file)
        return sample, extract_all(extractor, sample, whole_file)[""]

    examples = report.write_examples(out_dir, report.pick_examples(rows), rows, estimate_of)
    convention = None
    if standard is not None:
        means = {m: s["mean"] for m, s in summary["metrics"].items()}
        n_pairs = sum(r["condition"] == TP for r in rows)
        convention = convention_lines(cfg.standard.layout, cfg.standard.n_src, standard.name,
                                      standard.target_kind, n_pairs, metrics.zero_mean, means)
        for line in convention:
            log.info("%s", line)
    pesq_mode = PESQ_MODES[metrics.pesq_sr]
    info = {
        "checkpoint": str(args.ckpt),
        "arch": loaded.arch,
        "step": loaded.step,
        "weights": "EMA" if use_ema else "generator",
        "source": source_desc,
        "n_samples": len(rows),
        "n_skipped": len(skipped),
        "skipped": skipped,
        **{f"n_{c.lower()}": sum(r["condition"] == c for r in rows) for c in report.CONDITIONS},
        "generator_params": sum(p.numel() for p in loaded.model.parameters()),
        "settings": {
            "sample_rate": rate,
            "metrics": ", ".join(groups),
            "pesq": f"{'wide' if pesq_mode == 'wb' else 'narrow'}-band at "
                    f"{metrics.pesq_sr / 1000:g} kHz (soxr resampling)",
            "stoi": f"pystoi at {rate / 1000:g} kHz (resampled to 10 kHz inside pystoi)",
            "not_applicable": metrics.not_applicable() or None,
            "si_sdr": "zero-mean, float64" if metrics.zero_mean
                      else "no mean removal (torchmetrics' default), float64",
            "sdr": metrics.sdr,
            "lufs": None if run.lufs is None else f"mixtures normalised to {run.lufs:g} LUFS "
                    "(ITU-R BS.1770-4, pyloudnorm) before extraction",
            "chunk": None if run.chunk_seconds is None else
                     f"{run.chunk_seconds:g} s chunks, {run.chunk_overlap_seconds:g} s overlap",
            "stream": "hop by hop through the causal model (extraction/streaming.py)"
                      if run.stream else None,
            "backend": _backend(args),
            "pcs": f"PCS400 at {rate / 1000:g} kHz on every estimate (extraction/pcs.py)"
                   if args.pcs else None,
            "missing_target": args.missing_target,
            "metric_timeout": f"{args.metric_timeout:g} s per started minute of a sample",
            "long_inputs": {u: LONG_INPUT_RULES[u] for u in units_of(metrics)},
            "snr_band_edges_db": edges,
            "sir_band_edges_db": sir_edges,
        },
        "examples": examples,
        "convention": convention,
    }
    result = {**info, **summary,
              "skipped": [{"id": k.id, "problem": k.problem} for k in skipped],
              "failures": [{"id": r["id"], "notes": r["notes"]} for r in rows if r.get("notes")]}
    write_text_atomic(out_dir / report.SUMMARY_NAME,
                      json.dumps(report.json_safe(result), indent=2, allow_nan=False) + "\n")
    write_text_atomic(out_dir / report.REPORT_NAME,
                      report.render_report(info, summary, rows, columns))
    write_text_atomic(out_dir / html_report.HTML_NAME,
                      html_report.render_html(info, summary, rows, columns))
    means = {m: s["mean"] for m, s in summary["metrics"].items()}
    log.info("SI-SDRi %s dB, PESQ %s, STOI %s, TA suppression %s dB -> %s",
             report.fmt(means.get("si_sdri"), "+.2f"), report.fmt(means.get("pesq")),
             report.fmt(means.get("stoi"), ".3f"),
             report.fmt(means.get("ta_suppression_db"), ".1f"), out_dir / report.REPORT_NAME)
    return result


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return one_line(err)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: the summary that was written, or one line on stderr and exit 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return evaluate(args)
    except (CheckpointError, AudioError, ConfigError, ManifestError, EvalInputError, InferenceError,
            WorkerError, OSError) as err:
        sys.stderr.write(f"evaluate.py: error: {_one_line(err)}\n")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        sys.stderr.write(f"evaluate.py: interrupted; the finished rows are in "
                         f"{args.out_dir / report.CSV_NAME}: rerun the same command to go on\n")
        raise SystemExit(INTERRUPTED_EXIT) from None


if __name__ == "__main__":
    main()
