# Every target works from a fresh clone: `make test` and `make demo` create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

.PHONY: setup test demo clean
setup: $(VENV)/.installed

# torch first: on CPU machines the pinned CPU build comes from the local wheel store, not a CUDA download
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@# METEOR (pycocoevalcap) runs on Java: install a JRE where we can, else say what is lost
	@command -v java >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q default-jre-headless >/dev/null; } || \
		echo "warning: no Java: evaluate.py reports captions without METEOR (labelled python backend)"
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# the stages built so far, on the built-in corpus and synthetic micrographs (offline teachers)
demo: setup
	$(PY) data_prep/build_corpus.py --config launch/configs/debug/corpus.yaml --out $(RUN)/corpus
	$(PY) data_prep/synth_micrographs.py --config launch/configs/debug/micrographs.yaml --out $(RUN)/micrographs
	$(PY) data_prep/annotate.py --teacher metadata --manifest $(RUN)/micrographs/manifest.jsonl --out $(RUN)/annotations
	$(PY) data_prep/make_instructions.py --documents $(RUN)/corpus/documents.jsonl --annotations $(RUN)/annotations \
		--out $(RUN)/instructions
	$(PY) train_pretrain.py --config launch/configs/debug/pretrain.yaml --output_dir $(RUN)/pretrain \
		--tokenizer $(RUN)/corpus/tokenizer --train_data $(RUN)/corpus/train --eval_data $(RUN)/corpus/validation
	$(PY) train_sft.py --config launch/configs/debug/sft.yaml --output_dir $(RUN)/sft \
		--init_from $(RUN)/pretrain/final --train_data $(RUN)/instructions/instructions.jsonl
	$(PY) train_sft.py --config launch/configs/debug/dpo.yaml --output_dir $(RUN)/dpo \
		--init_from $(RUN)/sft/final --train_data $(RUN)/instructions/preferences.jsonl
	$(PY) train_moe.py --config launch/configs/debug/projector.yaml --output_dir $(RUN)/projector \
		--init_from $(RUN)/sft/final --train_data "[$(RUN)/annotations/captions.jsonl]" \
		--classify_data $(RUN)/annotations/classify.jsonl
	$(PY) train_moe.py --config launch/configs/debug/llm.yaml --output_dir $(RUN)/llm --init_from $(RUN)/projector/final \
		--train_data "[$(RUN)/annotations/captions.jsonl,$(RUN)/annotations/vqa.jsonl,$(RUN)/annotations/classify.jsonl,$(RUN)/instructions/instructions.jsonl]"
	$(PY) train_moe.py --config launch/configs/debug/moe.yaml --output_dir $(RUN)/moe --init_from $(RUN)/llm/final \
		--train_data "[$(RUN)/annotations/captions.jsonl,$(RUN)/annotations/vqa.jsonl,$(RUN)/annotations/classify.jsonl,$(RUN)/instructions/instructions.jsonl]"
	$(PY) evaluate.py --model $(RUN)/moe/final --output_dir $(RUN)/eval/moe --limit 30 --max_new_tokens 48 \
		--data "[$(RUN)/annotations/captions.jsonl,$(RUN)/annotations/vqa.jsonl,$(RUN)/annotations/classify.jsonl]"
	$(PY) export_gptq.py --model $(RUN)/sft/final --output_dir $(RUN)/gptq_sft --group_size 32 \
		--calibration $(RUN)/instructions/instructions.jsonl --num_calibration_samples 64 \
		--eval_data $(RUN)/instructions/instructions.jsonl --eval_split validation
	$(PY) evaluate.py --model $(RUN)/sft/final --output_dir $(RUN)/eval/sft --split validation --limit 50 \
		--data $(RUN)/instructions/instructions.jsonl --corpus $(RUN)/corpus/validation
	$(PY) evaluate.py --model $(RUN)/gptq_sft --output_dir $(RUN)/eval/gptq_sft --split validation --limit 50 \
		--data $(RUN)/instructions/instructions.jsonl --corpus $(RUN)/corpus/validation
	$(PY) evaluate.py --compare "[$(RUN)/eval/sft,$(RUN)/eval/gptq_sft,$(RUN)/eval/moe]" --output_dir $(RUN)/eval

clean:
	rm -rf runs
