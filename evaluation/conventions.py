"""How the published TSE results on the standard sets were scored (doc/standard_sets.md §1-2;
the numbers are in doc/benchmarks.md, "Published numbers to compare against"), so that
evaluate.py --standard prints its own numbers in the same terms.

Every evaluator checked there computes SI-SDR (SI-SNR) with the mean removed, against the clean
source of the target speaker, over both speakers of each test mixture as targets; some print
the absolute SI-SDR of the estimates (with or without the mixture's), some the improvement.
"""

from __future__ import annotations

from typing import Any

# The published test lists: how many (mixture, target) pairs a full split holds.
PUBLISHED_PAIRS = {
    ("librimix", 2): 6000,  # Libri2Mix test: 3000 mixtures x 2 targets (BUT map, ESPnet)
    ("librimix", 3): 9000,  # Libri3Mix test: 3000 x 3 (BUT map)
    ("spex_lists", 2): 6000,  # SpEx+ WSJ0-2mix tt list
    ("whamr", 2): 6000,  # the SpEx+ keys on WHAMR! (USEF-TSE)
    ("wsj0_2mix_extr", 2): 3000,  # max-protocol extr: the first speaker only
}

# Which published rows (doc/benchmarks.md) each set is compared with, and how they are printed.
COMPARE_WITH = {
    "librimix": "TD-SpeakerBeam, ESPnet egs2/librimix/tse1 (16 kHz min mix_both only; no "
                "8 kHz or Libri3Mix TSE number was found): absolute SI-SNR of the estimates "
                "and of the mixtures; the improvement is their difference",
    "spex_lists": "SpEx+ (SI-SDRi), X-TF-GridNet (absolute SI-SDR, mixture 0.0), USEF-TSE "
                  "(SI-SDRi), ESPnet TD-SpeakerBeam (absolute SI-SNR) on the 8 kHz min list",
    "whamr": "USEF-TSE on WHAMR! (mix_both_reverb, scored against the anechoic source)",
    "wsj0_2mix_extr": "SpEx / SpEx+ Tables 1-2 (max protocol; not reachable, doc/standard_sets.md)",
}


def convention_lines(layout: str, n_src: int, set_name: str, target_kind: str, n_pairs: int,
                     zero_mean: bool, means: dict[str, Any]) -> list[str]:
    """The lines evaluate.py prints and reports after a standard set: SI-SDR of the estimates,
    of the mixtures and the improvement, in the papers' convention, and what differs from it."""
    def db(name: str, fmt: str = ".2f") -> str:
        value = means.get(name)
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"{set_name}: SI-SDR {db('si_sdr')} dB, mixture SI-SDR {db('si_sdr_mix')} dB, "
        f"SI-SDRi {db('si_sdri', '+.2f')} dB over {n_pairs} (mixture, target) pairs "
        f"({'zero-mean' if zero_mean else 'mean kept in'} SI-SDR against the {target_kind} "
        "target)",
        f"compare with: {COMPARE_WITH[layout]} (doc/benchmarks.md)",
    ]
    published = PUBLISHED_PAIRS.get((layout, n_src))
    if published is not None and n_pairs != published:
        lines.append(f"not the published list: {n_pairs} pairs scored, the published test "
                     f"list has {published}")
    if not zero_mean:
        lines.append("not the papers' convention: --si-sdr torchmetrics keeps the mean")
    if target_kind != "dry":
        lines.append("not the papers' convention: the published WHAMR! numbers score the "
                     "anechoic (dry) target")
    return lines
