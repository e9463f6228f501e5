"""The swap test: does the reference decide which voice comes out?

A swap pair (``HiFiTSEDataset.swap_pair``) mixes two different speakers A and B at 0 dB SIR and
comes with a reference of each. The model runs twice on the one mixture: with A's reference and
with B's. Per pair:

* *selection*: a run is right when its output is closer, in SI-SDR, to the requested speaker
  than to the other one (both compared as heard in the mixture, so neither side has the dry
  signal's advantage); selection accuracy is the share of right runs;
* *SI-SDRi* of each run against the requested speaker, over the mixture's SI-SDR against it;
* *reference sensitivity*: ``10 log10(2 |y_A - y_B|^2 / (|y_A|^2 + |y_B|^2))`` in dB, how far
  the two outputs differ relative to their energy. A model that ignores its reference gives the
  same output twice: ``REF_SENS_FLOOR_DB``. Two outputs that are the two (uncorrelated, equally
  loud) voices differ by about +3 dB. A ``DEMO=shared`` checkpoint whose outputs for two
  references agreed to 26.9 dB SNR reads -26.9 dB.

What makes it honest: on the dry condition a model that ignores its reference returns one
output for both runs of a pair, which is closer to A or to B but not to both, so exactly one of
the two runs is right: 50 % accuracy, whatever the model does (ties aside). A model that returns
the requested source scores 100 %. ``tests/test_selection.py`` shows both.

Everything is batched over pairs in torch (float64 for the scores) with no host sync, so
``train.py`` runs it in its validation on any device; ``summarize`` adds bootstrap intervals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from evaluation.metrics import REF_SENS_FLOOR_DB
from losses.separation import ENERGY_EPS, si_sdr

BOOTSTRAP_DRAWS = 1000
CI_PERCENT = 95.0
# Speaker groups for same- / cross-group pairs: RAVDESS actors are male when odd, female when
# even; the synthetic demo voices are grouped by median pitch (corpus.json), below or above this.
PITCH_SPLIT_HZ = 165.0
RAVDESS_ACTOR = re.compile(r"Actor_(\d+)$")


def swap_scores(est: torch.Tensor, sources: torch.Tensor, mix: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Selection, SI-SDRi and reference sensitivity of a batch of swap pairs.

    Shape:
        est: (P, 2, N), the outputs with A's reference ([:, 0]) and with B's ([:, 1]);
        sources: (P, 2, N), A and B as heard in the mixture; mix: (P, N)
        returns: ``correct`` (P, 2) float (1 right, 0 wrong), ``si_sdri`` (P, 2) dB,
        ``ref_sens_db`` (P,)
    """
    est, sources, mix = est.double(), sources.double(), mix.double()
    p, _, n = est.shape
    # (P, run, source): SI-SDR of each run's output against each speaker.
    scores = si_sdr(est[:, :, None].expand(p, 2, 2, n).reshape(-1, n),
                    sources[:, None].expand(p, 2, 2, n).reshape(-1, n)).reshape(p, 2, 2)
    requested = torch.diagonal(scores, dim1=1, dim2=2)  # (P, 2): run r against source r
    other = scores.flip(2).diagonal(dim1=1, dim2=2)  # (P, 2): run r against source 1 - r
    mix_scores = si_sdr(mix[:, None].expand(p, 2, n).reshape(-1, n),
                        sources.reshape(-1, n)).reshape(p, 2)
    diff = (est[:, 0] - est[:, 1]).square().sum(-1)
    energy = est.square().sum(-1).sum(-1) / 2
    sens = 10 * torch.log10((diff + ENERGY_EPS) / (energy + ENERGY_EPS))
    # A tie (an all-zero output) is chance, not wrong twice.
    correct = (requested > other).double() + 0.5 * (requested == other).double()
    return {"correct": correct, "si_sdri": requested - mix_scores,
            "ref_sens_db": sens.clamp(min=REF_SENS_FLOOR_DB)}


def swap_batch(extract: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               mix: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Both runs of every pair in one call: all A runs, then all B runs, so that item ``p`` of
    either half is pair ``p`` (a family that seeds its sampling per batch item, the score-based
    refiner, then draws the same noise for both runs of a pair, and a reference-blind model
    still gives one output per pair).

    Shape:
        mix (P, N), refs (P, 2, M) -> (P, 2, N): the outputs with A's and with B's reference
    """
    p = mix.shape[0]
    est = extract(mix.repeat(2, 1), refs.transpose(0, 1).flatten(0, 1))  # (2P, N)
    return est.float().reshape(2, p, -1).transpose(0, 1)


def run_pairs(extract: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              pairs: Sequence[dict[str, Any]], *, batch_pairs: int = 8,
              device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """``swap_scores`` of every pair, ``extract(mix (B, N), ref (B, M)) -> (B, N)`` called on
    ``batch_pairs`` pairs (two runs each) at a time. Returns NumPy arrays, pairs in order."""
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(pairs), batch_pairs):
        chunk = pairs[start : start + batch_pairs]
        mix = torch.stack([torch.as_tensor(p["mix"]) for p in chunk]).to(device)  # (P, N)
        refs = torch.stack([torch.as_tensor(p["refs"]) for p in chunk]).to(device)  # (P, 2, M)
        sources = torch.stack([torch.as_tensor(p["sources"]) for p in chunk]).to(device)
        with torch.no_grad():
            est = swap_batch(extract, mix, refs)
        scores = swap_scores(est, sources, mix)
        for key, value in scores.items():
            out.setdefault(key, []).append(value.cpu().numpy())
    return {key: np.concatenate(values) for key, values in out.items()}


def speaker_group(name: str, pitch_hz: dict[str, float] | None = None) -> str | None:
    """``male``/``female`` for a RAVDESS actor (a name ending in ``Actor_NN``: odd male),
    ``low``/``high`` pitch for a voice of ``pitch_hz`` (the synthetic corpus's median F0, keyed
    by the voice's folder name; packed speaker names carry their source as a prefix,
    ``demotest_test003``), None when unknown."""
    for voice, f0 in (pitch_hz or {}).items():
        if name == voice or name.endswith(("_" + voice, "/" + voice)):
            return "low" if f0 < PITCH_SPLIT_HZ else "high"
    if match := RAVDESS_ACTOR.search(name):
        return "male" if int(match[1]) % 2 else "female"
    return None


def _figures(scores: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, float]:
    return {"select_acc": float(scores["correct"][idx].mean()),
            "si_sdri": float(scores["si_sdri"][idx].mean()),
            "ref_sens_db": float(scores["ref_sens_db"][idx].mean())}


def summarize(scores: dict[str, np.ndarray], *, seed: int = 0,
              draws: int = BOOTSTRAP_DRAWS) -> dict[str, Any]:
    """Selection accuracy, mean SI-SDRi and mean reference sensitivity over pairs, each with a
    bootstrap ``CI_PERCENT`` % interval (pairs resampled with replacement, ``draws`` times)."""
    n = len(scores["ref_sens_db"])
    if n == 0:
        return {"n_pairs": 0}
    point = _figures(scores, np.arange(n))
    rng = np.random.default_rng(seed)
    boot = [_figures(scores, rng.integers(0, n, size=n)) for _ in range(draws)]
    tail = (100.0 - CI_PERCENT) / 2
    out: dict[str, Any] = {"n_pairs": n}
    for key, value in point.items():
        values = [b[key] for b in boot]
        out[key] = value
        out[f"{key}_ci"] = [float(np.percentile(values, tail)),
                            float(np.percentile(values, 100.0 - tail))]
    return out


def summarize_by_group(scores: dict[str, np.ndarray], pair_groups: Sequence[str | None],
                       *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``summarize`` of all pairs, of same-group and of cross-group pairs (pairs whose
    speakers' groups are unknown count in ``all`` only)."""
    kinds = np.array([g or "" for g in pair_groups])
    out = {"all": summarize(scores, seed=seed)}
    for kind in ("same", "cross"):
        idx = np.flatnonzero(kinds == kind)
        if idx.size:
            out[kind] = summarize({k: v[idx] for k, v in scores.items()}, seed=seed)
    return out


def pair_kind(speakers: Sequence[str], pitch_hz: dict[str, float] | None = None) -> str | None:
    """``same`` or ``cross`` group for a pair of speakers, None when a group is unknown."""
    groups = [speaker_group(s, pitch_hz) for s in speakers]
    if None in groups:
        return None
    return "same" if groups[0] == groups[1] else "cross"


def fmt_ci(summary: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
    """``value [lo, hi]`` of a ``summarize`` figure."""
    if key not in summary or not math.isfinite(summary[key]):
        return "n/a"
    lo, hi = summary[f"{key}_ci"]
    return f"{summary[key] * scale:{spec}} [{lo * scale:{spec}}, {hi * scale:{spec}}]"
