"""Distillation (``distill.teacher_ckpt``, ``loss.teacher_si_sdr``): a frozen teacher checkpoint
of one family teaches a student of another through train.py. The loss falls, the teacher stays
frozen and in eval mode, the student's checkpoint stands alone, a killed run resumes exactly,
and the combinations that cannot work are refused at start-up."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import train
from config import ConfigError, from_dict, load_config, model_kwargs
from losses.separation import si_sdr_loss
from models.registry import build_model, checkpoint_payload, load_model
from tests.packed_data import packed_subset
from tests.test_train import _batch, assert_resume_is_exact, log_lines, write_config
from training.loss_assembly import loss_terms, loss_weights, weighted_sum
from training.nets import build_nets, load_teacher
from training.step_log import StepLog
from training.validation import validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FIXTURES = REPO / "tests" / "fixtures" / "checkpoints"


def write_teacher(path: Path, config: str, *overrides: str, ema_seed: int | None = None) -> Path:
    """A checkpoint of the tiny ``config`` model with random weights (a teacher needs no
    training to be copied); with ``ema_seed``, an EMA entry of other weights, as a training
    checkpoint holds."""
    args = model_kwargs(load_config(CONFIGS / config, list(overrides)))
    torch.manual_seed(0)
    payload = checkpoint_payload(build_model(args), args)
    if ema_seed is not None:
        torch.manual_seed(ema_seed)
        payload["ema"] = build_model(args).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def distill_sets(teacher: Path | str, weight: float = 1.0) -> list[str]:
    return [f"distill.teacher_ckpt={teacher}", f"loss.teacher_si_sdr={weight}"]


def distill_sections(teacher: Path, weight: float = 1.0) -> dict[str, dict]:
    """The same as config sections (tests/test_train.py's ``write_config``)."""
    return {"distill": {"teacher_ckpt": str(teacher)}, "loss": {"teacher_si_sdr": weight}}


# ---------------------------------------------------------------------------------------------
# Config refusals (no data, no training)
# ---------------------------------------------------------------------------------------------


def test_distillation_needs_both_keys_and_two_extractors(tmp_path: Path) -> None:
    td_teacher = write_teacher(tmp_path / "td.pt", "td_speakerbeam_tiny.yaml")
    tiny = CONFIGS / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"'loss\.teacher_si_sdr': needs a teacher"):
        load_config(tiny, ["loss.teacher_si_sdr=1.0"])
    with pytest.raises(ConfigError, match=r"'distill\.teacher_ckpt': needs loss\.teacher_si"):
        load_config(tiny, [f"distill.teacher_ckpt={td_teacher}"])
    # One file may set the weight and a later one the teacher: checked once all are in.
    weight, path = tmp_path / "weight.yaml", tmp_path / "teacher.yaml"
    weight.write_text("loss:\n  teacher_si_sdr: 1.0\n")
    path.write_text(f"distill:\n  teacher_ckpt: {td_teacher}\n")
    assert load_config([tiny, weight, path]).distill.teacher_ckpt == str(td_teacher)
    # train.py says it in one line, before it touches any data.
    with pytest.raises(SystemExit, match=r"^error: config key 'loss\.teacher_si_sdr'"):
        train.main(["--config", str(tiny), "--set", "loss.teacher_si_sdr=1.0"])
    # The refiner is not a student ...
    with pytest.raises(ConfigError, match=r"sgmse_refiner trains by loss\.score_matching alone "
                                          "and cannot be a distillation student"):
        load_config(CONFIGS / "sgmse_refiner_tiny.yaml", distill_sets(td_teacher))
    # ... nor a teacher; a teacher at another rate, or no file, are refused where it loads.
    cpu = torch.device("cpu")
    refusals = {FIXTURES / "sgmse_refiner.pt": "holds arch sgmse_refiner, which trains by",
                write_teacher(tmp_path / "24k.pt", "td_speakerbeam_tiny.yaml",
                              "stft.sample_rate=24000"): "runs at 24000 Hz, the student at",
                tmp_path / "missing.pt": "missing.pt: no such file"}
    for teacher, message in refusals.items():
        cfg = load_config(tiny, distill_sets(teacher))  # the file is not read at load
        with pytest.raises(ConfigError, match=message) as err:
            load_teacher(cfg, cpu)
        assert str(err.value).startswith("config key 'distill.teacher_ckpt': ")
        assert "\n" not in str(err.value)
    assert load_teacher(load_config(tiny), cpu) is None  # no distillation: no teacher


# ---------------------------------------------------------------------------------------------
# The teacher in the step and in validation (random batches, no data)
# ---------------------------------------------------------------------------------------------


def test_teacher_stays_frozen_in_eval_mode_through_steps_and_validation(tmp_path: Path) -> None:
    teacher_path = write_teacher(tmp_path / "teacher.pt", "tiny.yaml", ema_seed=1)
    cfg = load_config(CONFIGS / "td_speakerbeam_tiny.yaml",
                      ["optim.grad_accum=1", *distill_sets(teacher_path)])
    torch.manual_seed(0)
    nets = build_nets(cfg, torch.device("cpu"))
    teacher = nets.teacher
    assert teacher is not None
    # The checkpoint's EMA weights, not its raw ones.
    saved = torch.load(teacher_path, weights_only=True)
    assert all(torch.equal(v, saved["ema"][k]) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(v, saved["generator"][k]) for k, v in saved["ema"].items())
    assert not any(m is teacher for m in nets.generator.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = {k: v.clone() for k, v in nets.generator.state_dict().items()}

    nets.generator.train()  # what the loop does; it must not reach the teacher
    step_log = StepLog()
    no_amp = contextlib.nullcontext()
    for step in range(3):
        batch = _batch([False, step == 2], seed=step)  # the last with a target-absent item
        train.micro_step(nets, cfg, batch, step=step, autocast=no_amp, step_log=step_log)
        train.update(nets, cfg, step + 1)
    stats = step_log.reduce(sorted(loss_weights(cfg)), torch.device("cpu"), ddp=False)
    assert torch.isfinite(torch.tensor(stats["teacher_si_sdr"]))
    assert step_log.counts["teacher_si_sdr"].item() == 5  # TP items only

    # Validation adds the same term, over TP items only, to the loss it logs.
    batch = _batch([False, True], seed=5)
    n = batch["mix"].shape[-1]
    no_pairs = {"mix": torch.zeros(0, n), "refs": torch.zeros(0, 2, n),
                "sources": torch.zeros(0, 2, n)}
    val, _ = validate(nets, cfg, [batch], autocast=no_amp, ddp=False, pairs=no_pairs)
    weights = loss_weights(cfg)
    with torch.no_grad():
        est = nets.ema(batch["mix"], batch["ref"])
        teacher_est = teacher(batch["mix"], batch["ref"])
        without = weighted_sum(loss_terms(est, batch, nets, weights), batch["is_ta"], weights)
        tp = (~batch["is_ta"]).float()
        term = si_sdr_loss(est, teacher_est, weights=tp)
    expected = without + weights["teacher_si_sdr"] * tp.mean() * term
    assert val["loss"] == pytest.approx(expected.item(), rel=1e-5)

    assert nets.generator.training
    assert not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed"
    changed = [not torch.equal(v, student[k]) for k, v in nets.generator.state_dict().items()
               if v.is_floating_point()]
    assert sum(changed) > len(changed) // 2, "the student did not train"


# ---------------------------------------------------------------------------------------------
# train.py end to end on real recordings: a tiny hifi_tse teaches a tiny td_speakerbeam
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_section(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    d = packed_subset(tmp_path_factory, shared_data)
    return {"manifest_dir": d.manifest_dir, "segment_seconds": 0.5, "ref_seconds": 0.5,
            "n_val_samples": 4, "num_workers": 0, "val_fraction": d.val_fraction}


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory: pytest.TempPathFactory, data_section: dict) -> Path:
    """The run directory of 24 steps of a td_speakerbeam student taught by hifi_tse alone
    (``loss.si_sdr`` 0: no term against the target); its teacher file is
    ``RUN/../teacher.pt``."""
    root = tmp_path_factory.mktemp("distill")
    teacher = write_teacher(root / "teacher.pt", "tiny.yaml")
    sections = distill_sections(teacher)
    sections["loss"]["si_sdr"] = 0.0
    cfg = write_config(root / "c.yaml", data_section, "td_speakerbeam_tiny.yaml",
                       train={"total_steps": 24, "val_every": 12, "ckpt_every": 12}, **sections)
    train.main(["--config", str(cfg)])
    return root / "run"


@pytest.mark.slow
def test_distillation_loss_falls(distilled_run: Path) -> None:
    rows = log_lines(distilled_run)
    assert len(rows) == 24
    terms = [float(r["teacher_si_sdr"]) for r in rows]
    assert all(map(torch.isfinite, torch.tensor(terms)))
    assert sum(terms[-6:]) / 6 < sum(terms[:6]) / 6 - 3.0, terms  # dB of SI-SDR gained
    # It is the teacher the student follows: its output ends nearer (SI-SDR) the teacher's
    # than the target, and no term of this run rewards SI-SDR against the target.
    target_terms = [float(r["si_sdr"]) for r in rows]
    assert sum(terms[-6:]) < sum(target_terms[-6:]), (terms, target_terms)
    assert all("loss" in v for v in log_lines(distilled_run, "val"))


@pytest.mark.slow
def test_student_checkpoint_stands_alone(distilled_run: Path) -> None:
    teacher = distilled_run.parent / "teacher.pt"
    last = torch.load(distilled_run / "last.pt", weights_only=True)
    assert last["config"]["distill"]["teacher_ckpt"] == str(teacher)
    assert not any("teacher" in k for k in last)
    student = build_model(last["model_args"]).state_dict()
    for part in ("generator", "ema"):
        assert set(last[part]) == set(student), part  # the student's weights, nothing else
    teacher.unlink()
    for name in ("last.pt", "best.pt"):
        model = load_model(distilled_run / name).eval()
        with torch.no_grad():
            out = model(0.1 * torch.randn(1, 4_800), 0.1 * torch.randn(1, 4_800))
        assert out.shape == (1, 4_800)
    assert from_dict(last["config"]).distill.teacher_ckpt == str(teacher)  # evaluate.py's read
    # Resuming needs the teacher again, and says so in one line.
    with pytest.raises(SystemExit, match=r"error: config key 'distill\.teacher_ckpt': .*"
                                         r"teacher\.pt: no such file"):
        train.main(["--config", str(distilled_run.parent / "c.yaml"),
                    "--set", "train.total_steps=36"])


@pytest.mark.slow
def test_resume_with_a_teacher_is_exact(tmp_path: Path, data_section: dict) -> None:
    # The other way round: a tiny td_speakerbeam teaches a tiny hifi_tse. A validation falls
    # on either side of the kill, so the teacher runs there too.
    teacher = write_teacher(tmp_path / "teacher.pt", "td_speakerbeam_tiny.yaml")
    settings = {"train": {"total_steps": 12, "ckpt_every": 4, "val_every": 6,
                          "keep_checkpoints": 10},
                **distill_sections(teacher, weight=0.5)}
    a, _ = assert_resume_is_exact(tmp_path, data_section, "tiny.yaml", settings, kill_at=8)
    assert a["config"]["loss"]["teacher_si_sdr"] == 0.5
    assert "teacher_si_sdr" in log_lines(tmp_path / "b" / "run")[-1]
