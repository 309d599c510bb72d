# HoVLE-Tiny from scratch on a CPU: data + step-0 model -> Stage I -> Stage II -> Stage III -> the two language
# steps (module-only text repair, text-path distillation) -> ship -> eval.
#   make tiny-model                # about 2 hours on 2 CPU cores with AVX512-BF16 (docs/hovle-tiny.md); longer in fp32
# Every step skips itself when its output exists, and `hovle train` resumes from its own checkpoints
# (every 50 steps), so running `make tiny-model` again continues an interrupted run.
# Knobs: make tiny-model TINY=runs/tiny2 TINY_TRAIN=3000 S1_ARGS='train.max_steps=100' ... (S1/S2/S3_ARGS for the
# stages, MT_ARGS / KL_ARGS for the two language steps, EVAL_ARGS for the eval).
# TINY_DEVICE=cuda trains on a GPU (the same recipe; evaluation stays on the CPU).
# TINY_S3_POOL=16 renders 16 x 1000 fresh images for Stage III (pool_sft.jsonl) instead of reusing the train
# split: the Stage III budget (not the other settings) of the model shipped until session 29, a GPU one:
#   make tiny-model TINY_DEVICE=cuda TINY_S3_POOL=16 S3_ARGS='train.micro_batch_size=32 train.max_steps=600 \
#     train.eval_every=200 data.num_workers=12'

PY        ?= python
TINY      ?= runs/tiny
TINY_SEED ?= 0
TINY_TRAIN ?= 6000
TINY_HELDOUT ?= 200
TINY_EVAL ?= 50
TINY_TILES ?= 2
TINY_DEVICE ?= cpu
TINY_S3_POOL ?= 0
S1_ARGS   ?=
S2_ARGS   ?=
S3_ARGS   ?=
MT_ARGS   ?=
KL_ARGS   ?=
EVAL_ARGS ?=

D := $(TINY)/data
ifeq ($(TINY_S3_POOL),0)
S3_DATA := $(D)/train_sft.jsonl
S3_POOL :=
else
S3_DATA := $(D)/pool_sft.jsonl
S3_POOL := $(S3_DATA)
endif
TRAIN := $(PY) -m hovle.train

.PHONY: tiny-model tiny-prepare tiny-stage1 tiny-stage2 tiny-stage3 tiny-language tiny-ship tiny-eval tiny-vlmeval tiny-install tiny-clean

tiny-model: $(TINY)/eval.json $(TINY)/vlmeval/DONE
	@$(PY) -c "import json; r = json.load(open('$(TINY)/eval.json')); print('HoVLE-Tiny:', '$(TINY)/hovle-tiny', {k: round(v, 3) for k, v in r['accuracy'].items()})"

tiny-prepare: $(TINY)/data/DONE.json $(TINY)/init/DONE.json
tiny-stage1: $(TINY)/stage1/DONE
tiny-stage2: $(TINY)/stage2/DONE
tiny-stage3: $(TINY)/stage3/DONE
tiny-language: $(TINY)/text_kl/DONE
tiny-ship: $(TINY)/hovle-tiny/hovle_tiny.json
tiny-eval: $(TINY)/eval.json
tiny-vlmeval: $(TINY)/vlmeval/DONE

# prepare writes data/DONE.json and init/DONE.json last (and skips a part whose marker exists).
$(TINY)/data/DONE.json $(TINY)/init/DONE.json &:
	$(PY) -m hovle.tiny.pipeline prepare --out $(TINY) --train $(TINY_TRAIN) --heldout $(TINY_HELDOUT) \
		--eval-per-type $(TINY_EVAL) --seed $(TINY_SEED) --max-tiles $(TINY_TILES)

# Each stage's DONE marker is written only after `hovle train` has saved out_dir/final completely.
$(TINY)/stage1/DONE: $(TINY)/data/DONE.json $(TINY)/init/DONE.json
	$(TRAIN) examples/tiny/stage1_distill.yaml device=$(TINY_DEVICE) model.init=$(TINY)/init train.out_dir=$(TINY)/stage1 \
		distill.feature_cache=$(TINY)/teacher-features \
		'data.sources=[{path: $(D)/train_caption.jsonl, format: caption}, {path: $(D)/train_text.jsonl, format: conversation}]' \
		'data.eval_sources=[{path: $(D)/heldout_caption.jsonl, format: caption}]' $(S1_ARGS)
	touch $@

# Stages II and III keep Stage I's frozen object head reading the image tokens (distill.object_head in the configs).
HEAD := distill.object_head=$(TINY)/stage1/final/object_head.safetensors

$(TINY)/stage2/DONE: $(TINY)/stage1/DONE
	$(TRAIN) examples/tiny/stage2_align.yaml device=$(TINY_DEVICE) model.init=$(TINY)/stage1/final train.out_dir=$(TINY)/stage2 \
		'data.sources=[{path: $(D)/train_caption.jsonl, format: caption}, {path: $(D)/train_text.jsonl, format: conversation, repeat: 4}]' \
		'data.eval_sources=[{path: $(D)/heldout_caption.jsonl, format: caption}]' $(HEAD) $(S2_ARGS)
	touch $@

$(D)/pool_sft.jsonl: $(TINY)/data/DONE.json
	$(PY) -m hovle.tiny.pipeline pool --out $(TINY) --splits $(TINY_S3_POOL)

$(TINY)/stage3/DONE: $(TINY)/stage2/DONE $(S3_POOL)
	$(TRAIN) examples/tiny/stage3_sft.yaml device=$(TINY_DEVICE) model.init=$(TINY)/stage2/final train.out_dir=$(TINY)/stage3 \
		'data.sources=[{path: $(S3_DATA), format: conversation}]' \
		'data.eval_sources=[{path: $(D)/heldout_sft.jsonl, format: conversation}]' \
		anchor.language_reference=$(TINY)/init $(HEAD) $(S3_ARGS)
	touch $@

# Each step's shipped form (the module + low-rank deltas of the LLM linears; SmolLM2 itself is not copied) is
# the next step's start: Stage III's LoRA is rank 16, the distillation's fresh adapters add 8.
$(TINY)/stage3/shipped/hovle_tiny.json: $(TINY)/stage3/DONE
	$(PY) -m hovle.tiny.pipeline ship --model $(TINY)/stage3/final --out $(TINY)/stage3/shipped --rank 16

# The language steps, on SmolLM2's text: the module's text outputs back on SmolLM2's embeddings, then what the
# LLM reads distilled into SmolLM2's next-token distributions (the configs' headers say why).
LANGUAGE_TEXT := {path: $(D)/reference_prose.txt, format: text, repeat: 2}, {path: $(D)/train_text.jsonl, format: conversation, repeat: 2}

$(TINY)/module_text/DONE: $(TINY)/stage3/shipped/hovle_tiny.json
	$(TRAIN) examples/tiny/module_text.yaml device=$(TINY_DEVICE) model.init=$(TINY)/stage3/shipped \
		train.out_dir=$(TINY)/module_text anchor.vision_reference=$(TINY)/stage3/shipped \
		'data.sources=[$(LANGUAGE_TEXT), {path: $(D)/train_caption.jsonl, format: caption}]' \
		'data.eval_sources=[{path: $(D)/heldout_text.jsonl, format: conversation}, {path: $(D)/heldout_caption.jsonl, format: caption}]' $(MT_ARGS)
	$(PY) -m hovle.tiny.pipeline ship --model $(TINY)/module_text/final --out $(TINY)/module_text/shipped --rank 16
	touch $@

# The vision KL of the distillation reads 1,000 of the train split's image conversations.
$(D)/train_img_sft1000.jsonl: $(TINY)/data/DONE.json
	grep -v '"text_chat"' $(D)/train_sft.jsonl | head -1000 > $@

$(TINY)/text_kl/DONE: $(TINY)/module_text/DONE $(D)/train_img_sft1000.jsonl
	$(TRAIN) examples/tiny/text_kl.yaml device=$(TINY_DEVICE) model.init=$(TINY)/module_text/shipped \
		train.out_dir=$(TINY)/text_kl anchor.language_reference=$(TINY)/init anchor.vision_reference=$(TINY)/module_text/shipped \
		'data.sources=[$(LANGUAGE_TEXT), {path: $(D)/train_img_sft1000.jsonl, format: conversation}]' \
		'data.eval_sources=[{path: $(D)/heldout_text.jsonl, format: conversation}]' $(KL_ARGS)
	touch $@

$(TINY)/hovle-tiny/hovle_tiny.json: $(TINY)/text_kl/DONE
	$(PY) -m hovle.tiny.pipeline ship --model $(TINY)/text_kl/final --out $(TINY)/hovle-tiny --rank 24

$(TINY)/eval.json: $(TINY)/hovle-tiny/hovle_tiny.json
	$(PY) -m hovle.tiny.pipeline evaluate --model $(TINY)/hovle-tiny --data $(D)/eval.jsonl --json $@ \
		--baseline $(TINY)/init $(EVAL_ARGS)

# The same eval set as a VLMEvalKit TSV, through `hovle eval` (short-answer VQA prompt and scoring).
$(TINY)/vlmeval/DONE: $(TINY)/hovle-tiny/hovle_tiny.json
	$(PY) -m hovle.cli eval --model $(TINY)/hovle-tiny --data $(D)/HoVLE-Tiny_VQA.tsv --out $(TINY)/vlmeval --dtype fp32 \
		--max-tiles $(TINY_TILES)
	touch $@

# Make the new model the package's default (`hovle chat` without --model, from_pretrained("hovle-tiny")).
tiny-install: $(TINY)/eval.json
	mkdir -p hovle/tiny/hovle-tiny
	cp $(TINY)/hovle-tiny/config.json $(TINY)/hovle-tiny/hovle_tiny.json $(TINY)/hovle-tiny/weights.safetensors \
		hovle/tiny/hovle-tiny/

tiny-clean:
	rm -rf $(TINY)
