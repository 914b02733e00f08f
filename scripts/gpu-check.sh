#!/usr/bin/env bash
# The GPU check: run on the GPU machine (one H100; python3 with torch 2.11.0+cu130, nvcc 13.0, CMake,
# ninja; no package registry). Builds libft against that machine's own torch, runs the whole test
# suite with the GPU visible (HF parity on CUDA in float32 and bf16 included), runs the benchmarks,
# and prints a summary table last. Budget: GPU_CHECK_BUDGET_S (470 s), inside the 8 minutes the issue allows.
#
#   scripts/fetch-debs.sh            # on the development machine: .debs/ with the Debian packages
#   scripts/gpu-check.sh [OUT_DIR]   # on the GPU machine (device tool: carry .debs)
#
# Logs go to OUT_DIR (default build-gpu/logs). Later issues add their GPU tests and benchmarks here.
# For a focused rerun: GPU_CHECK_BUILD_ONLY=1 stops after the build (GPU_CHECK_TARGETS: which targets,
# default all); build-gpu/env.sh then holds the environment the tests need (`. build-gpu/env.sh`).
# GPU_CHECK_SKIP_BUILD=1 runs the checks on a build-gpu built before.
# A dry run of the script's plumbing on a machine without a GPU (CUDA tests skip, CUDA benchmarks
# report no device): GPU_CHECK_PYTHON=<a python with torch> GPU_CHECK_ARCH=9.0 scripts/gpu-check.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
out=${1:-build-gpu/logs}
mkdir -p "$out"
log() { echo "[gpu-check $(($(date +%s) - t0))s] $*"; }

# 1. Debian packages, unpacked into a prefix inside the repo (never the system root).
prefix=$PWD/.deps/root
if [ ! -d "$prefix/usr" ]; then
  mkdir -p "$prefix"
  for f in .debs/*.deb; do
    if command -v dpkg-deb >/dev/null; then dpkg-deb -x "$f" "$prefix"
    else (tmp=$(mktemp -d) && cd "$tmp" && ar x "$OLDPWD/$f" && tar -xf data.tar.* -C "$prefix" && rm -rf "$tmp"); fi
  done
fi
lib="$prefix/usr/lib/x86_64-linux-gnu"
export LD_LIBRARY_PATH="$lib:$lib/hdf5/serial${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# pkg-config reads only the unpacked .pc files and prefixes their paths with the folder.
export PATH="$prefix/usr/bin:$PATH"
export PKG_CONFIG_LIBDIR="$lib/pkgconfig:$prefix/usr/share/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$prefix"
export LIBFT_FORTUNES="$prefix/usr/share/games/fortunes" LIBFT_JARGON="$prefix/usr/share/doc/jargon-text/jargon.txt.gz"
missing=$(ldd "$lib/hdf5/serial/libhdf5.so" "$lib/libsentencepiece_train.so" 2>&1 | grep "not found" | sort -u)
[ -z "$missing" ] || { echo "[gpu-check] libraries missing on this machine (add their .debs to fetch-debs.sh):"; echo "$missing"; }
python=${GPU_CHECK_PYTHON:-$(command -v python3)}
mkdir -p build-gpu
declare -p LD_LIBRARY_PATH PATH PKG_CONFIG_LIBDIR PKG_CONFIG_SYSROOT_DIR LIBFT_FORTUNES LIBFT_JARGON | sed 's/^declare -x/export/' >build-gpu/env.sh
log "python $python: $($python -c 'import torch,transformers;print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>/dev/null)"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader); echo "$gpu"

# 2. Build against the machine's torch, for the card in the machine only (faster than 8.0;9.0).
arch=${GPU_CHECK_ARCH:-$($python -c 'import torch;p=torch.cuda.get_device_capability();print(f"{p[0]}.{p[1]}")')}
build_s=0
if [ -z "${GPU_CHECK_SKIP_BUILD:-}" ]; then  # GPU_CHECK_SKIP_BUILD=1: build-gpu is built already
  log "configure (TORCH_CUDA_ARCH_LIST=$arch)"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLIBFT_PYTHON="$python" \
    -DTORCH_CUDA_ARCH_LIST="$arch" -DCMAKE_PREFIX_PATH="$prefix/usr" >"$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; exit 1; }
  log "build"
  build_start=$(date +%s)
  # shellcheck disable=SC2086  # GPU_CHECK_TARGETS is a list
  cmake --build build-gpu -j"$(nproc)" ${GPU_CHECK_TARGETS:+--target $GPU_CHECK_TARGETS} >>"$out/build.log" 2>&1 || { grep -B5 -A20 "error" "$out/build.log" | head -80; exit 1; }
  build_s=$(($(date +%s) - build_start))
  log "built in ${build_s}s"
  [ -n "${GPU_CHECK_BUILD_ONLY:-}" ] && exit 0
fi

# 3. What only this machine can check comes first, so that a run cut short still reports it: the
#    CUDA tests (ctest adds the fixtures they need, e.g. the transformers reference models; verbose,
#    for the parity numbers), then the benchmark rows of issue 7's end-to-end targets, the NCCL
#    launch and the CUDA-graph training runs, then the other benchmarks. The rest of the suite (it
#    runs in CI on the CPU anyway) runs last, in whatever time is left of GPU_CHECK_BUDGET_S.
budget=${GPU_CHECK_BUDGET_S:-470}
left() { echo $((budget - ($(date +%s) - t0))); }
gpu_re='[Cc]uda|CUDA|Kernel|NF4|nf4|default_job'  # default_job: the NCCL run's token store
# A test that hangs costs its 120 s, not the whole budget; the default job (the fixture that makes
# the NCCL run's store) takes 2.5 min on the 2-core development machine, less on 16 cores.
log "ctest, CUDA tests (-R '$gpu_re', at most 200s)"
LIBFT_REFERENCE_DIR="$PWD/build-gpu/reference_models" timeout 200 ctest --test-dir build-gpu -R "$gpu_re" -j6 -V \
  --timeout 120 >"$out/ctest-gpu.log" 2>&1
ctest_gpu_rc=$?
grep -aE "[0-9]+% tests passed|\[  FAILED  \]|\*\*\*Failed|\*\*\*Timeout|\*\*\*Exception" "$out/ctest-gpu.log" | sort -u | head -30
echo "skipped: $(grep -ac '(Skipped)' "$out/ctest-gpu.log")"
# A backtrace for the first test that crashed (cuda-gdb debugs host code too; there is no gdb
# there). A failed expectation exits normally and has no stack worth the minute this takes.
crashed=$(grep -aE '^\s+[0-9]+ - [A-Za-z_/]+\.[A-Za-z_/0-9]+ .*\((SEGFAULT|Subprocess aborted|Child aborted|Exception|ILLEGAL|Bus error)\)' \
  "$out/ctest-gpu.log" | awk '{print $3}' | head -1)
if [ -n "$crashed" ]; then
  for exe in build-gpu/tests/ft_tests build-gpu/tests/ft_core_tests; do
    if "$exe" --gtest_list_tests --gtest_filter="$crashed" | grep -q '^  '; then
      echo "--- backtrace of $crashed"
      timeout 45 cuda-gdb -batch -ex run -ex bt --args "$exe" --gtest_filter="$crashed" 2>&1 | grep -E '^#|signal|FAIL|Failure|error' | head -25
    fi
  done
fi

# 4. Benchmarks, each process with a deadline (what finished is still reported: a file cut short
#    keeps its complete rows), and a row that throws is skipped, not the process. Traces come last,
#    in a process of their own (LIBFT_BENCH_PROFILE_ONLY), so that the profiler never runs in a
#    process whose rows are timed. First the end-to-end step of the 1.24B model (eager, then as CUDA
#    graphs, whose capture comes last in case it fails), NF4 and the copy.
unset LIBFT_BENCH_PROFILE LIBFT_BENCH_PROFILE_ONLY
bench() {  # bench SECONDS FILTER NAME: one bench_model process, its rows appended to bench.log
  timeout "$1" build-gpu/benchmarks/bench_model --benchmark_min_time=0.5 --benchmark_filter="$2" \
    --benchmark_out="$out/bench-$3.json" --benchmark_out_format=json >>"$out/bench.log" 2>&1
}
log "benchmarks: the 1.24B LoRA step, NF4 and the copy (at most 100s)"
: >"$out/bench.log"
bench 100 'BM_(NF4Dequant/1/1|DeviceCopy|LoraStepCuda/[012]/[14]/0/0/0|LoraStepCuda/1/4/0/1024/0|LoraStepCuda/[12]/[14]/1/0/0)' step
step_rc=$?

# The NCCL path: `ft launch -n 1` (world size 1, one GPU) on the default job's store, bf16.
log "nccl (ft launch -n 1)"
d=build-gpu/default-job
timeout 90 build-gpu/apps/ft launch -n 1 train configs/train-tiny.yaml device=cuda dtype=bfloat16 max_steps=30 \
  tokenizer=$d/tokenizer "data.train=[$d/fortunes.h5]" checkpoint.every=10 eval.every=10 output_dir=build-gpu/nccl-run \
  >"$out/nccl.log" 2>&1
nccl_rc=$?
# Eager passes against CUDA graphs (cuda_graphs: true), end to end on the bundled model, bf16, the
# same 20 steps; tokens/s and the final loss of each (graphs.log): full fine-tuning, LoRA, and LoRA
# with every opt-in inside the graphs (the chunked loss's recomputing backward node, the extended
# GEMM, the row kernels, grouped projections, the model's fused kernels).
graphs_line=""
: >"$out/graphs.log"
for variant in "full false" "full true" "lora false" "lora true" \
  "lora true loss_chunk=256 lora.extended_gemm=true lora.row_kernels=true lora.group_projections=true kernels.loss=true kernels.rope=true kernels.swiglu=true"; do
  read -r mode graphs opts <<<"$variant"
  extra=(); [ $mode = lora ] && extra=("lora.targets=[all-linear]")
  run=build-gpu/graphs-$mode-$graphs${opts:+-all}
  rm -rf "$run"
  # shellcheck disable=SC2086  # opts is a list of overrides
  timeout 45 build-gpu/apps/ft train configs/train-tiny.yaml device=cuda dtype=bfloat16 max_steps=20 mode=$mode \
    "${extra[@]}" cuda_graphs=$graphs $opts tokenizer=$d/tokenizer "data.train=[$d/fortunes.h5]" \
    checkpoint.every=100 eval.every=100 output_dir="$run" >"$run.log" 2>&1
  rc=$?
  cat "$run.log" >>"$out/graphs.log"
  graphs_line+=$'\n'"  $mode, cuda_graphs $graphs${opts:+, $opts} (exit $rc): $(grep -aoE 'loss [^,]*, [0-9]+ tokens/s' "$run.log" | tail -1)"
done

# Then, in the time left less 45 s (the traces and the summary), each process by a deadline at a
# share of it: the per-layer rows of issue 7's targets (every mode of a layer and token count
# together, most important first); the step rows of the paths that have not run on a GPU (row
# kernels, every opt-in, the shared cast, grouped projections); the other rows of those paths (layer
# modes 5 and 6, ops 19-29, dropout inside the row kernels, the model's fused kernels); the extras
# (packed attention, Gemma 2's soft-capped attention, the per-operation breakdown, other ranks, QLoRA
# through the extended GEMM).
bench_s=$(( $(left) - 45 )); [ $bench_s -lt 80 ] && bench_s=80
log "benchmarks, the rest (at most ${bench_s}s)"
bench_start=$(date +%s)
until_share() { local s=$(( bench_start + bench_s * $1 / 100 - $(date +%s) )); [ $s -lt 15 ] && s=15; echo $s; }
bench "$(until_share 35)" 'BM_LoraLinear/1/[0-4]/[0-2]/16/' layers
bench_rc=$?
bench "$(until_share 68)" 'BM_LoraStepCuda/([34]/[14]/0/0/0|[14]/4/[01]/0/1|5/4/0/0/1|6/4/0/0/0|4/4/1/0/0|[78]/4/0/0/0|8/4/0/0/1)' steps-new
steps_new_rc=$?
bench "$(until_share 88)" 'BM_(LoraLinear/1/[56]/[0-2]/16/|LoraLinearDropout/1/[1-6]/0/16/2048/|LoraOp/(19|2[0-9])/0/16/2048|CrossEntropyCuda|RopeCuda|SwigluCuda)' rows
rows_rc=$?
bench "$(until_share 100)" 'BM_(PackedAttentionCuda|SoftcappedAttention/[01]/1|Forward/1/|RMSNorm|NF4Dequant/1/0|LoraOp/([0-9]|1[0-8])/|LoraOp/(19|2[0-9])/(1/|0/16/8192)|LoraLinearDropout/1/[1-6]/0/16/8192/|LoraLinear/1/[0-6]/[0-2]/(8|64)/|LoraLinear/1/[78]/[0-2]/16/|DoraRowNorm/1/)' extra
extra_rc=$?

# One step of the LoRA rows traced (Kineto: host calls per thread, CUDA kernels), in a process of its
# own; a line per row in bench.log says where the step's time went, and the traces come back as
# profiles.tar.gz.
prof_s=$(( $(left) - 15 )); [ $prof_s -gt 40 ] && prof_s=40
if [ $prof_s -ge 15 ]; then
  log "traces (at most ${prof_s}s)"
  export LIBFT_BENCH_PROFILE=build-gpu/profiles LIBFT_BENCH_PROFILE_ONLY=1
  rm -rf "$LIBFT_BENCH_PROFILE" && mkdir -p "$LIBFT_BENCH_PROFILE"
  timeout $prof_s build-gpu/benchmarks/bench_model \
    --benchmark_filter='BM_(LoraLinear/1/[0-6]/0/16/2048/0|LoraStepCuda/(1/4/0/0/0|4/4/0/0/1|1/4/1/0/0))' >>"$out/bench.log" 2>&1
  unset LIBFT_BENCH_PROFILE LIBFT_BENCH_PROFILE_ONLY
  tar -czf "$out/profiles.tar.gz" -C build-gpu profiles
fi

# The rest of the suite with the GPU visible, in the time that is left.
rest_s=$(( $(left) - 10 ))
ctest_rest_rc=skipped
: >"$out/ctest-rest.log"
if [ $rest_s -ge 20 ]; then
  log "ctest, the rest (at most ${rest_s}s)"
  # -FS: the fixtures that the first ctest call set up are not set up again.
  timeout $rest_s ctest --test-dir build-gpu -E "$gpu_re" -FS "fortunes_store|hf_reference" -j8 --output-on-failure --timeout 240 >"$out/ctest-rest.log" 2>&1
  ctest_rest_rc=$?
  grep -E "tests passed|FAILED|Failed|\(Skipped\)" "$out/ctest-rest.log" | head -40
fi

# 5. Summary (last). The long benchmark list first and the verdicts at the end, so that a reader of
#    only the output's tail (the device tool returns the last 12,000 characters) sees the verdicts.
summary() {
echo
echo "================ libft GPU check summary ================"
echo "benchmarks: (exit $step_rc, then $bench_rc, $steps_new_rc, $rows_rc, $extra_rc)"
# BM_LoraOp's rows and the traced-only rows: in bench.log.
grep -aE '^BM_' "$out/bench.log" | grep -v -e '^BM_LoraOp' -e 'traced only' | sed -E 's#/iterations:[0-9]+##; s#/real_time##; s/  +/  /g' | cut -c1-150 | sed 's/^/  /'

echo "where a step's time goes (more rows in bench.log, traces in profiles.tar.gz):"
grep -aE '^\[profile\] (BM_LoraStepCuda|BM_LoraLinear_1_[0-6]_0_16_2048)' "$out/bench.log" | sed -E 's/; [^;]*\.json$//; s/^/  /'
echo "where the 1.24B step's device time goes, batch 4 (benchmarks/trace_summary.py; fused eager, all opt-ins, CUDA graph):"
for t in BM_LoraStepCuda_1_4_0_0_0 BM_LoraStepCuda_4_4_0_0_1 BM_LoraStepCuda_1_4_1_0_0; do
  [ -f "build-gpu/profiles/$t.json" ] && $python benchmarks/trace_summary.py --top 5 "build-gpu/profiles/$t.json" | sed 's/^/  /'
done
echo "parity (max|a-b|/max|b| of logits vs transformers float32):"
grep -aoE '\[parity\].*' "$out/ctest-gpu.log" | sort -u | sed 's/^/  /'
echo "date        $(date -u +%Y-%m-%d)"
echo "card        $gpu"
echo "torch       $($python -c 'import torch;print(torch.__version__)')"
echo "build       ${build_s}s (cold, $(nproc) cores, TORCH_CUDA_ARCH_LIST=$arch)"
echo "nccl        exit $nccl_rc: $(grep -aE '^\[dist\] [0-9]+ rank' "$out/nccl.log" | head -1 | cut -c1-60); $(grep -aE '^\[train\] done' "$out/nccl.log" | head -1 | cut -c1-120)"
echo "ft train, eager against CUDA graphs (bundled model, bf16, 20 steps):$graphs_line"
echo "ctest, CUDA $(grep -aE '[0-9]+% tests passed' "$out/ctest-gpu.log") (exit $ctest_gpu_rc; $(grep -c '(Skipped)' "$out/ctest-gpu.log") skipped)"
grep -aE '^\s+[0-9]+ - .*\((Failed|Timeout|SEGFAULT|Subprocess|Exception|Not Run)' "$out/ctest-gpu.log" | head -10 | sed 's/^\s*/  failed: /'
echo "ctest, rest $(grep -aE '[0-9]+% tests passed' "$out/ctest-rest.log") (exit $ctest_rest_rc$([ "$ctest_rest_rc" = 124 ] && echo ': cut at the time budget'); $(grep -c '(Skipped)' "$out/ctest-rest.log") skipped)"
echo "targets (issue 7, benchmarks/gpu_targets.py):"
$python benchmarks/gpu_targets.py "$out"/bench-{step,layers,steps-new,rows,extra}.json 2>&1 | sed 's/^/  /'
echo "total       $(($(date +%s) - t0))s"
}
# Also kept as a file: the device tool returns only the output's last 12,000 characters.
summary | tee "$out/summary.txt"
# The exit status: the CUDA tests, and the rest of the suite where it ran to its end (skipped or cut
# at the time budget: not a failure). The NCCL and training runs' exits are in the summary above.
[ $ctest_gpu_rc = 0 ] && { [ "$ctest_rest_rc" = 0 ] || [ "$ctest_rest_rc" = skipped ] || [ "$ctest_rest_rc" = 124 ]; }
