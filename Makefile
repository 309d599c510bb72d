# HoVLE-Tiny from scratch on a CPU: data + step-0 model -> Stage I -> Stage II -> Stage III -> eval.
#   make tiny-model                # 58 min to about 2 hours on 2 CPU cores with AVX512-BF16 (docs/hovle-tiny.md); longer in fp32
# Every step skips itself when its output exists, and `hovle train` resumes from its own checkpoints
# (every 50 steps), so running `make tiny-model` again continues an interrupted run.
# Knobs: make tiny-model TINY=runs/tiny2 TINY_TRAIN=3000 S1_ARGS='train.max_steps=100' ...
# TINY_DEVICE=cuda trains on a GPU (the same recipe; evaluation stays on the CPU).
# TINY_S3_POOL=16 renders 16 x 1000 fresh images for Stage III (pool_sft.jsonl) instead of reusing the train
# split: the Stage III budget of the model shipped until session 29, a GPU one (docs/hovle-tiny.md):
#   make tiny-model TINY_DEVICE=cuda TINY_S3_POOL=16 S3_ARGS='train.micro_batch_size=32 train.max_steps=600 \
#     train.eval_every=200 data.num_workers=12'
# TINY_SELFCHAT=256 adds SmolLM2's own chats and a KL term to SmolLM2 to Stage III (58 more CPU minutes).

PY        ?= python
TINY      ?= runs/tiny
TINY_SEED ?= 0
TINY_TRAIN ?= 6000
TINY_HELDOUT ?= 200
TINY_EVAL ?= 50
TINY_TILES ?= 2
TINY_DEVICE ?= cpu
TINY_S3_POOL ?= 0
TINY_SELFCHAT ?= 0
S1_ARGS   ?=
S2_ARGS   ?=
S3_ARGS   ?=
EVAL_ARGS ?=

D := $(TINY)/data
ifeq ($(TINY_S3_POOL),0)
S3_DATA := $(D)/train_sft.jsonl
S3_POOL :=
else
S3_DATA := $(D)/pool_sft.jsonl
S3_POOL := $(S3_DATA)
endif
# TINY_SELFCHAT=N: N chats SmolLM2 writes itself join Stage III (6x), with the KL term that keeps the text rows'
# next-token distributions at SmolLM2's (anchor.language_kl_weight).
ifeq ($(TINY_SELFCHAT),0)
S3_SELFCHAT :=
S3_TEXT :=
S3_KL :=
else
S3_SELFCHAT := $(D)/selfchat_sft.jsonl
S3_TEXT := , {path: $(S3_SELFCHAT), format: conversation, repeat: 6}
S3_KL := anchor.language_kl_weight=1.0 anchor.language_reference=$(TINY)/init
endif
TRAIN := $(PY) -m hovle.train

.PHONY: tiny-model tiny-prepare tiny-stage1 tiny-stage2 tiny-stage3 tiny-ship tiny-eval tiny-vlmeval tiny-install tiny-clean

tiny-model: $(TINY)/eval.json $(TINY)/vlmeval/DONE
	@$(PY) -c "import json; r = json.load(open('$(TINY)/eval.json')); print('HoVLE-Tiny:', '$(TINY)/hovle-tiny', {k: round(v, 3) for k, v in r['accuracy'].items()})"

tiny-prepare: $(TINY)/data/DONE.json $(TINY)/init/DONE.json
tiny-stage1: $(TINY)/stage1/DONE
tiny-stage2: $(TINY)/stage2/DONE
tiny-stage3: $(TINY)/stage3/DONE
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

$(TINY)/stage2/DONE: $(TINY)/stage1/DONE
	$(TRAIN) examples/tiny/stage2_align.yaml device=$(TINY_DEVICE) model.init=$(TINY)/stage1/final train.out_dir=$(TINY)/stage2 \
		'data.sources=[{path: $(D)/train_caption.jsonl, format: caption}, {path: $(D)/train_text.jsonl, format: conversation, repeat: 4}]' \
		'data.eval_sources=[{path: $(D)/heldout_caption.jsonl, format: caption}]' $(S2_ARGS)
	touch $@

$(D)/pool_sft.jsonl: $(TINY)/data/DONE.json
	$(PY) -m hovle.tiny.pipeline pool --out $(TINY) --splits $(TINY_S3_POOL)

$(D)/selfchat_sft.jsonl: $(TINY)/init/DONE.json
	$(PY) -m hovle.tiny.pipeline selfchat --out $(TINY) --n $(TINY_SELFCHAT)

$(TINY)/stage3/DONE: $(TINY)/stage2/DONE $(S3_POOL) $(S3_SELFCHAT)
	$(TRAIN) examples/tiny/stage3_sft.yaml device=$(TINY_DEVICE) model.init=$(TINY)/stage2/final train.out_dir=$(TINY)/stage3 \
		'data.sources=[{path: $(S3_DATA), format: conversation}$(S3_TEXT)]' \
		'data.eval_sources=[{path: $(D)/heldout_sft.jsonl, format: conversation}]' $(S3_KL) $(S3_ARGS)
	touch $@

# The shipped form: the embedding module + rank-16 deltas of the LLM linears (SmolLM2 itself is not copied).
$(TINY)/hovle-tiny/hovle_tiny.json: $(TINY)/stage3/DONE
	$(PY) -m hovle.tiny.pipeline ship --model $(TINY)/stage3/final --out $(TINY)/hovle-tiny

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
