"""The one place where HiFi-TSE's configuration is defined, loaded and overridden.

Every default lives in the dataclasses below; a YAML file holds only what differs from them;
``--set section.key=value`` overrides either. An unknown key or a value of the wrong type is an
error that names it. Modules never see a ``Config``: callers unpack the section they need,
e.g. ``build_model(model_kwargs(cfg))``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models import registry
from models.hifi_tse.generator import HiFiTSEArgs
from models.hifi_tse.tf_gridnet import SEQUENCE_LAYERS
from models.layers.ge2e import KINDS as SPEAKER_EMBEDDINGS

SAMPLE_RATE = 48_000  # the default rate (stft.sample_rate), which every existing run uses


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses (names the key)."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class StftConfig:
    # The one sample rate of a run: packing resamples to it, dynamic mixing, every family, the
    # losses and evaluate.py work at it, checkpoints record it, inference.py resamples files
    # to it and back. Standard TSE sets: 8000 or 16000.
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 2048  # 1025 bins, 23.4 Hz each
    win_length: int = 960  # 20 ms Hann window
    hop_length: int = 480  # 10 ms
    # Alternatives in milliseconds: non-zero, they set win_length / hop_length at sample_rate
    # (rounded); of a count and its alternative, the one set last wins. Checkpoints store the
    # samples.
    win_length_ms: float = 0.0
    hop_length_ms: float = 0.0


@dataclass
class DataConfig:
    # --- Scanning and packing (data/prepare_manifest.py) ---
    # Each speech source is a mapping {layout: dns4 | ears | vctk | generic, root: DIR} with
    # optional name (the source id; default: the layout, or the folder name for generic),
    # speaker_regex (one capture group, searched in the path below root), speaker_prefix and,
    # for vctk, mic (default mic1). See data/scan.py for the per-layout defaults.
    speech_sources: list[dict[str, Any]] = field(default_factory=list)
    # A folder (generic layout) or a mapping {layout: demand | generic, root, name, channels}.
    # DEMAND keeps chNN.wav per environment; channels lists the ones to use (default [1]).
    noise_dirs: list[str | dict[str, Any]] = field(default_factory=list)
    # A folder (generic layout) or a mapping {layout: slr26 | slr28 | generic, root, name,
    # channels: first | all | mix}: how multi-channel RIR files become mono RIRs.
    rir_dirs: list[str | dict[str, Any]] = field(default_factory=list)
    manifest_dir: str = "exp/manifests"
    hdf5_dir: str = "exp/hdf5"
    pack_workers: int = 4  # decode + resample processes; one more process writes the HDF5
    # Shorter files are skipped (and reported) when packing.
    min_speech_seconds: float = 1.0
    min_noise_seconds: float = 1.0
    min_rir_seconds: float = 0.01
    val_fraction: float = 0.05  # last 5 % of sorted speaker ids (and noise / RIR keys) per source
    # --- Dynamic mixing (data/dataset.py) ---
    segment_seconds: float = 4.0
    ref_seconds: float = 4.0
    samples_per_epoch: int = 100_000  # virtual length of the training set
    min_interferers: int = 1
    max_interferers: int = 3
    level_db: list[float] = field(default_factory=lambda: [-35.0, -15.0])  # speech RMS, dBFS
    sir_db: list[float] = field(default_factory=lambda: [-5.0, 5.0])  # target / each interferer
    snr_db: list[float] = field(default_factory=lambda: [-5.0, 15.0])  # speech sum / noise
    ref_level_db: list[float] = field(default_factory=lambda: [-35.0, -15.0])
    ref_snr_db: list[float] = field(default_factory=lambda: [0.0, 20.0])  # noisy references
    ta_prob: float = 0.2  # target-absent share from phase 2 on (and of the validation set)
    val_noisy_ref_prob: float = 0.5  # noisy-reference share of the fixed validation set
    target_type: str = "reverberant"  # reverberant | early | dry
    early_reverb_ms: float = 50.0
    max_rir_seconds: float = 2.0  # RIRs are cut (with a short fade) after the direct path + this
    rir_cache_size: int = 512  # RIRs kept in memory per worker
    speed_perturb: list[float] = field(default_factory=lambda: [0.9, 1.1])
    peak_limit: float = 0.95
    # Difficulty one step at a time (bench/bench_ladder.py); the defaults change nothing.
    reverb_prob: float = 1.0  # share of samples whose sources are convolved with an RIR
    noise_prob: float = 1.0  # share of samples with noise in the mixture
    # [target, interferer]: two training speakers, always these two (one interferer, the
    # validation items too): speaker-dependent separation, in which the reference is irrelevant.
    speaker_pair: list[str] = field(default_factory=list)
    # Virtual training speakers: for each factor f, a copy of every training speaker whose
    # speech plays f times faster (its pitch and formants, i.e. its vocal-tract length, scaled
    # by f) is a speaker of its own, which the others meet as an interferer (Yamamoto et al.,
    # speed perturbation as speaker augmentation). E.g. [0.85, 1.15] triples the speakers.
    virtual_speakers: list[float] = field(default_factory=list)
    n_val_samples: int = 200
    seed: int = 1234
    num_workers: int = 4


STANDARD_LAYOUTS = ("", "librimix", "spex_lists", "wsj0_2mix_extr", "whamr")


@dataclass
class StandardSetConfig:
    # A standard TSE set in its official layout (data/standard_sets.py, doc/standard_sets.md):
    # train.py reads its fixed mixtures instead of mixing dynamically (data/standard_dataset.py),
    # and evaluate.py --standard SPLIT scores a split in the published conventions. "" = none.
    # These sets hold no target-absent items: training on one needs data.ta_prob,
    # loss.ta_energy and the dynamic-mixing schedules at 0 (train.py refuses otherwise).
    layout: str = ""  # librimix | spex_lists | wsj0_2mix_extr | whamr
    root: str = ""  # librimix: the Libri2Mix / Libri3Mix folder; wsj0_2mix_extr, whamr: theirs
    # spex_lists, whamr: the folder of mix.scp, ref.scp, aux.scp; "{split}" becomes the split.
    lists: str = ""
    # Path prefixes rewritten in those lists (they hold their authors' absolute paths).
    replace: dict[str, str] = field(default_factory=dict)
    n_src: int = 2  # librimix: 2 (Libri2Mix) or 3 (Libri3Mix)
    rate: str = "8k"  # librimix, whamr: the wav8k / wav16k folder; must be stft.sample_rate
    mode: str = "min"  # min | max
    mix_type: str = "mix_both"  # librimix: mix_clean | mix_both | mix_single; whamr: mix_*
    target: str = "anechoic"  # whamr: the scored target, anechoic (dry, as USEF-TSE) | reverb
    # librimix: BUT SpeakerBeam's map_mixture2enrollment of a split ("{split}" replaced); an
    # evaluation-only licence: download it yourself (doc/standard_sets.md). "" = enrollments
    # drawn from the split's other utterances of the speaker.
    enrollment_map: str = ""
    train_split: str = "train-100"  # librimix: train-100 | train-360; spex / whamr: tr
    val_split: str = "dev"  # librimix: dev; spex / whamr / wsj0_2mix_extr: cv
    test_split: str = "test"  # librimix: test; the others: tt


@dataclass
class LossConfig:
    # Named weights, combined in one place: sum(w * terms[k] for k, w in weights.items()).
    si_sdr: float = 1.0
    # Scale-aware partner of SI-SDR on target-present items: without it the TA energy loss
    # turned every output down (estimate/target RMS fell to 0.05 in a demo run).
    snr: float = 0.5
    # |dB| level error on TP items: the counterweight of ta_energy, which is also in dB.
    level: float = 0.1
    phase_sensitive: float = 0.1
    ta_energy: float = 0.1
    multi_res_stft: float = 0.0
    l1: float = 0.0
    amplitude: float = 0.0
    # Terms that only some families' auxiliary outputs feed (models/registry.py); a non-zero
    # weight with another family is an error at load.
    si_sdr_middle: float = 0.0  # SpEx+: negative SI-SDR of the middle-scale decoder
    si_sdr_long: float = 0.0  # SpEx+: negative SI-SDR of the long-scale decoder
    speaker_ce: float = 0.0  # cross-entropy of a speaker-classification head on the reference
    # SEMamba (MP-SENet's losses) on the model's own compressed STFT, |X|^0.3, of the estimate
    # and the target divided by the mixture's RMS (losses/mag_phase.py); its time L1 is ``l1``.
    compressed_mag: float = 0.0  # MSE of compressed magnitudes
    antiwrap_phase: float = 0.0  # anti-wrapping instantaneous phase + group delay + inst. freq.
    compressed_complex: float = 0.0  # MSE of compressed complex spectra
    consistency: float = 0.0  # compressed STFT of the output waveform vs the predicted spectrum
    # arch sgmse_refiner: its SDE's loss (OUVE: denoising score matching; SBVE: data
    # prediction), over every item, the family's whole objective (the other weights 0)
    score_matching: float = 0.0
    # Distillation (the distill section): negative SI-SDR of the estimate against the frozen
    # teacher's, on target-present items; si_sdr stays the term against the target. Target-absent
    # items get no teacher term: SI-SDR against a near-silent teacher output means nothing.
    teacher_si_sdr: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.01  # cosine decay ends at lr * this
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    warmup_steps: int = 4000  # micro-steps of linear warm-up
    grad_clip: float = 5.0
    grad_accum: int = 4  # micro-steps per optimizer update
    ema_decay: float = 0.999  # 0 turns the EMA off


@dataclass
class TrainConfig:
    # Every step count is in micro-steps (one batch forward + backward); the optimizer updates
    # every optim.grad_accum micro-steps. Event intervals must be multiples of grad_accum.
    run_dir: str = "runs/hifi_tse"
    batch_size: int = 2
    total_steps: int = 1_500_000
    phase2_step: int = 100_000  # target-absent samples and noisy references from here
    noisy_ref_ramp: list[int] = field(default_factory=lambda: [100_000, 150_000])
    noisy_ref_max_prob: float = 0.5
    # SIR curriculum: target-present mixtures start with every SIR raised by sir_boost_db, the
    # boost falling linearly to 0 at sir_boost_steps. The target is then the louder voice at
    # first, so the model learns to separate voices before it must pick one by the reference.
    sir_boost_db: float = 0.0
    sir_boost_steps: int = 0
    # Its opposite, a curriculum for selection: the first selection_steps steps draw
    # two-speaker mixtures at exactly 0 dB SIR, dry and noise-free (the learning ladder's rung
    # 2), where only the reference tells which voice to keep; the full mixtures follow.
    selection_steps: int = 0
    # Twins for the first twin_steps steps: every second item is the one before with the
    # roles of the target and its first interferer exchanged (that voice as the target, made
    # as target_type makes targets, with its own reference), so each batch holds two answers
    # to the same mixture and ignoring the reference cannot lower the loss. Any mixture: the
    # selection curriculum's or the full ones. Needs an even batch_size.
    twin_steps: int = 0
    precision: str = "bf16"  # fp32 | bf16 | fp16 (fp16 only on CUDA, with a GradScaler)
    log_every: int = 100
    val_every: int = 5000
    ckpt_every: int = 5000
    keep_checkpoints: int = 5  # rotation of step_*.pt besides last.pt and best.pt
    early_stop_patience: int = 20  # validations without a better SI-SDRi; 0 never stops
    max_nonfinite: int = 20  # skipped updates in a row before the run stops
    n_val_audio: int = 3  # validation samples written to TensorBoard as audio + spectrogram
    # Swap pairs of the validation speakers (evaluation/selection.py) run at every validation:
    # select_acc and ref_sens in train.log and TensorBoard show whether and when the model
    # starts to follow its reference. Dry pairs: a model that ignores the reference scores 0.5.
    n_val_pairs: int = 8
    max_minutes: float = 0.0  # wall-clock budget; 0 = none (the demo trains for a fixed time)
    progress_bar: bool = False  # a tqdm bar on rank 0 (the log lines are still written)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: auto or cuda:LOCAL_RANK)
    # Per-block activation checkpointing: a runtime memory setting, not part of the model, so a
    # resumed run may turn it on or off (it was model.grad_checkpoint before; still accepted).
    grad_checkpoint: bool = True
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on CPU)
    seed: int = 1234


@dataclass
class DistillConfig:
    # A trained checkpoint of any extractor family (any models/registry.py family without an
    # objective of its own), at the student's sample rate. Its EMA weights, frozen and in eval
    # mode, give every batch a second target for loss.teacher_si_sdr; "" = no distillation.
    # The student's checkpoints record this path, not the teacher's weights: a resumed run
    # reloads the teacher from it.
    teacher_ckpt: str = ""


GAN_KINDS = ("hifigan", "metric")


@dataclass
class GanConfig:
    enabled: bool = False
    # hifigan: HiFi-GAN's multi-period + multi-scale discriminators on the waveform (LSGAN and
    # feature matching). metric: MetricGAN's discriminator (as in SEMamba) learns the normalised
    # wide-band PESQ of the estimate, and the generator is pushed towards a perfect score.
    kind: str = "hifigan"
    start_step: int = 1_200_000
    d_warmup_steps: int = 20_000  # discriminator-only updates before the generator sees it
    ramp_steps: int = 20_000  # adversarial weight ramps 0 -> full over this many steps
    # HiFi-GAN's generator objective: adversarial + feature matching (its sum over every layer,
    # doubled, see losses/adversarial.py), both with weight 1. With kind metric, adv_weight
    # weighs the metric loss and fm_weight is unused.
    adv_weight: float = 1.0
    fm_weight: float = 1.0
    lr: float = 2e-4
    periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])  # hifigan
    n_scales: int = 3  # hifigan
    metric_channels: int = 16  # metric: first convolution's width (SEMamba's), doubled per layer
    pesq_workers: int = 2  # metric: processes computing the PESQ targets during the step


EVAL_METRIC_GROUPS = ("core", "similarity", "dnsmos", "wer", "visqol")


@dataclass
class EvalConfig:
    n_samples: int = 200
    pesq_sr: int = 16_000  # wide-band PESQ is defined at 16 kHz
    use_ema: bool = True
    # Edges of the SNR bands of the breakdown (dB); the last band is closed: [10, 15].
    snr_band_edges_db: list[float] = field(default_factory=lambda: [-5.0, 0.0, 5.0, 10.0, 15.0])
    # Breakdown by the target's level over its loudest interferer (samples whose interferers
    # are known): where one interfering voice dominates, only selection helps.
    sir_band_edges_db: list[float] = field(default_factory=lambda: [-5.0, 0.0, 5.0])
    sdr: bool = False  # BSS-Eval SDR (mir_eval): seconds per sample at 48 kHz, so off by default
    device: str = "auto"  # auto | cpu | cuda | cuda:N (the generator; metrics run on the CPU)
    # Metric groups (evaluation/metrics.py): core (SI-SDR, PESQ, STOI, LSD, confusion, TA),
    # similarity (Resemblyzer speaker embeddings, 0.3 s of CPU per sample), wer (PocketSphinx,
    # samples with a transcript: ~3 s each), dnsmos (DNSMOS and personalised DNSMOS: ~14 s of
    # CPU per 4 s sample, so asked for, as is visqol, ViSQOL v3 audio mode at 48 kHz).
    metrics: list[str] = field(default_factory=lambda: ["core", "similarity", "wer"])


@dataclass
class Config:
    stft: StftConfig = field(default_factory=StftConfig)
    # The chosen family's arguments (models/registry.py); the YAML section holds ``arch`` and
    # that family's keys.
    model: Any = field(default_factory=HiFiTSEArgs)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    standard: StandardSetConfig = field(default_factory=StandardSetConfig)


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """``{"arch": family, **constructor keywords}`` of the configured model: what
    ``models.registry.build_model`` builds and what a checkpoint stores as ``model_args``."""
    return registry.model_args(cfg.model, asdict(cfg.stft))


# ---------------------------------------------------------------------------------------------
# Type checking of loaded values
# ---------------------------------------------------------------------------------------------


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only) or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': {value!r} is not of type {tp}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads `3e-4` (no dot) as a string; accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is type(None) and value is None:
        return None
    # bool is a subclass of int: `n_blocks: true` must not pass as an int.
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}': expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


# Keys that moved to another section: files and checkpoints that use the old place still load.
MOVED_KEYS = {("model", "grad_checkpoint"): ("train", "grad_checkpoint")}

# Two-value settings: (low, high) ranges, checked for length and order when a config loads, so
# a typo fails at start-up rather than when the sampler first draws from it days later.
RANGE_KEYS = (
    "data.level_db", "data.sir_db", "data.snr_db", "data.ref_level_db", "data.ref_snr_db",
    "data.speed_perturb", "train.noisy_ref_ramp",
)


def resolve_milliseconds(cfg: Config) -> None:
    """Turn every non-zero ``<key>_ms`` of the stft and model sections into ``<key>`` samples at
    ``stft.sample_rate`` (``models.registry.millisecond_keys``); raise naming the key when the
    time is shorter than a sample."""
    rate = cfg.stft.sample_rate
    if rate < 1:
        raise ConfigError(f"config key 'stft.sample_rate': expected a positive rate, got {rate}")
    for section in ("stft", "model"):
        values = getattr(cfg, section)
        for ms_key, key in registry.millisecond_keys(values).items():
            ms = getattr(values, ms_key)
            if not ms:
                continue
            samples = round(ms * rate / 1000)
            if samples < 1 or ms < 0:
                raise ConfigError(f"config key '{section}.{ms_key}': {ms} ms is less than one "
                                  f"sample at {rate} Hz")
            setattr(values, key, samples)


def check_ranges(cfg: Config) -> None:
    """Resolve the millisecond keys (``resolve_milliseconds``), then raise naming the key
    unless every range is ``[low, high]`` with ``low <= high`` and ``optim.betas`` is two
    numbers in [0, 1)."""
    resolve_milliseconds(cfg)
    for name in RANGE_KEYS:
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if len(value) != 2:
            raise ConfigError(f"config key '{name}': expected [low, high], got {value!r}")
        if value[0] > value[1]:
            raise ConfigError(f"config key '{name}': low {value[0]} is above high {value[1]}")
    family = registry.family(registry.arch_of(cfg.model))
    for term, weight in asdict(cfg.loss).items():
        if weight and term in registry.AUX_TERMS and term not in family.aux_terms:
            raise ConfigError(f"config key 'loss.{term}': arch {family.name} has no such output "
                              f"(only {', '.join(family.aux_terms) or 'the estimate'})")
    _check_distill(cfg, family)
    if family.objective is not None:
        # A family trained by an objective of its own (the refiner) gives the trainer an
        # estimate without a gradient: any other weight, or a GAN, would train nothing.
        if not getattr(cfg.loss, family.objective):
            raise ConfigError(f"config key 'loss.{family.objective}': arch {family.name} trains "
                              "by this term alone; it must be > 0")
        others = [k for k, w in asdict(cfg.loss).items() if w and k != family.objective]
        if others:
            raise ConfigError(f"config key 'loss.{others[0]}': arch {family.name} trains by "
                              f"loss.{family.objective} alone; set the others to 0")
        if cfg.gan.enabled:
            raise ConfigError(f"config key 'gan.enabled': arch {family.name} has no GAN phase")
    embedding = getattr(cfg.model, "speaker_embedding", None)
    if embedding is not None and embedding not in SPEAKER_EMBEDDINGS:
        raise ConfigError(f"config key 'model.speaker_embedding': expected one of "
                          f"{', '.join(SPEAKER_EMBEDDINGS)}, got {embedding!r}")
    layer = getattr(cfg.model, "sequence_layer", None)  # hifi_tse's TF-GridNet paths
    if layer is not None and layer not in SEQUENCE_LAYERS:
        raise ConfigError(f"config key 'model.sequence_layer': expected one of "
                          f"{', '.join(SEQUENCE_LAYERS)}, got {layer!r}")
    for name in ("snr_band_edges_db", "sir_band_edges_db"):
        edges = getattr(cfg.eval, name)
        if not edges or list(edges) != sorted(set(edges)):
            raise ConfigError(f"config key 'eval.{name}': expected increasing band edges, "
                              f"got {edges!r}")
    for name in ("reverb_prob", "noise_prob"):
        if not 0.0 <= getattr(cfg.data, name) <= 1.0:
            raise ConfigError(f"config key 'data.{name}': expected a probability in [0, 1], "
                              f"got {getattr(cfg.data, name)}")
    if len(cfg.data.speaker_pair) not in (0, 2):
        raise ConfigError(f"config key 'data.speaker_pair': expected [target, interferer] "
                          f"speaker names, got {cfg.data.speaker_pair!r}")
    if cfg.train.n_val_pairs < 0:
        raise ConfigError(f"config key 'train.n_val_pairs': expected >= 0, got "
                          f"{cfg.train.n_val_pairs}")
    unknown = sorted(set(cfg.eval.metrics) - set(EVAL_METRIC_GROUPS))
    if unknown:
        raise ConfigError(f"config key 'eval.metrics': unknown groups {', '.join(unknown)} "
                          f"(known: {', '.join(EVAL_METRIC_GROUPS)})")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(
            f"config key 'optim.betas': expected two numbers in [0, 1), got {betas!r}"
        )
    _check_gan(cfg.gan)
    _check_standard(cfg)


def _check_standard(cfg: Config) -> None:
    """The layout names a known set (train.py adds the rules of training on one)."""
    s = cfg.standard
    if s.layout not in STANDARD_LAYOUTS:
        raise ConfigError(f"config key 'standard.layout': expected one of "
                          f"{', '.join(repr(x) for x in STANDARD_LAYOUTS)}, got {s.layout!r}")


def _check_distill(cfg: Config, family: registry.Family) -> None:
    """Only an extractor learns from a teacher (its pairing with loss.teacher_si_sdr:
    ``check_pairs``). The teacher's own family and rate are checked where it is loaded
    (training/nets.py): that needs its file, which a stored config no longer has to find."""
    teacher = cfg.distill.teacher_ckpt
    if teacher and family.objective is not None:
        raise ConfigError(f"config key 'distill.teacher_ckpt': arch {family.name} trains by "
                          f"loss.{family.objective} alone and cannot be a distillation student")


def check_pairs(cfg: Config) -> None:
    """Keys that only make sense together, checked once every file and override is in (a
    file may set one and a later file the other)."""
    teacher, weight = cfg.distill.teacher_ckpt, cfg.loss.teacher_si_sdr
    if weight and not teacher:
        raise ConfigError("config key 'loss.teacher_si_sdr': needs a teacher; set "
                          "distill.teacher_ckpt")
    if teacher and not weight:
        # A teacher that no term reads would cost a forward per micro-step for nothing.
        raise ConfigError("config key 'distill.teacher_ckpt': needs loss.teacher_si_sdr > 0")


def _check_gan(gan: GanConfig) -> None:
    if gan.kind not in GAN_KINDS:
        raise ConfigError(f"config key 'gan.kind': expected one of {', '.join(GAN_KINDS)}, "
                          f"got {gan.kind!r}")
    for key in ("metric_channels", "pesq_workers"):
        if getattr(gan, key) < 1:
            raise ConfigError(f"config key 'gan.{key}': must be >= 1, got {getattr(gan, key)}")


def _set_arch(cfg: Config, value: Any) -> None:
    """``model.arch``: another family replaces the model section by that family's defaults."""
    try:
        fam = registry.family(_check(value, str, "model.arch"))
    except ValueError as err:
        raise ConfigError(f"config key 'model.arch': {err}") from None
    if type(cfg.model) is not fam.args:
        cfg.model = fam.args()


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    section, key = MOVED_KEYS.get((section, key), (section, key))
    sections = _section_types(Config)
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}' (known: {', '.join(sections)})")
    if (section, key) == ("model", registry.ARCH_KEY):
        _set_arch(cfg, value)
        return
    sub = getattr(cfg, section)
    fields = _section_types(type(sub))
    if key not in fields:
        family = f" (not an argument of arch {registry.arch_of(sub)})" if section == "model" else ""
        raise ConfigError(f"unknown config key '{section}.{key}'{family}")
    setattr(sub, key, _check(value, fields[key], f"{section}.{key}"))
    # A sample count and its millisecond alternative: the one written last wins.
    for ms_key, samples_key in registry.millisecond_keys(sub).items():
        if key == samples_key:
            setattr(sub, ms_key, 0.0)


def _apply_raw(cfg: Config, raw: dict[str, Any] | None) -> None:
    for section, values in (raw or {}).items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
        if section == "model" and registry.ARCH_KEY in values:  # the family first, then its keys
            values = {registry.ARCH_KEY: values[registry.ARCH_KEY], **values}
        for key, value in values.items():
            _apply(cfg, section, key, value)


def from_dict(raw: dict[str, Any] | None) -> Config:
    """Build a ``Config`` from nested mappings; unknown keys and wrong types raise."""
    cfg = Config()
    _apply_raw(cfg, raw)
    check_ranges(cfg)
    check_pairs(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings; the value is parsed as YAML (``[1, 2]``, ``true``)."""
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name.count(".") != 1:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        section, key = name.split(".")
        _apply(cfg, section, key, yaml.safe_load(text))
    check_ranges(cfg)
    check_pairs(cfg)
    return cfg


def load_config(
    path: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults, then the YAML file(s) at ``path`` in order (a later file overrides an earlier
    one key by key; a file that sets another ``model.arch`` starts that family's section from
    its defaults), then the ``--set`` overrides."""
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    cfg = Config()
    for file in map(Path, paths):
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{file}: cannot read config: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: a config must be a mapping of sections")
        try:
            _apply_raw(cfg, raw)
            check_ranges(cfg)
        except ConfigError as err:
            raise ConfigError(f"{file}: {err}") from None
    return apply_overrides(cfg, overrides or [])


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain values; the model section starts with its ``arch``."""
    raw = asdict(cfg)
    raw["model"] = {registry.ARCH_KEY: registry.arch_of(cfg.model), **raw["model"]}
    return raw


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML; ``from_dict(yaml.safe_load(...))`` gives it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
