# `make test` works on a fresh machine: it creates .venv, installs requirements, runs pytest.
# PY=/path/to/python runs every target with that interpreter instead (a conda env, the one
# running the tests) and then installs nothing: its environment must already hold
# requirements.txt. INSTALL is the install prerequisite (the venv's stamp by default, empty
# for another PY); `make demo PY=... INSTALL=` spells both out. Both are set on the command
# line only (`:=`, not `?=`): autotools-style environments export INSTALL=install.
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
PY := $(VENV_PY)
STAMP := $(VENV)/.installed
INSTALL := $(if $(filter $(VENV_PY),$(PY)),$(STAMP))

.PHONY: test lint bench demo clean-venv

# `make demo`: synthetic corpus (default) or DEMO=shared (RAVDESS in ../shared/data: actors
# 01-12 train, 13-16 test). ARCH picks the model family (hifi_tse, td_speakerbeam, spex_plus):
# configs/demo_$(ARCH).yaml is layered on the demo config, and the run, evaluation and extraction
# get their own names, so the families sit side by side. The budget is a number of steps, each
# family's own (train.total_steps in its demo config, about 15 min on 2 quiet cores with the
# schedule scaled to it), so a demo learns the same on any machine. DEMO_STEPS replaces it (the
# schedule's steps stay); DEMO_MINUTES caps the wall-clock time on top.
DEMO ?= synthetic
DEMO_STEPS ?=
DEMO_MINUTES ?=
ARCH ?= hifi_tse
DEMO_CORPUS_ARGS ?=  # e.g. --n-train 8: a smaller synthetic corpus (tests/test_demo.py)
DEMO_EVAL_ARGS ?=  # e.g. --n-samples 20
DEMO_SEL_ARGS ?=  # e.g. --n-pairs 10 --n-samples 20 (bench/bench_selection.py)
# A mechanism to try: DEMO_SETS are config overrides for train.py, DEMO_VARIANT names them, and
# the run, evaluation and doc/benchmarks.md sections get the name, e.g.
#   make demo DEMO_VARIANT=ge2e DEMO_SETS="model.speaker_embedding=ge2e"
DEMO_VARIANT ?=
DEMO_SETS ?=
ifneq ($(DEMO_SETS),)
ifeq ($(DEMO_VARIANT),)
$(error DEMO_SETS needs DEMO_VARIANT, a name for its run and results)
endif
endif
VARIANT_SUFFIX := $(if $(DEMO_VARIANT),_$(DEMO_VARIANT))
# Results of a non-default budget go to their own doc/benchmarks.md sections.
ARCH_SUFFIX := $(if $(filter hifi_tse,$(ARCH)),,_$(ARCH))
BUDGET_SUFFIX := $(if $(DEMO_STEPS),_$(DEMO_STEPS)steps)$(if $(DEMO_MINUTES),_$(DEMO_MINUTES)min)
DEMO_TAG := $(DEMO)$(ARCH_SUFFIX)$(VARIANT_SUFFIX)$(BUDGET_SUFFIX)
BUDGET_SETS := $(if $(DEMO_STEPS),--set train.total_steps=$(DEMO_STEPS)) \
	$(if $(DEMO_MINUTES),--set train.max_minutes=$(DEMO_MINUTES)) \
	$(foreach s,$(DEMO_SETS),--set $(s))
BUDGET_ARGS := $(if $(DEMO_STEPS),--steps $(DEMO_STEPS)) \
	$(if $(DEMO_MINUTES),--minutes $(DEMO_MINUTES))
ifeq ($(DEMO),shared)
DEMO_DIR := exp/demo_shared
DEMO_CFG := configs/demo_shared.yaml
DEMO_TEST_CFG := configs/demo_shared_test.yaml
else
DEMO_DIR := exp/demo
DEMO_CFG := configs/demo.yaml
DEMO_TEST_CFG := configs/demo_test.yaml
endif
RAVDESS := $(abspath ../shared/data/speech/ravdess)
ARCH_CFG := $(if $(ARCH_SUFFIX),--config configs/demo_$(ARCH).yaml)
RUN := $(DEMO_DIR)/run$(ARCH_SUFFIX)$(VARIANT_SUFFIX)
EVAL := $(DEMO_DIR)/eval$(ARCH_SUFFIX)$(VARIANT_SUFFIX)

$(STAMP): requirements.txt
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --upgrade pip
	$(VENV_PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: $(INSTALL)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(INSTALL)
	$(PY) -m ruff check .

demo: $(INSTALL)
ifeq ($(DEMO),shared)
	test -d $(RAVDESS) || { echo "$(RAVDESS) is missing" >&2; exit 1; }
	mkdir -p $(DEMO_DIR)/train_speech $(DEMO_DIR)/test_speech
	for a in 01 02 03 04 05 06 07 08 09 10 11 12; do \
		ln -sfn $(RAVDESS)/Actor_$$a $(DEMO_DIR)/train_speech/Actor_$$a; done
	for a in 13 14 15 16; do ln -sfn $(RAVDESS)/Actor_$$a $(DEMO_DIR)/test_speech/Actor_$$a; done
else
	$(PY) -m data.demo_corpus --out $(DEMO_DIR)/corpus $(DEMO_CORPUS_ARGS)
endif
	$(PY) -m data.prepare_manifest --config $(DEMO_CFG) --no-progress
	$(PY) -m data.prepare_manifest --config $(DEMO_TEST_CFG) --no-progress
	rm -rf $(RUN)  # a fresh run each time (the corpus and packing are kept)
	PYTHONUNBUFFERED=1 $(PY) train.py --config $(DEMO_CFG) $(ARCH_CFG) $(BUDGET_SETS) \
		--set train.run_dir=$(RUN)
	rm -rf $(EVAL)  # evaluate.py resumes a folder of the same settings: start it afresh
	$(PY) evaluate.py --ckpt $(RUN)/best.pt --config $(DEMO_TEST_CFG) \
		--out-dir $(EVAL) $(DEMO_EVAL_ARGS)
	$(PY) bench/bench_selection.py --ckpt $(RUN)/best.pt --config $(DEMO_TEST_CFG) \
		--name $(DEMO_TAG) $(DEMO_SEL_ARGS) > $(EVAL)/selection.txt
	cat $(EVAL)/selection.txt
	$(PY) inference.py --ckpt $(RUN)/best.pt --mix $(EVAL)/examples/median_mix.wav \
		--ref $(EVAL)/examples/median_ref.wav \
		-o $(DEMO_DIR)/extracted$(ARCH_SUFFIX)$(VARIANT_SUFFIX).wav
	$(PY) bench/demo_report.py --dir $(DEMO_DIR) --name $(DEMO) --arch $(ARCH) $(BUDGET_ARGS) \
		$(if $(DEMO_VARIANT),--variant $(DEMO_VARIANT) --sets "$(DEMO_SETS)")

bench: $(INSTALL)
	$(PY) bench/bench_model.py

clean-venv:
	rm -rf $(VENV)
