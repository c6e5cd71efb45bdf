#!/usr/bin/env bash
# The GPU checks in one script: the recipe table, torch.compile for MAESIL, the MAE step against MONAI's at the
# paper size, and the evidence run at GPU budgets. Built for a GPU machine without network that has torch,
# lightning, torchmetrics, numpy, scipy, matplotlib and rich but not the other dependencies: those travel as
# wheels (at most 64 MiB together with the code).
#
#   bash benchmarks/gpu_check.sh wheels            # here, with the package registry: .gpu_wheels/, size checked
#   bash benchmarks/gpu_check.sh run OUT           # on the GPU machine: installs the missing wheels, runs the checks
#   GPU_CHECK_REDUCED=1 bash benchmarks/gpu_check.sh run OUT   # CPU, tiny budgets: the script's own dry run
#   GPU_CHECK_PARTS="evidence" bash benchmarks/gpu_check.sh run OUT   # some parts only (default: all five)
#   GPU_CHECK_COLLECT=DIR ...   # at the end, copy the figures, tables, logs and summaries (not checkpoints) to DIR
#
# Every part has its own time limit (seconds: GPU_CHECK_TABLE_S, GPU_CHECK_COMPILE_S, GPU_CHECK_CHANNELS_LAST_S,
# GPU_CHECK_MAE_S, GPU_CHECK_EVIDENCE_S; GPU_CHECK_RECIPE_TIMEOUT for each recipe of the table) so that a part
# that hangs leaves the others their time; the defaults add up to about 10 minutes on one H200, so with 15 minutes
# of device time a call picks parts (GPU_CHECK_PARTS, GPU_CHECK_RECIPES). Each part writes its log and figures
# under OUT; a part cut off by its limit leaves what it had finished (the evidence run records finished stages,
# compare-init rewrites its tables after every run).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-run}
OUT_DIR=${2:-runs/gpu_check}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
SITE=${GPU_SITE:-.gpu_site}
[[ "$SITE" == /* ]] || SITE="$PWD/$SITE"
REDUCED=${GPU_CHECK_REDUCED:-0}
PARTS=" ${GPU_CHECK_PARTS:-recipe_table compile channels_last mae_vs_monai evidence} "
PY=${PYTHON:-python3}
LIMIT_MIB=64

# The dependencies a bare GPU machine lacks, at the versions the tests run with. SimpleITK is the big one (TorchIO
# imports it); wandb stays behind (maesil imports it only for the W&B logger).
WHEEL_SPECS=(torchio==1.2.1 simpleitk==2.5.7 nibabel==5.4.2 monai==1.6.1 jsonargparse==4.53.0
  docstring_parser==0.18.0 typeshed_client==2.15.0 deprecated==1.3.1 wrapt==2.5.2 humanize==4.17.0 einops==0.8.2
  jaxtyping==0.3.11 wadler_lindig==0.1.8 safetensors==0.8.0 typing_extensions==4.16.0 requests==2.34.2
  certifi==2026.10.19.post1 charset_normalizer==3.5.3 idna==3.20 urllib3==2.8.0)

wheels() {
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$WHEELS" "${WHEEL_SPECS[@]}" || { echo "gpu_check: pip download failed" >&2; return 1; }
  local wheel_bytes code_bytes
  wheel_bytes=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
  code_bytes=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  echo "wheels: $((wheel_bytes / 1048576)) MiB in $WHEELS; code: $((code_bytes / 1048576)) MiB; limit $LIMIT_MIB MiB"
  if (( wheel_bytes + code_bytes > LIMIT_MIB * 1048576 )); then
    echo "gpu_check: wheels and code exceed $LIMIT_MIB MiB" >&2
    return 1
  fi
}

# Installs, into $SITE, only the wheels whose distribution the machine does not have already (so the system's
# numpy or typing_extensions are never shadowed).
install_missing() {
  local missing
  missing=$("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as metadata, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(wheel)
EOF
)
  if [[ -n "$missing" ]]; then
    if "$PY" -m pip --version >/dev/null 2>&1; then
      # shellcheck disable=SC2086
      "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" $missing || return 1
    else  # no pip: a wheel is a zip archive laid out for site-packages
      # shellcheck disable=SC2086
      "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$SITE" $missing || return 1
    fi
  fi
  echo "installed from $WHEELS: $(echo "$missing" | grep -c . || true) wheel(s)"
}

# part NAME LIMIT COMMAND...: runs one part (if chosen in GPU_CHECK_PARTS) with its time limit and log, records its
# exit code and seconds.
part() {
  local name=$1 limit=$2
  shift 2
  [[ "$PARTS" == *" $name "* ]] || return 0
  local started=$SECONDS
  echo "== $name (limit ${limit} s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  local code=$?
  echo "$name exit=$code seconds=$((SECONDS - started))" | tee -a "$OUT_DIR/parts.txt"
  tail -n 40 "$OUT_DIR/logs/$name.log"
  collect
}

run() {
  mkdir -p "$OUT_DIR/logs"
  touch "$OUT_DIR/parts.txt"
  if [[ -d "$WHEELS" ]]; then
    install_missing || { echo "gpu_check: installing the wheels failed" >&2; return 1; }
  fi
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
  "$PY" - <<'EOF' | tee "$OUT_DIR/machine.txt"
import os, platform, torch
import maesil.lightning_cli  # fails here, not in a part, if a dependency is missing
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"{platform.node()}: python {platform.python_version()}, torch {torch.__version__}, {gpu}, "
      f"{os.cpu_count()} CPU cores")
EOF
  [[ ${PIPESTATUS[0]} -eq 0 ]] || return 1

  local trainer=experiments/trainer/gpu_bf16.yaml workers=4
  # GPU_CHECK_RECIPES: some recipes only (e.g. those a first try did not reach)
  local table=(--steps 10 --warmup 3 --loader-batches 2 --max-batch --max-batch-limit 64
    --timeout "${GPU_CHECK_RECIPE_TIMEOUT:-60}"
    --recipes ${GPU_CHECK_RECIPES:-maesil selfmedmae s3d pgl unetr unet byol ae vae vqvae maesil_mri})
  # fp32 gives the ratio (MONAI's MaskedAutoEncoderViT does not run under bf16 autocast), bf16 maesil's own step
  local mae=(--size paper --device cuda --batch-size 4 --steps 10 --warmup 3)
  local compile=(--config experiments/pretrain/maesil.yaml --steps 10 --no-flops --set model.init_args.compile=true)
  # channels_last_3d for the CNNs: PGL's step with it, against the same step in the recipe table
  local channels_last=(--config experiments/pretrain/pgl.yaml --steps 10 --no-flops --loader-batches 2
    --set model.init_args.channels_last=true)
  # The demo YAMLs' sizes (2 mm, 64³/48³), not the small scale that fits 2 CPU cores; 600 fine-tuning steps: where
  # the scratch U-Net plateaus on the phantoms at those sizes; six runs at a time share the GPU.
  # Fine-tuning reads its small superpatches from compare-init's cache in the main process (no worker processes
  # forked from a CUDA process every 8-batch epoch).
  local evidence=(--scale demo --pretrain-steps 1600 --cnn-steps 600 --finetune-steps 600 --seeds 0 1 2 --jobs 6
    --finetune-jobs 6 --finetune-set data.init_args.num_workers=0)
  if [[ "$REDUCED" == 1 ]]; then
    trainer=experiments/trainer/cpu_demo.yaml workers=1
    table=(--steps 2 --recipes maesil)
    compile=(--config experiments/pretrain/maesil_demo.yaml --steps 2 --set model.init_args.compile=true
      --set model.init_args.compile_backend=aot_eager)
    mae=(--size demo --device cpu --batch-size 1 --steps 1 --warmup 1)
    channels_last=(--config experiments/pretrain/pgl_demo.yaml --steps 1 --warmup 1 --no-flops --loader-batches 1
      --set model.init_args.channels_last=true)
    evidence=(--scale demo --pretrain-steps 4 --cnn-steps 2 --finetune-steps 2 --seeds 0 --modes finetune --jobs 2
      --finetune-jobs 2)
  fi

  part evidence "${GPU_CHECK_EVIDENCE_S:-260}" "$PY" -m maesil evidence --out "$OUT_DIR/evidence" \
    --trainer-config "$trainer" --set "data.init_args.num_workers=$workers" \
    --pretrain-cache "$OUT_DIR/pretrain_cache" "${evidence[@]}"
  # The summary of whatever the evidence run finished within its limit.
  if [[ "$PARTS" == *" evidence "* ]]; then
    "$PY" -m maesil evidence --out "$OUT_DIR/evidence" --trainer-config "$trainer" \
      --set "data.init_args.num_workers=$workers" --pretrain-cache "$OUT_DIR/pretrain_cache" "${evidence[@]}" \
      --summary-only >"$OUT_DIR/logs/evidence_summary.log" 2>&1
    collect
  fi
  part recipe_table "${GPU_CHECK_TABLE_S:-160}" "$PY" benchmarks/recipe_table.py --out "$OUT_DIR/recipe_table" \
    "${table[@]}"
  part compile "${GPU_CHECK_COMPILE_S:-75}" "$PY" -m maesil profile "${compile[@]}" --config "$trainer" \
    --json "$OUT_DIR/compile.json"
  part channels_last "${GPU_CHECK_CHANNELS_LAST_S:-60}" "$PY" -m maesil profile "${channels_last[@]}" \
    --config "$trainer" --json "$OUT_DIR/channels_last.json"
  part mae_vs_monai "${GPU_CHECK_MAE_S:-60}" bash -c '"$0" benchmarks/mae_throughput.py "$@" --precision fp32 &&
    "$0" benchmarks/mae_throughput.py "$@" --precision bf16' "$PY" "${mae[@]}"
  cat "$OUT_DIR/parts.txt"
  [[ ! -f "$OUT_DIR/recipe_table/recipe_table.md" ]] || cat "$OUT_DIR/recipe_table/recipe_table.md"
}

# Packs the small result files (tables, summaries, logs, figures; no checkpoints or caches) into
# $GPU_CHECK_COLLECT/results.tar.gz, if GPU_CHECK_COLLECT is set; after every part, so a run cut short has handed
# over what it finished.
collect() {
  [[ -n "${GPU_CHECK_COLLECT:-}" ]] || return 0
  mkdir -p "$GPU_CHECK_COLLECT"
  (cd "$OUT_DIR" && find . -type f \( -name '*.md' -o -name '*.csv' -o -name '*.json' -o -name '*.png' \
    -o -name '*.txt' -o -name '*.log' \) -size -4M -not -path '*/cache/*' -not -path './pretrain_cache/*' \
    -not -path '*/phantoms/*' -print0 | tar -czf "$GPU_CHECK_COLLECT/results.tar.gz.tmp" --null -T -) \
    && mv "$GPU_CHECK_COLLECT/results.tar.gz.tmp" "$GPU_CHECK_COLLECT/results.tar.gz"
}

case "$MODE" in
  wheels) wheels ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_check.sh wheels | run [OUT]" >&2; exit 2 ;;
esac
