"""The model families that train.py, evaluate.py and inference.py run, and the one place that
builds a model from its arguments or a checkpoint.

A family is a module with a typed dataclass of arguments (``model`` config section, besides
``arch``) and a model class that keeps one contract, so that no caller asks which family it
holds:

- ``forward(mix (B, N), ref (B, M), *, with_aux=False)`` returns the estimate (B, N), exactly N
  samples for any N and M, or ``(estimate, aux)`` where ``aux`` holds what the family's own
  loss terms need (``Family.aux_terms``);
- ``encode_reference(ref)`` once, then ``extract(mix, z_ref, scale=None)`` for any number of
  windows (``scale`` (B, 1): one level for a whole recording);
- scale-equivariant: the estimate of ``a * mix`` is ``a * estimate``;
- ``sample_rate`` and a runtime ``grad_checkpoint`` flag (set by the trainer).

A family with an ``objective`` of its own (the score-based refiner) is not trained through its
estimate: while training, its ``forward`` also takes ``target=`` and returns that objective
per item in ``aux``. An optional hook: ``validation()``, a context that train.py's validations
run in (the refiner samples fewer steps there). A two-stage family (``takes_first_stage``) is
handed its first stage, built here from its ``first_stage`` model_args; ``load_first_stage``
copies the weights of its ``first_stage_ckpt`` into it when a training run starts.

Checkpoints store ``model_args = {"arch": name, **constructor keywords}``; those written before
families existed have no ``arch`` and are ``hifi_tse``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.hifi_tse.generator import Generator, HiFiTSEArgs
from models.refiner.refiner import SGMSERefiner, SGMSERefinerArgs
from models.semamba import SEMambaTSE, SEMambaTSEArgs
from models.spex_plus import SpExPlus, SpExPlusArgs
from models.td_speakerbeam import TDSpeakerBeam, TDSpeakerBeamArgs

ARCH_KEY = "arch"
DEFAULT_ARCH = "hifi_tse"
STFT_KEYS = ("sample_rate", "n_fft", "win_length", "hop_length")  # the stft config section
# A sample-count field ``<key>`` may have a time alternative ``<key>_ms`` in the same section;
# config.py turns a non-zero one into samples at the sample rate. Only the samples reach a
# constructor and a checkpoint.
MS_SUFFIX = "_ms"


def millisecond_keys(section: Any) -> dict[str, str]:
    """``{"<key>_ms": "<key>"}`` for the sample-count fields of the dataclass (or instance)
    ``section`` that have a millisecond alternative."""
    names = {f.name for f in dataclasses.fields(section)}
    return {n: n.removesuffix(MS_SUFFIX) for n in sorted(names)
            if n.endswith(MS_SUFFIX) and n.removesuffix(MS_SUFFIX) in names}


def constructor_keywords(args: Any) -> dict[str, Any]:
    """The fields of a family's arguments (or of the stft section) that its constructor takes:
    all but the millisecond alternatives."""
    skip = millisecond_keys(args)
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in skip}


# Constructor arguments that checkpoints written by earlier versions carry and the families no
# longer take (grad_checkpoint is now train.grad_checkpoint).
LEGACY_MODEL_ARGS = ("grad_checkpoint",)


def current_model_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` of a checkpoint of any version, without the keys that were retired."""
    return {k: v for k, v in model_args.items() if k not in LEGACY_MODEL_ARGS}


class CheckpointError(ValueError):
    """A file that is not a usable HiFi-TSE checkpoint; the message names the file."""


def one_line(text: str) -> str:
    """A checkpoint loader's message on one line, without torch's advice to unpickle anyway."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # terminal colour codes
    unpickler = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if unpickler:
        path = text.split(": ", 1)[0]
        reason = unpickler.group(1).split(". Please")[0].rstrip(".")
        if "Unsupported global" in reason:
            return (
                f"{path}: not a HiFi-TSE checkpoint (it holds pickled objects other than "
                f"tensors, which are never unpickled: {reason})"
            )
        return f"{path}: not a HiFi-TSE checkpoint (not a torch.save file: {reason})"
    return " ".join(text.split())


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A HiFi-TSE checkpoint's dict, read once with ``weights_only=True``, with one-line errors
    naming ``path``.

    A file in torch's zip format is memory-mapped: a training checkpoint's optimizer and
    discriminator states are never copied into memory, only what ``build_generator`` takes.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        ckpt = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as err:  # torch raises many types for a non-checkpoint file
        raise CheckpointError(one_line(f"{path}: not a loadable checkpoint ({err})")) from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "generator" not in ckpt:
        raise CheckpointError(f"{path}: not a HiFi-TSE checkpoint (no model_args/generator)")
    return ckpt


@dataclass(frozen=True)
class Family:
    """One registered model family."""

    name: str
    args: type  # dataclass of the family's model arguments (the ``model`` section)
    model: type[nn.Module]
    # Whether the model's constructor takes the whole stft section (a spectral model whose
    # STFT is part of it) or only the sample rate (a time-domain model).
    takes_stft: bool
    # Loss terms (``loss`` section names) that only this family's auxiliary outputs feed.
    aux_terms: tuple[str, ...] = ()
    # The aux term that is the family's whole training objective (its forward takes the target
    # while training); None: the estimate is what the loss section trains.
    objective: str | None = None
    # A two-stage family: its constructor is handed the first stage, built from the
    # ``first_stage`` model_args here, so that no family imports the registry.
    takes_first_stage: bool = False


FAMILIES: dict[str, Family] = {
    "hifi_tse": Family("hifi_tse", HiFiTSEArgs, Generator, takes_stft=True,
                       aux_terms=("speaker_ce",)),
    "td_speakerbeam": Family("td_speakerbeam", TDSpeakerBeamArgs, TDSpeakerBeam,
                             takes_stft=False, aux_terms=("speaker_ce",)),
    "spex_plus": Family("spex_plus", SpExPlusArgs, SpExPlus, takes_stft=False,
                        aux_terms=("si_sdr_middle", "si_sdr_long", "speaker_ce")),
    # A spectral model with an STFT of its own (SEMambaTSEArgs), not the stft section's.
    "semamba": Family("semamba", SEMambaTSEArgs, SEMambaTSE, takes_stft=False,
                      aux_terms=("compressed_mag", "antiwrap_phase", "compressed_complex",
                                 "consistency")),
    # A first stage of any family (models/refiner/refiner.py) and a score network trained by its
    # SDE's loss alone.
    "sgmse_refiner": Family("sgmse_refiner", SGMSERefinerArgs, SGMSERefiner, takes_stft=False,
                            aux_terms=("score_matching",), objective="score_matching",
                            takes_first_stage=True),
}


# Every family-specific loss term: a non-zero weight needs a family that produces it.
AUX_TERMS = frozenset(term for fam in FAMILIES.values() for term in fam.aux_terms)


def family(arch: str) -> Family:
    """The family named ``arch``; a ValueError naming the known ones otherwise."""
    if arch not in FAMILIES:
        raise ValueError(f"unknown model arch {arch!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[arch]


def arch_of(args: Any) -> str:
    """The family name of a model-arguments dataclass instance."""
    for fam in FAMILIES.values():
        if type(args) is fam.args:
            return fam.name
    raise TypeError(f"{type(args).__name__} is not the arguments of a registered family")


def model_args(args: Any, stft: dict[str, Any]) -> dict[str, Any]:
    """``{"arch": name, **keywords}``: what builds the model and what a checkpoint stores.
    ``stft`` is the stft config section as a mapping."""
    fam = family(arch_of(args))
    base = {k: stft[k] for k in STFT_KEYS} if fam.takes_stft else {
        "sample_rate": stft["sample_rate"]}
    keywords = constructor_keywords(args)
    if keywords.get("first_stage_ckpt"):
        # A two-stage model records its first stage's arguments, so that its own checkpoint
        # rebuilds it without the first stage's file.
        path = Path(keywords["first_stage_ckpt"])
        keywords["first_stage"] = read_checkpoint(path)["model_args"]
    if keywords.get("first_stage"):
        keywords["first_stage"] = normalised_args(keywords["first_stage"])
    return {ARCH_KEY: fam.name, **base, **keywords}


def normalised_args(args: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``model_args`` of any version as ``model_args`` writes them today: with
    ``arch`` (``hifi_tse`` before families existed), without retired keys, and with keys added
    since at their defaults, which its model was built with (so that an older run resumes)."""
    arch = args.get(ARCH_KEY, DEFAULT_ARCH)
    defaults = constructor_keywords(family(arch).args())
    args = {ARCH_KEY: arch, **defaults, **current_model_args(args)}
    if args.get("first_stage"):
        args["first_stage"] = normalised_args(args["first_stage"])
    return args


def build_model(args: dict[str, Any]) -> nn.Module:
    """The model that ``args`` (``model_args``, or a checkpoint's) describes."""
    args = normalised_args(args)
    fam = family(args.pop(ARCH_KEY))
    if fam.takes_first_stage:
        args["first_stage"] = build_model(args["first_stage"]) if args["first_stage"] else None
    return fam.model(**args)


def validation_context(model: nn.Module) -> contextlib.AbstractContextManager[object]:
    """The context train.py validates ``model`` in: its ``validation()`` where it has one."""
    hook = getattr(model, "validation", None)
    return hook() if hook is not None else contextlib.nullcontext()


def checkpoint_payload(model: nn.Module, args: dict[str, Any]) -> dict[str, Any]:
    """The minimal checkpoint dict that ``model_from_payload`` understands."""
    return {"model_args": dict(args), "generator": model.state_dict()}


def model_from_payload(
    ckpt: dict[str, Any], *, use_ema: bool = True, name: str = "checkpoint"
) -> nn.Module:
    """The model a checkpoint dict (``read_checkpoint``) describes, with its EMA weights when
    ``use_ema`` and it has them, else the raw ones; errors name ``name``. A caller that needs
    more of the checkpoint (evaluate.py: its config and step) reads the file once."""
    try:
        model = build_model(ckpt["model_args"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(
            f"{name}: not a HiFi-TSE checkpoint (model_args: {one_line(str(err))[:200]})"
        ) from None
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["generator"]
    try:
        model.load_state_dict(state)
    except (TypeError, RuntimeError) as err:  # e.g. written by an older version of the model
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{name}: weights do not fit this model ({first})") from None
    return model


def load_model(path: str | Path, *, use_ema: bool = True) -> nn.Module:
    """The model of a checkpoint file, whatever its family."""
    path = Path(path)
    return model_from_payload(read_checkpoint(path), use_ema=use_ema, name=str(path))


def load_first_stage(model: nn.Module) -> None:
    """A two-stage model's first stage gets the (EMA) weights of its ``first_stage_ckpt``: the
    start of a training run (the two-stage model's own checkpoints hold them)."""
    path = getattr(model, "first_stage_ckpt", "")
    if path:
        model.first_stage.load_state_dict(load_model(path).state_dict())
