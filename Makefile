# Two commands do everything on a fresh machine:
#   make demo   creates .venv, installs maesil, pretrains MAESIL on synthetic CT phantoms (CPU, minutes)
#   make test   installs the dev extras and runs the test suite
# TORCH picks the PyTorch build installed first; the default is the CPU build. For a GPU machine:
#   make demo TORCH=torch   (or install your CUDA torch into .venv before `make`)

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.maesil-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all benchmark recon-benchmark compare-init evidence recipe-curves recipe-table gpu-wheels gpu-check sweep clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The hand-off tests build nnU-Net's real network and call nnU-Net's own loader. Both packages are installed
# without their dependencies: they would pull timm, torchvision and a CUDA torch; the classes used need only torch
# and einops (dynamic-network-architectures) and torch (nnunetv2.run.load_pretrained_weights).
NNUNET_TEST_PACKAGES ?= dynamic-network-architectures==0.4.4 nnunetv2==2.8.1

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(NNUNET_TEST_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) -m maesil fit --config experiments/pretrain/maesil_demo.yaml

# lint-imports checks the layering contracts in pyproject.toml before the tests run.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

# pytest exits 5 when no test is selected; that is not a failure here.
test-slow: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -m slow -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(PY) benchmarks/mae_throughput.py
	$(PY) benchmarks/loader_throughput.py
	$(PY) benchmarks/two_view_throughput.py
	$(PY) benchmarks/s3d_throughput.py

# MAESIL against AE, VAE, VQ-VAE and S3D: each *_demo.yaml trained for the same RECON_STEPS on the built-in
# phantoms (same superpatches and DataModule), then scored by benchmark-recon on two phantoms none of them saw.
# benchmark-recon scores every model on one superpatch grid, so all train at RECON_SUPERPATCH (S3D's demo YAML
# is 48³, the others 64³).
RECON_STEPS ?= 400
RECON_SUPERPATCH ?= 64
RECON_METHODS ?= maesil ae vae vqvae s3d
RECON_DIR ?= runs/recon_benchmark
recon-benchmark: $(STAMP)
	$(PY) -m maesil phantoms --out data_cache/heldout_phantoms --count 2 --seed 100
	for method in $(RECON_METHODS); do \
	  WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) -m maesil fit --config experiments/pretrain/$${method}_demo.yaml \
	    --trainer.max_steps $(RECON_STEPS) --trainer.val_check_interval $(RECON_STEPS) \
	    --data.init_args.superpatch_size $(RECON_SUPERPATCH) --trainer.default_root_dir $(RECON_DIR)/$$method || exit 1; \
	done
	$(PY) -m maesil benchmark-recon --data data_cache/heldout_phantoms --out $(RECON_DIR)/results \
	  --checkpoints $(foreach m,$(RECON_METHODS),$(RECON_DIR)/$(m)/checkpoints/last.ckpt)

# Does pretraining pay? Fine-tune the segmentation network from scratch and from each pretrained demo checkpoint
# (trained first if missing) with the same steps and seeds; Dice/HD95 on held-out phantoms, table and plot.
FINETUNE_STEPS ?= 100
FINETUNE_SEEDS ?= 0 1 2
FINETUNE_COUNTS ?= 4
FINETUNE_MODES ?= finetune
PRETRAINED ?= maesil pgl byol s3d
runs/%_demo/checkpoints/last.ckpt: | $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) -m maesil fit --config experiments/pretrain/$*_demo.yaml
compare-init: $(STAMP) $(foreach m,$(PRETRAINED),runs/$(m)_demo/checkpoints/last.ckpt)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) -m maesil compare-init --steps $(FINETUNE_STEPS) --seeds $(FINETUNE_SEEDS) \
	  --train-count $(FINETUNE_COUNTS) --modes $(FINETUNE_MODES) \
	  --checkpoints $(foreach m,$(PRETRAINED),runs/$(m)_demo/checkpoints/last.ckpt) --out runs/compare_init

# The project's claims measured end to end (pretraining, both reconstruction protocols, few-label fine-tuning with
# paired differences); writes runs/evidence/summary.md. A second call reuses the stages already done with the same
# command, e.g. make evidence EVIDENCE_SEEDS="0 1 2 3 4". Every run at 4 mm and 32³, fine-tuning for 1200 steps (the
# small scale: about 85 min on 2 CPU cores); EVIDENCE_ARGS="--scale demo" keeps the demo YAMLs' sizes (hours on 2
# cores). docs/evidence.md.
EVIDENCE_SEEDS ?= 0 1 2
EVIDENCE_DIR ?= runs/evidence
EVIDENCE_ARGS ?=
evidence: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) -m maesil evidence --out $(EVIDENCE_DIR) --seeds $(EVIDENCE_SEEDS) $(EVIDENCE_ARGS)

# Learning curves of the MAESIL demo recipe and single changes to it (held-out masked PSNR against step and time,
# with the fills of the same masks); RECIPE_ARGS e.g. --variants demo lr_2e-3 --steps 300.
RECIPE_ARGS ?=
recipe-curves: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) benchmarks/maesil_recipe.py $(RECIPE_ARGS)

# Step time, memory, largest batch and MFU of every paper-sized recipe on a GPU (the _demo recipes on a CPU):
# runs/recipe_table/recipe_table.md.
RECIPE_TABLE_ARGS ?=
recipe-table: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(PY) benchmarks/recipe_table.py $(RECIPE_TABLE_ARGS)

# The GPU checks (evidence at GPU budgets, recipe table, compile, MAE step against MONAI's) on a GPU machine without
# network: gpu-wheels here with the package registry, then gpu-check there (docs/operations.md).
gpu-wheels:
	bash benchmarks/gpu_check.sh wheels
gpu-check:
	bash benchmarks/gpu_check.sh run runs/gpu_check

# The mask-ratio sweep without a W&B server: 18 short runs of the MAESIL demo, results.csv and sweep.png.
SWEEP_STEPS ?= 200
sweep: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m maesil sweep-local experiments/sweeps/mask_ratio.yaml --quiet \
	  -- --trainer.max_steps $(SWEEP_STEPS) --trainer.val_check_interval $(SWEEP_STEPS)

clean:
	rm -rf runs data_cache .pytest_cache
