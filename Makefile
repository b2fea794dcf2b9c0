# moshax: `make quickstart` (install + pretrain helium_tiny on the built-in corpus), `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data
WORKDIR ?= runs/helium_tiny

.PHONY: install quickstart moshi-quickstart data data-quickstart test test-slow bench bench-targets clean

$(BIN)/moshax: pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python 3.11+); set PY=..." >&2; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,tpu,tfds,audio,beam,serve,browser-test]'
	# model files of the data-analysis stages (their declared deps are not needed: see pyproject.toml)
	$(BIN)/pip install -q --no-deps 'silero-vad==6.2.3' 'resemblyzer==0.1.4' 'pocketsphinx==5.1.1'
	# the Whisper path (tests build a random-weight Whisper in-process): openai-whisper without triton
	$(BIN)/pip install -q 'tiktoken>=0.7' 'more-itertools>=10' 'numba>=0.60'
	$(BIN)/pip install -q --no-deps 'openai-whisper==20250625'
	# the PyTorch reference, for parity tests only (its pins are old: install it without deps)
	$(BIN)/pip install -q 'torch==2.13.0' 'huggingface-hub>=0.24,<1.0' einops sphn
	$(BIN)/pip install -q --no-deps 'moshi==0.2.13'
	touch $(BIN)/moshax

install: $(BIN)/moshax

$(DATA)/corpus/train.txt: | $(BIN)/moshax
	$(BIN)/moshax data corpus --output $(DATA)/corpus

$(DATA)/tokenizer/spm.model: $(DATA)/corpus/train.txt
	$(BIN)/moshax tokenizer train --input $(DATA)/corpus/train.txt --vocab-size 512 --output $(DATA)/tokenizer/spm

data: $(DATA)/tokenizer/spm.model

quickstart: install data
	$(BIN)/moshax train --config configs/helium_tiny.yaml --workdir $(WORKDIR)

# Moshi LM quickstart: structured synthetic 17-stream shards (text from the built-in corpus),
# then moshi_tiny warm-started from the helium_tiny run of `make quickstart`
$(DATA)/moshi_tiny/train/manifest.json: $(DATA)/tokenizer/spm.model
	$(BIN)/moshax data synth-multistream --output $(DATA)/moshi_tiny/train --examples 2048 \
		--text-from $(DATA)/corpus/train.txt --tokenizer $(DATA)/tokenizer/spm.model
	$(BIN)/moshax data synth-multistream --output $(DATA)/moshi_tiny/eval --examples 64 --seed 1 \
		--text-from $(DATA)/corpus/eval.txt --tokenizer $(DATA)/tokenizer/spm.model

moshi-quickstart: quickstart $(DATA)/moshi_tiny/train/manifest.json
	$(BIN)/moshax train --config configs/moshi_tiny.yaml task.init_from=$(WORKDIR)

# Data quickstart: a two-voice eSpeak NG dialogue corpus (exact word times and speakers), prepared
# into multi-stream shards with a random-weight tiny Mimi (VAD, diarization, sidecar word times),
# then moshi_tiny trained on them from scratch.
DIALOGUES ?= $(DATA)/dialogues
$(DATA)/mimi_random/.done: | $(BIN)/moshax
	rm -rf $(DATA)/mimi_random
	$(BIN)/moshax mimi init --config configs/mimi_tiny.yaml --output $(DATA)/mimi_random
	touch $@

$(DIALOGUES)/train/.done: | $(BIN)/moshax
	$(BIN)/moshax data synth-dialogues --output $(DIALOGUES)/train --dialogues 48 --turns 8
	$(BIN)/moshax data synth-dialogues --output $(DIALOGUES)/eval --dialogues 4 --turns 8 --seed 1
	touch $@

data-quickstart: $(DATA)/tokenizer/spm.model $(DATA)/mimi_random/.done $(DIALOGUES)/train/.done
	for split in train eval; do \
		$(BIN)/moshax data prepare --config configs/data/prepare.yaml --input $(DIALOGUES)/$$split \
			--output $(DATA)/dialogue_shards/$$split --mimi-checkpoint $(DATA)/mimi_random \
			--tokenizer $(DATA)/tokenizer/spm.model --transcripts $(DIALOGUES)/$$split/truth diarization.num_speakers=2 || exit 1; \
	done
	$(BIN)/moshax data inspect $(DATA)/dialogue_shards/train
	$(BIN)/moshax train --config configs/moshi_tiny.yaml --workdir runs/moshi_dialogues task.init_from= \
		data.train_shards=$(DATA)/dialogue_shards/train data.eval_shards=$(DATA)/dialogue_shards/eval

# Two pytest workers: XLA compiles are single-threaded, so the two cores overlap them (about 1.5x
# faster than one process on 2 cores). The default suite keeps a file on one worker (its module
# fixtures are built once); the slow suite steals work test by test (its 7B compiles spread out).
PYTEST_WORKERS ?= -n 2 --dist loadfile
SLOW_WORKERS ?= -n 2 --dist worksteal
test: install
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(SLOW_WORKERS) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests"; exit 0; fi; exit $$rc

bench: install data
	$(BIN)/python bench/bench_helium_train.py

# every training and inference speed target beside its figure, in one run (~10 min; run it on a quiet machine)
bench-targets: install
	$(BIN)/python bench/targets.py

clean:
	rm -rf $(DATA) runs
