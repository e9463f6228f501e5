"""Find the speech, noise and RIR files of the configured corpora and describe them.

Every scanner reads only file headers (``soundfile.info``), never decodes audio, and returns
plain manifest entries (dicts) plus the files it could not use. Speaker ids follow a per-layout
rule (a regex on the path below the source root) that the config may replace:

============  ===============================================  ========================
layout        example path below ``root``                      speaker id
============  ===============================================  ========================
dns4          ``book_11284_chp_0013_reader_05262_9_seg_1.wav`` ``dns4_reader_05262``
ears          ``p001/emo_adoration_freeform.wav``              ``ears_p001``
vctk          ``p225/p225_001_mic1.flac`` (mic1 only)          ``vctk_p225``
generic       ``Actor_01/any/depth/x.flac``                    ``<name>_Actor_01``
============  ===============================================  ========================
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf

from config import ConfigError

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac")
HEADER_THREADS = 8  # header reads wait on the disk, not the CPU

SPEECH_LAYOUTS = ("dns4", "ears", "vctk", "generic")
NOISE_LAYOUTS = ("demand", "generic")
RIR_LAYOUTS = ("slr26", "slr28", "generic")
RIR_CHANNEL_MODES = ("first", "all", "mix")

# (regex searched in the posix path below the source root, speaker id prefix). The regex's
# first group is the speaker; ``None`` as prefix means "<source name>_".
_SPEAKER_RULES: dict[str, tuple[str, str | None]] = {
    "dns4": (r"reader_(\d+)", "dns4_reader_"),
    "ears": (r"(?:^|/)(p\d+)/[^/]+$", "ears_"),
    "vctk": (r"(?:^|/)([ps]\d+)/[^/]+$", "vctk_"),
    "generic": (r"^([^/]+)/", None),
}
_SPEECH_KEYS = {"layout", "root", "name", "speaker_regex", "speaker_prefix", "mic"}
_NOISE_KEYS = {"layout", "root", "name", "channels"}
_RIR_KEYS = {"layout", "root", "name", "channels"}
_DEMAND_CHANNEL = re.compile(r"^ch(\d+)$", re.IGNORECASE)
_SLR26_ROOM = re.compile(r"(small|medium|large)room", re.IGNORECASE)


@dataclass
class ScanResult:
    """Entries of one kind (speech, noise or rir) and the files left out, with the reason."""

    entries: list[dict[str, Any]]
    problems: list[dict[str, str]]


# ---------------------------------------------------------------------------------------------
# Source specifications from the config
# ---------------------------------------------------------------------------------------------


def _normalise_spec(
    spec: str | dict[str, Any], *, where: str, layouts: tuple[str, ...], allowed: set[str]
) -> dict[str, Any]:
    """A source entry of the config as a checked mapping with ``layout``, ``root`` and ``name``."""
    if isinstance(spec, str):
        spec = {"layout": "generic", "root": spec}
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"config key '{where}': unknown option(s) {sorted(unknown)}")
    if "root" not in spec:
        raise ConfigError(f"config key '{where}': 'root' (the corpus folder) is missing")
    layout = spec.get("layout", "generic")
    if layout not in layouts:
        raise ConfigError(f"config key '{where}.layout': {layout!r} is not one of {layouts}")
    root = Path(spec["root"]).expanduser()
    default_name = root.name if layout == "generic" else layout
    name = str(spec.get("name", default_name))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"config key '{where}.name': {name!r} must be [A-Za-z0-9_.-]+")
    return {**spec, "layout": layout, "root": root, "name": name}


def _normalise_specs(
    sources: list[Any], where: str, *, layouts: tuple[str, ...], allowed: set[str]
) -> list[dict[str, Any]]:
    """Every source of one config key as a checked spec; source names must be unique."""
    specs = [
        _normalise_spec(s, where=f"{where}[{i}]", layouts=layouts, allowed=allowed)
        for i, s in enumerate(sources)
    ]
    names = [s["name"] for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config key '{where}': source names must be unique, repeated: {dupes}")
    return specs


def _audio_files(root: Path) -> list[Path]:
    """Every .wav / .flac below ``root``, sorted, following symlinked folders."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: corpus folder not found")
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found.extend(
            Path(folder) / f for f in sorted(files) if f.lower().endswith(AUDIO_EXTENSIONS)
        )
    return found


def _headers(paths: list[Path]) -> list[sf._SoundFileInfo | Exception]:
    """``soundfile.info`` of every path (header only), in order; an exception where it failed."""

    def info(path: Path) -> sf._SoundFileInfo | Exception:
        try:
            return sf.info(str(path))
        except Exception as err:  # any unreadable header is reported, never fatal
            return err

    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        return list(pool.map(info, paths))


def _key(name: str, root: Path, path: Path, channel: int | None = None) -> str:
    """HDF5 key of a file: ``<source>/<path below root without extension>[_chNN]``."""
    rel = path.relative_to(root).with_suffix("").as_posix()
    return f"{name}/{rel}" + ("" if channel is None else f"_ch{channel:02d}")


def _base_entry(
    kind: str, spec: dict[str, Any], path: Path, info: sf._SoundFileInfo
) -> dict[str, Any]:
    return {
        "key": _key(spec["name"], spec["root"], path),
        "path": str(path.resolve()),
        "kind": kind,
        "source": spec["name"],
        "layout": spec["layout"],
        "duration": round(info.frames / info.samplerate, 6),
        "sample_rate": int(info.samplerate),
        "channels": int(info.channels),
        "channel": None,  # None: downmix all channels
        "speaker": None,
        "split": "train",
    }


def _header_entries(
    kind: str, spec: dict[str, Any], paths: list[Path], problems: list[dict[str, str]]
) -> Iterable[tuple[Path, dict[str, Any]]]:
    for path, info in zip(paths, _headers(paths), strict=True):
        if isinstance(info, Exception):
            problems.append({"path": str(path), "error": f"unreadable header ({info})"})
        elif info.frames <= 0:
            problems.append({"path": str(path), "error": "empty audio (0 frames)"})
        else:
            yield path, _base_entry(kind, spec, path, info)


# ---------------------------------------------------------------------------------------------
# Scanners
# ---------------------------------------------------------------------------------------------


def speaker_rule(spec: dict[str, Any]) -> tuple[re.Pattern[str], str]:
    """The (regex, prefix) that names the speaker of a file of this source; see module doc."""
    default_regex, default_prefix = _SPEAKER_RULES[spec["layout"]]
    regex = spec.get("speaker_regex", default_regex)
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise ConfigError(
            f"speech source '{spec['name']}': bad speaker_regex {regex!r}: {err}"
        ) from None
    prefix = spec.get("speaker_prefix")
    if prefix is None:
        # A user regex replaces the layout's rule, so the layout prefix would be misleading.
        prefix = default_prefix if "speaker_regex" not in spec else None
    if prefix is None:
        prefix = f"{spec['name']}_"
    return pattern, str(prefix)


def scan_speech(sources: list[dict[str, Any]]) -> ScanResult:
    """Speech files of every source, with speaker ids and the validation split unset."""
    specs = _normalise_specs(
        sources, "data.speech_sources", layouts=SPEECH_LAYOUTS, allowed=_SPEECH_KEYS
    )
    entries: list[dict[str, Any]] = []
    problems: list[dict[str, str]] = []
    for spec in specs:
        pattern, prefix = speaker_rule(spec)
        paths = _audio_files(spec["root"])
        if spec["layout"] == "vctk":
            mic = str(spec.get("mic", "mic1"))
            paths = [p for p in paths if p.stem.endswith(f"_{mic}")]
        n_before = len(entries)
        for path, entry in _header_entries("speech", spec, paths, problems):
            match = pattern.search(path.relative_to(spec["root"]).as_posix())
            if match is None:
                problems.append({"path": str(path), "error": "no speaker id (rule did not match)"})
                continue
            entry["speaker"] = prefix + (match.group(1) if pattern.groups else match.group(0))
            entries.append(entry)
        log.info("speech source %s: %d files", spec["name"], len(entries) - n_before)
    return ScanResult(entries, problems)


def scan_noise(sources: list[str | dict[str, Any]]) -> ScanResult:
    """Noise files: DEMAND (chosen channels of each environment) or every file of a folder."""
    specs = _normalise_specs(sources, "data.noise_dirs", layouts=NOISE_LAYOUTS, allowed=_NOISE_KEYS)
    entries: list[dict[str, Any]] = []
    problems: list[dict[str, str]] = []
    for spec in specs:
        paths = _audio_files(spec["root"])
        if spec["layout"] == "demand":
            wanted = {int(c) for c in spec.get("channels", [1])}
            paths = [
                p
                for p in paths
                if (m := _DEMAND_CHANNEL.match(p.stem)) is not None and int(m.group(1)) in wanted
            ]
        entries.extend(entry for _, entry in _header_entries("noise", spec, paths, problems))
    return ScanResult(entries, problems)


def scan_rir(sources: list[str | dict[str, Any]]) -> ScanResult:
    """RIR files of SLR26 (room size from the path), SLR28 (noise recordings left out) or a folder.

    ``channels`` decides what a multi-channel file gives: ``first`` its channel 0, ``all`` one
    RIR per channel, ``mix`` the downmix. Defaults: ``first`` for slr28, ``mix`` otherwise.
    """
    specs = _normalise_specs(sources, "data.rir_dirs", layouts=RIR_LAYOUTS, allowed=_RIR_KEYS)
    entries: list[dict[str, Any]] = []
    problems: list[dict[str, str]] = []
    for i, spec in enumerate(specs):
        mode = spec.get("channels", "first" if spec["layout"] == "slr28" else "mix")
        if mode not in RIR_CHANNEL_MODES:
            raise ConfigError(
                f"config key 'data.rir_dirs[{i}].channels': {mode!r} is not one of "
                f"{RIR_CHANNEL_MODES}"
            )
        paths = _audio_files(spec["root"])
        if spec["layout"] == "slr28":
            # SLR28 ships isotropic noise recordings beside its RIRs; they are not RIRs.
            paths = [p for p in paths if "noise" not in p.stem.lower()]
        for path, entry in _header_entries("rir", spec, paths, problems):
            if spec["layout"] == "slr26":
                room = _SLR26_ROOM.search(path.relative_to(spec["root"]).as_posix())
                entry["room"] = room.group(1).lower() if room else None
            if entry["channels"] == 1 or mode == "mix":
                entries.append(entry)
            elif mode == "first":
                entries.append({**entry, "channel": 0})
            else:
                for ch in range(entry["channels"]):
                    key = _key(spec["name"], spec["root"], path, ch)
                    entries.append({**entry, "key": key, "channel": ch})
    return ScanResult(entries, problems)


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------


def n_validation(n_groups: int, val_fraction: float) -> int:
    """How many of ``n_groups`` sorted groups go to validation: the rounded fraction, at least
    one when there are two or more groups (and a positive fraction), never all of them, except
    ``val_fraction >= 1``: a held-out test corpus, all of it validation."""
    if val_fraction >= 1:
        return n_groups
    if n_groups < 2 or val_fraction <= 0:
        return 0
    return min(n_groups - 1, max(1, math.floor(val_fraction * n_groups + 0.5)))


def assign_splits(entries: list[dict[str, Any]], val_fraction: float) -> None:
    """Set ``split`` in place: per source, the last ``val_fraction`` of the sorted speaker ids
    (speech) or of the sorted keys (noise, RIR) are ``val``, the rest ``train``."""
    by_source: dict[str, set[str]] = {}
    for e in entries:
        by_source.setdefault(e["source"], set()).add(e["speaker"] or e["key"])
    val: set[tuple[str, str]] = set()
    for source, groups in by_source.items():
        ordered = sorted(groups)
        n_val = n_validation(len(ordered), val_fraction)
        val.update((source, g) for g in ordered[len(ordered) - n_val :])
    for e in entries:
        e["split"] = "val" if (e["source"], e["speaker"] or e["key"]) in val else "train"
