#!/usr/bin/env bash
# The decode path's GPU checks and figures, in stages that each fit a 10-minute command. Run on the GPU
# machine after `source scripts/gpu-env.sh`; logs and result JSONs go to OUT_DIR.
#
#   bash scripts/gpu-validate.sh OUT_DIR tests   # GPU tests: serving engine (graphs, overlapped decode),
#                                                #   persistent decode launch (eager, graph), PDL chain in
#                                                #   every mode, dense routing, fused cache
#                                                #   write, the CUDA int8 and int4 GEMVs (every config, PDL mode;
#                                                #   int4 also forming a gated or normalised x, and
#                                                #   storing SwiGLU's output), parity of the quantized
#                                                #   gated, normalised and SwiGLU ops
#   bash scripts/gpu-validate.sh OUT_DIR serve   # bench_serve decode: engine overlapped and step by step,
#                                                #   graph replay in PDL modes 3 (default), 1 and 4 and with
#                                                #   rope/KV write/decode and the norms fused, with the
#                                                #   persistent decode launch and its variants (DEPTH=2,
#                                                #   POLL=1, one tile round a phase, L2_AHEAD=1/2,
#                                                #   SPLITS=4, HEAD_READY=1, TIMED=1 phase profiles),
#                                                #   HF static
#   bash scripts/gpu-validate.sh OUT_DIR barriers   # a grid barrier's cost alone, by poll mode
#   bash scripts/gpu-validate.sh OUT_DIR floor   # a dependent launch's floor (empty, weightless GEMV; PDL off/on)
#   bash scripts/gpu-validate.sh OUT_DIR quant   # bench_quant --speed, batch 1 also with the persistent launch
#                                                #   (and DEPTH=2, and twice the tile, TILE=32768, alone
#                                                #   and with DEPTH=2: more bytes in flight a program;
#                                                #   L2_AHEAD=1, POLL=2 with HEAD_READY=1)
#   bash scripts/gpu-validate.sh OUT_DIR quant-fused  # the same with rope/KV write/decode and norms fused
#   bash scripts/gpu-validate.sh OUT_DIR persistent  # probe_persistent_layer: one persistent launch for
#                                                #   every layer's GEMVs against a launch per projection
#   bash scripts/gpu-validate.sh OUT_DIR probe   # probe_engine_step, overlapped and step by step
#   bash scripts/gpu-validate.sh OUT_DIR jaxref  # float32 parity vs jaxref, plain and with blocked sums
#
# Stages may be combined (`... tests serve`). Each prints its exit status, time and last lines; a failing
# stage does not stop the next.
set -u
if [ $# -lt 2 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,/^set -u$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
mkdir -p "$out"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tessera-triton-cache}
status=0

run() {
    local name=$1
    shift
    echo "== $name: $*"
    local start
    start=$(date +%s)
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $(($(date +%s) - start)) s"
    tail -n 8 "$out/$name.log"
    [ $rc -eq 0 ] || status=1
}

for stage in "$@"; do
    case $stage in
    tests)
        run gpu-tests python3 -m pytest -q -m gpu tests/serve tests/kernels/test_pdl.py tests/model/test_persistent.py \
            tests/kernels/test_dense_linear.py tests/kernels/test_quant_gemv.py tests/kernels/test_decode_write.py \
            tests/kernels/test_quant_gemv_cuda.py
        # the quantized gated, normalised, SwiGLU and q/k/v rope ops (their small-shape parity, ~20 s a case on the
        # H200; the dense ones and the paged decode ops passed at cddc026), on the seed of the strided gated int4 failure
        run new-op-parity env TESSERA_TEST_SEED="${TESSERA_TEST_SEED:-16163947}" python3 -m pytest -q \
            tests/kernels/test_parity.py -k "not real_shapes and (int4_awq_gated or int4_awq_normed or int4_awq_swiglu or int4_awq_qkv_rope or int8_weight_only_gated or int8_weight_only_normed or int8_weight_only_qkv_rope)" ;;
    serve)
        run serve-decode python3 benchmarks/bench_serve.py --sections decode --hf-decode-modes static \
            --decode-tokens 64 --pdl-modes 1 4 --out "$out" --persistent-variants DEPTH=2 POLL=1 \
            POLL=1,BN_QKV=32,BN_O=8,BN_GU=32,BN_D=8 L2_AHEAD=1 POLL=1,L2_AHEAD=2 POLL=1,SPLITS=4 \
            POLL=2 HEAD_READY=1 POLL=2,HEAD_READY=1 POLL=2,L2_AHEAD=1,HEAD_READY=1 TIMED=1 \
            POLL=2,HEAD_READY=1,TIMED=1 ;;
    barriers)
        run barriers python3 benchmarks/probe_persistent_layer.py --barriers-only --out "$out" ;;
    floor)
        mkdir -p "$out/w8192"
        run launch-floor python3 benchmarks/probe_launch_floor.py --out "$out"
        run launch-floor-8192 python3 benchmarks/probe_launch_floor.py --width 8192 --programs 128 132 1024 \
            --out "$out/w8192" ;;
    quant)
        run quant-speed python3 benchmarks/bench_quant.py --speed --reps 10 --persistent --no-progress --out "$out" \
            --persistent-variants DEPTH=2 TILE=32768 TILE=32768,DEPTH=2 L2_AHEAD=1 POLL=2,HEAD_READY=1 ;;
    quant-fused)
        run quant-speed-fused python3 benchmarks/bench_quant.py --speed --reps 10 --fused-decode --fused-norms \
            --no-progress --out "$out" ;;
    persistent)
        run persistent-layer python3 benchmarks/probe_persistent_layer.py --out "$out" ;;
    probe)
        run probe-overlapped python3 benchmarks/probe_engine_step.py --out "$out"
        run probe-step-by-step python3 benchmarks/probe_engine_step.py --no-overlap --out "$out" ;;
    jaxref)
        run jaxref-parity python3 benchmarks/bench_jaxref.py --parity-only \
            --fp64-floor --sum-block 32 --out "$out" ;;
    *)
        echo "unknown stage '$stage': expected tests, serve, barriers, floor, quant, quant-fused, persistent, probe or jaxref" >&2
        status=2 ;;
    esac
done
exit $status
