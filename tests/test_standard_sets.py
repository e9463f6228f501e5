"""The readers of the standard TSE set layouts (data/standard_sets.py) on tiny copies of each
layout made of real speech (tests/standard_set_copies.py)."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data.standard_sets import (
    SetLayoutError,
    StandardSet,
    read_librimix,
    read_spex_lists,
    read_whamr,
    read_wsj0_2mix_extr,
)
from tests.standard_set_copies import (
    LIBRISPEECH_CHAPTERS,
    LIST_FAKE_PREFIX,
    WSJ0_SPEAKERS,
    make_librimix,
    make_spex_lists,
    make_whamr,
    make_wsj0_2mix_extr,
    write_espnet_enroll,
)

N_MIX = 3
LIBRISPEECH_SPEAKERS = {chapter.split("-")[0] for chapter in LIBRISPEECH_CHAPTERS}


@pytest.fixture(scope="module")
def librimix(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, Path]:
    """(Libri2Mix folder, 8k min test map): 8k min and 16k max copies in the same tree."""
    tmp = tmp_path_factory.mktemp("librimix")
    root, map_path = make_librimix(tmp, shared_data, n_mix=N_MIX)
    make_librimix(tmp, shared_data, rate="16k", mode="max", n_mix=N_MIX)
    return root, map_path


@pytest.fixture(scope="module")
def spex(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, dict]:
    """(list folder, the ``replace`` mapping that points its paths at the copy)."""
    tmp = tmp_path_factory.mktemp("spex")
    return make_spex_lists(tmp, shared_data, n_mix=N_MIX), {LIST_FAKE_PREFIX: str(tmp)}


@pytest.fixture(scope="module")
def whamr(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("whamr")
    root, lists = make_whamr(tmp, shared_data, n_mix=N_MIX)
    return root, lists, {LIST_FAKE_PREFIX: str(tmp)}


def rate_of(path: Path) -> int:
    return sf.info(path).samplerate


def check_files(standard: StandardSet) -> None:
    """Every file of every item exists at the layout's rate; the enrollment is another file than
    the target and any interferer; ids are unique."""
    assert len({item.id for item in standard.items}) == len(standard.items)
    for item in standard.items:
        files = [item.mix, item.target, *item.interferers]
        files += [item.enrollment] if item.enrollment else []
        for path in files:
            assert path.is_file(), path
            assert rate_of(path) == standard.sample_rate, path
        assert item.enrollment not in (item.target, *item.interferers)


def pcm16(path: Path) -> np.ndarray:
    return sf.read(path, dtype="int16")[0].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# LibriMix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mix_type", "per_mixture"),
                         [("mix_clean", 2), ("mix_both", 2), ("mix_single", 1)])
def test_librimix_items_per_mix_type(librimix: tuple[Path, Path], mix_type: str,
                                     per_mixture: int) -> None:
    root, _ = librimix
    standard = read_librimix(root, mix_type=mix_type)
    split_dir = root / "wav8k" / "min" / "test"
    assert standard.name == f"Libri2Mix 8k min {mix_type} test"
    assert (standard.sample_rate, standard.target_kind) == (8000, "dry")
    assert standard.skipped == []
    assert len(standard.items) == N_MIX * per_mixture
    check_files(standard)
    for item in standard.items:
        mixture, source = item.id.rsplit("_s", 1)
        utterances = mixture.split("_")
        assert item.mix == split_dir / mix_type / f"{mixture}.wav"
        assert item.target == split_dir / f"s{source}" / f"{mixture}.wav"
        assert item.enrollment is None  # no map given: drawn from the pool
        assert item.speaker == utterances[int(source) - 1].split("-")[0]
        assert item.speaker in LIBRISPEECH_SPEAKERS
        other = [split_dir / f"s{3 - int(source)}" / f"{mixture}.wav"]
        assert list(item.interferers) == ([] if mix_type == "mix_single" else other)
    # The pool: every source file of the split, each under its own speaker.
    pooled = [(speaker, path) for speaker, paths in standard.enrollment_pool.items()
              for path in paths]
    assert len(pooled) == N_MIX * 2
    for speaker, path in pooled:
        utterance = path.stem.split("_")[int(path.parent.name[1:]) - 1]
        assert utterance.split("-")[0] == speaker


def test_librimix_rate_and_mode_pick_their_folders(librimix: tuple[Path, Path]) -> None:
    root, _ = librimix
    low = read_librimix(root, rate="8k", mode="min")
    high = read_librimix(root, rate="16k", mode="max")
    assert (low.sample_rate, high.sample_rate) == (8000, 16000)
    check_files(low)
    check_files(high)
    assert [item.id for item in low.items] == [item.id for item in high.items]
    for a, b in zip(low.items, high.items, strict=True):
        assert a.mix.relative_to(root).parts[:3] == ("wav8k", "min", "test")
        assert b.mix.relative_to(root).parts[:3] == ("wav16k", "max", "test")
        # min cuts every source to the shortest, max pads them to the longest.
        low_sources = [sf.info(p).frames for p in (a.target, *a.interferers)]
        high_sources = [sf.info(p).frames for p in (b.target, *b.interferers)]
        assert sf.info(a.mix).frames == min(low_sources) == max(low_sources)
        assert sf.info(b.mix).frames == min(high_sources) == max(high_sources)
        assert sf.info(b.mix).duration > sf.info(a.mix).duration
    with pytest.raises(SetLayoutError, match=r"wav16k/min/metadata/mixture_test_mix_both\.csv"):
        read_librimix(root, rate="16k", mode="min")


def test_libri3mix_has_three_targets_per_mixture(tmp_path: Path, shared_data: Path) -> None:
    root, _ = make_librimix(tmp_path, shared_data, n_src=3, n_mix=N_MIX)
    standard = read_librimix(root, n_src=3, mix_type="mix_clean")
    assert standard.name == "Libri3Mix 8k min mix_clean test"
    assert len(standard.items) == N_MIX * 3
    assert all(len(item.interferers) == 2 for item in standard.items)
    check_files(standard)
    # A Libri3Mix CSV read as Libri2Mix: the header says it is not.
    with pytest.raises(SetLayoutError, match=r"mixture_test_mix_clean\.csv: header"):
        read_librimix(root, n_src=2, mix_type="mix_clean")


def map_lines(map_path: Path) -> list[list[str]]:
    return [line.split() for line in map_path.read_text().splitlines()]


def test_librimix_enrollments_from_the_speakerbeam_map(librimix: tuple[Path, Path]) -> None:
    root, map_path = librimix
    split_dir = root / "wav8k" / "min" / "test"
    standard = read_librimix(root, enrollment_map=map_path)
    assert standard.skipped == []
    assert len(standard.items) == N_MIX * 2
    check_files(standard)
    expected = {}
    for mixture, target_utt, enrollment_id in map_lines(map_path):
        source = mixture.split("_").index(target_utt) + 1
        expected[f"{mixture}_s{source}"] = split_dir / f"{enrollment_id}.wav"
    items = {item.id: item for item in standard.items}
    assert {key: item.enrollment for key, item in items.items()} == expected
    for item in standard.items:
        # A source of another mixture, another utterance of the same speaker.
        assert item.enrollment.stem != item.mix.stem
        enrollment_utt = item.enrollment.stem.split("_")[int(item.enrollment.parent.name[1:]) - 1]
        target_utt = item.mix.stem.split("_")[int(item.id[-1]) - 1]
        assert enrollment_utt != target_utt
        assert enrollment_utt.split("-")[0] == item.speaker
        assert item.enrollment in standard.enrollment_pool[item.speaker]


def test_librimix_enrollments_from_espnet_scp(librimix: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    root, map_path = librimix
    scps = write_espnet_enroll(map_path, root, tmp_path / "data" / "test")
    assert not Path(scps[0].read_text().split()[1]).is_absolute()  # resolved from the scp folder
    by_map = read_librimix(root, enrollment_map=map_path)
    by_scp = read_librimix(root, espnet_enroll=scps)
    assert by_scp.skipped == []
    assert [(i.id, i.enrollment.resolve()) for i in by_scp.items] == [
        (i.id, i.enrollment.resolve()) for i in by_map.items]
    # A line whose file does not exist: that item is skipped, and the line names the file.
    lines = scps[1].read_text().splitlines()
    key = lines[0].split()[0]
    lines[0] = f"{key} /nowhere/{key}.wav"
    scps[1].write_text("\n".join(lines) + "\n")
    standard = read_librimix(root, espnet_enroll=scps)
    assert len(standard.items) == N_MIX * 2 - 1
    assert len(standard.skipped) == 1
    assert f"/nowhere/{key}.wav" in standard.skipped[0]
    assert f"{key}_s2" in standard.skipped[0]


def test_librimix_skips_rows_it_cannot_use(tmp_path: Path, shared_data: Path) -> None:
    root, map_path = make_librimix(tmp_path, shared_data, n_mix=N_MIX)
    lines = map_lines(map_path)
    unknown = "1995-1826-0003_7021-85628-0011"
    own = [lines[0][0], lines[0][1], f"s1/{lines[0][0]}"]  # the target as its own enrollment
    edited = [own, *lines[2:], [unknown, "1995-1826-0003", f"s1/{lines[0][0]}"]]
    map_path.write_text("".join(" ".join(line) + "\n" for line in edited))
    standard = read_librimix(root, enrollment_map=map_path)
    assert len(standard.items) == N_MIX * 2 - 2
    assert len(standard.skipped) == 4
    text = "\n".join(standard.skipped)
    assert f"{map_path}:1: enrollment s1/{lines[0][0]} is the target utterance" in text
    assert (f"{map_path}:{len(edited)}: mixture {unknown} is not in mixture_test_mix_both.csv"
            in text)
    for dropped in (f"{lines[0][0]}_s1", f"{lines[1][0]}_s2"):  # no usable map line left
        assert f"{dropped}: no enrollment for" in text

    # A missing source file: both targets of its mixture go (as target and as interferer).
    gone = root / "wav8k" / "min" / "test" / "s2" / f"{lines[0][0]}.wav"
    gone.unlink()
    standard = read_librimix(root)
    assert len(standard.items) == N_MIX * 2 - 2
    assert len(standard.skipped) == 2
    assert all("mixture_test_mix_both.csv:2:" in line and str(gone) in line
               for line in standard.skipped)
    assert gone not in standard.enrollment_pool[lines[1][1].split("-")[0]]


def test_librimix_layout_errors(librimix: tuple[Path, Path], tmp_path: Path) -> None:
    root, map_path = librimix
    with pytest.raises(SetLayoutError, match=r"mixture_dev_mix_both\.csv: LibriMix metadata CSV"):
        read_librimix(root, split="dev")
    metadata = tmp_path / "Libri2Mix" / "wav8k" / "min" / "metadata"
    metadata.mkdir(parents=True)
    csv_path = metadata / "mixture_test_mix_both.csv"
    csv_path.write_text("mixture_ID,mixture_path,source_1_path,length\n")
    with pytest.raises(SetLayoutError, match=re.escape(f"{csv_path}: header")):
        read_librimix(tmp_path / "Libri2Mix")
    shutil.copy(root / "wav8k" / "min" / "metadata" / csv_path.name, csv_path)
    with pytest.raises(SetLayoutError, match="test: LibriMix split folder not found"):
        read_librimix(tmp_path / "Libri2Mix")
    with pytest.raises(SetLayoutError, match="enrollment map not found"):
        read_librimix(root, enrollment_map=tmp_path / "map_mixture2enrollment")
    for wrong, allowed in [({"rate": "48k"}, "'8k', '16k'"), ({"n_src": 4}, "2, 3"),
                           ({"mode": "mid"}, "'min', 'max'"), ({"split": "tt"}, "'dev', 'test'"),
                           ({"mix_type": "mix_noisy"}, "'mix_clean', 'mix_both', 'mix_single'")]:
        with pytest.raises(ValueError, match=allowed):
            read_librimix(root, **wrong)
    with pytest.raises(ValueError, match="not both"):
        read_librimix(root, enrollment_map=map_path, espnet_enroll=(map_path, map_path))


# ---------------------------------------------------------------------------------------------
# SpEx+ lists, WSJ0-2mix-extr
# ---------------------------------------------------------------------------------------------


def test_spex_lists(spex: tuple[Path, dict]) -> None:
    list_dir, replace = spex
    standard = read_spex_lists(list_dir, replace=replace)
    assert (standard.sample_rate, standard.target_kind) == (8000, "dry")
    assert standard.skipped == []
    assert len(standard.items) == N_MIX * 2
    assert set(Counter(item.mix for item in standard.items).values()) == {2}
    check_files(standard)
    for item in standard.items:
        enrollment_utt = item.id.split("_")[-1]
        source = int(item.target.parent.name[1])
        target_utt = item.mix.stem.split("_")[2 * (source - 1)]
        assert item.speaker == enrollment_utt[:3] == target_utt[:3]
        assert item.speaker in WSJ0_SPEAKERS
        assert enrollment_utt != target_utt
        assert item.enrollment.stem == enrollment_utt
        assert item.target.name == item.mix.name
        assert item.interferers == (item.target.parent.parent / f"s{3 - source}" / item.mix.name,)
        assert item.enrollment in standard.enrollment_pool[item.speaker]
    # Without the prefix mapping every path is the authors': each row skipped, naming it.
    unmapped = read_spex_lists(list_dir)
    assert unmapped.items == []
    assert len(unmapped.skipped) == N_MIX * 2
    assert f"{list_dir / 'mix.scp'}:1: {LIST_FAKE_PREFIX}/" in unmapped.skipped[0]


def test_spex_list_errors(spex: tuple[Path, dict], tmp_path: Path) -> None:
    list_dir, replace = spex
    copy = shutil.copytree(list_dir, tmp_path / "tt")
    aux = (copy / "aux.scp").read_text().splitlines()
    key = aux[2].split()[0]
    aux[2] = f"{key} {LIST_FAKE_PREFIX}/wsj0_8k/si_et_05/050/missing.wav"
    (copy / "aux.scp").write_text("\n".join(aux) + "\n")
    standard = read_spex_lists(copy, replace=replace)
    assert len(standard.items) == N_MIX * 2 - 1
    assert standard.skipped == [
        f"{key}: missing {copy / 'aux.scp'}:3: {replace[LIST_FAKE_PREFIX]}/wsj0_8k/si_et_05/050/"
        "missing.wav"]

    ref = (copy / "ref.scp").read_text().splitlines()
    (copy / "ref.scp").write_text("\n".join(ref[1:]) + "\n")
    with pytest.raises(SetLayoutError, match=rf"ref\.scp: keys differ .* 1 missing \(e\.g\. "
                                             rf"{ref[0].split()[0]}\)"):
        read_spex_lists(copy, replace=replace)
    (copy / "aux.scp").unlink()
    with pytest.raises(SetLayoutError, match=r"aux\.scp: list file not found"):
        read_spex_lists(copy, replace=replace)


def test_wsj0_2mix_extr(tmp_path: Path, shared_data: Path) -> None:
    root = make_wsj0_2mix_extr(tmp_path, shared_data, n=N_MIX)
    standard = read_wsj0_2mix_extr(root)
    assert standard.name == "WSJ0-2mix-extr 8k max tt"
    assert (standard.sample_rate, standard.target_kind) == (8000, "dry")
    assert standard.skipped == []
    assert len(standard.items) == N_MIX
    check_files(standard)
    for item in standard.items:
        target_utt, _, interferer_utt, _, enrollment_utt = item.id.split("_")
        assert item.speaker == target_utt[:3] == enrollment_utt[:3] != interferer_utt[:3]
        assert enrollment_utt != target_utt
        assert [p.parent.name for p in (item.mix, item.target, item.enrollment)] == [
            "mix", "s1", "aux"]
        assert item.mix.name == item.target.name == item.enrollment.name
    with pytest.raises(SetLayoutError, match=r"wav8k/min/tt/mix: WSJ0-2mix-extr folder"):
        read_wsj0_2mix_extr(root, mode="min")
    # Unusable rows: an enrollment that is the target utterance itself, or of another speaker
    # (files renamed so), and a missing enrollment file.
    split_dir = root / "wav8k" / "max" / "tt"
    fields = standard.items[0].id.split("_")
    renamed = ["_".join([*fields[:4], fields[0]]), "_".join([*fields[:4], fields[2]])]
    for name in renamed:
        for folder in ("mix", "aux", "s1"):
            shutil.copy(split_dir / folder / f"{standard.items[0].id}.wav",
                        split_dir / folder / f"{name}.wav")
    gone = standard.items[1].enrollment
    gone.unlink()
    standard = read_wsj0_2mix_extr(root)
    assert len(standard.items) == N_MIX - 1
    assert sorted(standard.skipped) == sorted([
        f"{split_dir / 'mix' / gone.name}: missing {gone}",
        f"{split_dir / 'mix' / renamed[0]}.wav: the enrollment is the target utterance "
        f"{fields[0]} itself",
        f"{split_dir / 'mix' / renamed[1]}.wav: the enrollment {fields[2]} is not of the target "
        f"speaker {fields[0][:3]} ({fields[0]})",
    ])


# ---------------------------------------------------------------------------------------------
# WHAMR!
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "kind"), [("anechoic", "dry"), ("reverb", "reverberant")])
def test_whamr_target_selection(whamr: tuple[Path, Path, dict], target: str, kind: str) -> None:
    root, lists, replace = whamr
    standard = read_whamr(root, target=target, lists=lists, replace=replace)
    split_dir = root / "wav8k" / "min" / "tt"
    assert standard.target_kind == kind
    assert standard.skipped == []
    assert len(standard.items) == N_MIX * 2
    check_files(standard)
    for item in standard.items:
        assert item.mix.parent == split_dir / "mix_both_reverb"
        source = int(item.target.parent.name[1])
        assert item.target == split_dir / f"s{source}_{target}" / item.mix.name
        assert item.interferers == (split_dir / f"s{3 - source}_{target}" / item.mix.name,)
        assert item.speaker == item.mix.stem.split("_")[2 * (source - 1)][:3]
        assert item.enrollment.parent.parent.name == "si_et_05"


def test_whamr_lists_and_choices(whamr: tuple[Path, Path, dict], tmp_path: Path) -> None:
    root, lists, replace = whamr
    clean = read_whamr(root, mix_type="mix_clean_anechoic", lists=lists, replace=replace)
    assert {item.mix.parent.name for item in clean.items} == {"mix_clean_anechoic"}
    # SpEx+ lists name the wsj0-2mix folders s1/s2: the same items.
    spex_style = shutil.copytree(lists, tmp_path / "tt")
    ref = spex_style / "ref.scp"
    ref.write_text(ref.read_text().replace("_anechoic/", "/"))
    same = read_whamr(root, mix_type="mix_clean_anechoic", lists=spex_style, replace=replace)
    assert same.items == clean.items
    with pytest.raises(ValueError, match="'mix_both_anechoic', 'mix_clean_anechoic'"):
        read_whamr(root, mix_type="mix_both", lists=lists)
    with pytest.raises(ValueError, match="'anechoic', 'reverb'"):
        read_whamr(root, target="dry", lists=lists)
    with pytest.raises(SetLayoutError, match="wav16k/min/tt/mix_both_reverb"):
        read_whamr(root, rate="16k", lists=lists)


def test_mixtures_are_the_sum_of_their_files(librimix: tuple[Path, Path],
                                             whamr: tuple[Path, Path, dict]) -> None:
    """The copies are real mixtures: a metric scored on them means what it means on the set."""
    root, _ = librimix
    split_dir = root / "wav8k" / "min" / "test"
    for item in read_librimix(root).items[::2]:
        noise = pcm16(split_dir / "noise" / item.mix.name)
        parts = pcm16(item.target) + sum(pcm16(p) for p in item.interferers)
        np.testing.assert_array_equal(pcm16(item.mix), parts + noise)
        single = split_dir / "mix_single" / item.mix.name
        np.testing.assert_array_equal(pcm16(single), pcm16(split_dir / "s1" / item.mix.name)
                                      + noise)
    root, lists, replace = whamr
    for item in read_whamr(root, target="reverb", lists=lists, replace=replace).items:
        noise = pcm16(item.mix.parent.parent / "noise" / item.mix.name)
        np.testing.assert_array_equal(pcm16(item.mix),
                                      pcm16(item.target) + pcm16(item.interferers[0]) + noise)
        dry = item.target.parent.parent / item.target.parent.name.replace("reverb", "anechoic")
        assert not np.array_equal(pcm16(item.target), pcm16(dry / item.target.name))
