#!/usr/bin/env bash
# One device call of issue 18's end-to-end measurement (see benchmarks/bench_main.py and RESULTS.md "End to end").
#   bash benchmarks/device_e2e.sh main     main.py runs: data, loader, SLaK-T cold and warm (the defaults: CUDA
#                                          graphs, tail graphs traced ahead), ConvNeXt-T eager and compiled, SLaK-T
#                                          warm with SLAK_WARM_GRAPHS=0, then SLaK-T's bare-step graph replays at the
#                                          same batch, as time allows (~9-10 min on one H100); MAIN_RUNS picks others,
#                                          in its order (bench_main.py --runs); GPU_TEST=1 first runs the --cuda_graph
#                                          GPU test (~80 s), IMPORT_CHECK=0 skips timing two bare imports (~20 s)
#   bash benchmarks/device_e2e.sh bench    bare steps (bench_throughput eager + graph) and the memory breakdown
#   bash benchmarks/device_e2e.sh profile  start-up phase by phase (profile_startup.py): cold and warm as main.py
#                                          runs by default, then cold and warm with SLAK_WARM_GRAPHS=0 (~5 min;
#                                          PROFILE_RUNS to choose)
#   bash benchmarks/device_e2e.sh compile [B] SLaK-T compiled as a whole (with Inductor's BNs, and with our fused
#                                          branch BN as an op: "op BN") vs eager + compiled tails vs compiled
#                                          ConvNeXt-T (graph replays, training batch B, default 64), then each
#                                          one's step split by kernel group (profile_step.py; ~8 min in all)
#   bash benchmarks/device_e2e.sh step [B]  issue 20: where the GPU time of a training step goes (profile_step.py),
#                                          SLaK-T, its two ceilings (depthwise convs / large-kernel part free) and
#                                          compiled ConvNeXt-T, kernels grouped (batch B, default 64; ~4 min)
#   bash benchmarks/device_e2e.sh inferprofile [B]  issue 20: where the GPU time of folded SLaK-T's inference goes
#                                          (eager and compiled as a whole) against compiled ConvNeXt-T's (batch B,
#                                          default 128; ~4 min)
#   bash benchmarks/device_e2e.sh eval     issue 20: main.py --eval true with the README's evaluation command (fp32 as
#                                          written, bf16 at batch 128, that with --gpu_pipeline true, and with
#                                          --gpu_pipeline_cpu_share 0.4: both decoders) on a 12,800-image view, the
#                                          three evaluation loaders alone, and folded SLaK-T's graph-replay
#                                          inference (~5 min)
#   bash benchmarks/device_e2e.sh ab [B]   the suite's GPU-only tests, then session 11's eager-path changes
#                                          (channels_first LayerNorm, one-pass input gradient) against the old ops,
#                                          graph replays and eager, 2 rounds (~8-9 min)
#   bash benchmarks/device_e2e.sh wgrad [B] GPU-only tests, the weight-gradient sweep (all-columns kernel included,
#                                          every candidate checked), then `ab`'s four models, graph replays (~9 min)
#   bash benchmarks/device_e2e.sh allj     training graph replays at batch 64 (per-column weight gradient as the A/B)
#                                          and 128, eager + tails and whole compile, then GPU-only kernel tests
#   bash benchmarks/device_e2e.sh ncu [B]  issue 20: Nsight Compute counters of every kernel of one training step
#                                          (ncu_step.py: per group time, DRAM bytes, bandwidth, occupancy), SLaK-T,
#                                          compiled ConvNeXt-T and SLaK-T dwconv=identity (NCU_MODELS to choose)
#   bash benchmarks/device_e2e.sh kernels  issue 20's record: graph replays at training batch 64 and 128 (compiled
#                                          ConvNeXt-T, SLaK-T whole-compiled; folded SLaK-T compiled and eager
#                                          inference), the L2-rotating layer check (bench_dwconv --rotate_mb 256),
#                                          compiled_baseline_<card>.json, then eager-launch training (~10 min)
# Needs the pinned timm/tensorboardX wheels in .whl/ (see the device README); writes everything under $OUT.
set -u
START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
# byte-compile them as a user's pip install does (--no-compile skips it, and with PYTHONDONTWRITEBYTECODE set every
# process would compile timm's sources again on import: start-up would be timed slower than users meet it)
python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1 || true
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; nproc;
  python3 -c "import torch, triton, timm, torchvision; print('torch', torch.__version__, 'triton', triton.__version__,
  'timm', timm.__version__, 'torchvision', torchvision.__version__)"
  uptime; ps -eo pid,etimes,pcpu,rss,args --sort=-pcpu | head -8 | cut -c1-160  # left over from a call before?
  # main.py's imports took ~8 s here even warm (issue 18, session 10): are .pyc files written, and what do two
  # consecutive imports of torch + timm take (the second with the page cache and .pyc files of the first)?
  # (IMPORT_CHECK=0 skips them: ~20 s)
  if [ "${IMPORT_CHECK:-1}" = 1 ]; then
    for i in 1 2; do TIMEFORMAT="import torch, timm #$i: %R s"; time python3 -c "import sys, torch, timm
print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'timm at', timm.__file__)"; done; fi
  # which modules those seconds go to (cumulative microseconds per import, largest first; IMPORTTIME=1, ~10 s)
  if [ "${IMPORTTIME:-0}" = 1 ]; then python3 -X importtime -c "import torch, timm" 2> "$OUT/importtime.txt"
    sort -t'|' -k2 -n -r "$OUT/importtime.txt" | head -25; fi
} 2>&1 | tee "$OUT/machine.txt"
# seconds left until second $1 of a 600 s call; E2E_END_S (default 600) scales every such deadline, for a call
# given less time (e.g. E2E_END_S=450 with run's timeout_s=460 when little device time is left)
left() { echo $(( $1 * ${E2E_END_S:-600} / 600 - $(date +%s) + START )); }
case "${1:-main}" in
  main)
    # GPU_TEST=1: first the GPU-only test of --cuda_graph (replayed steps against eager ones), then the main.py
    # runs; THROUGHPUT_MODELS (bench_throughput.py names; default SLaK-T only) and THROUGHPUT_INFER_BATCH (default 0:
    # training only) shape the throughput/throughput_graph runs in MAIN_RUNS
    if [ "${GPU_TEST:-0}" = 1 ]; then
      timeout 120 python3 -m pytest -q -p no:cacheprovider -k "gpu_cuda_graph" tests/test_main.py 2>&1 | tail -4 \
        | tee "$OUT/gpu_tests.txt"; fi
    python3 benchmarks/bench_main.py --out "$OUT" --data_root "$PWD/.bench/data" --cache_root "$PWD/.bench/cache" \
      --runs "${MAIN_RUNS:-loader,slak_cold,slak_warm,convnext,convnext_compile,slak_warm_nowg,throughput_graph}" \
      --budget_s "$(left 480)" --throughput_budget_s "$(left 510)" --run_timeout_s 250 \
      --throughput_models "${THROUGHPUT_MODELS:-SLaK-T ours}" --throughput_infer_batch "${THROUGHPUT_INFER_BATCH:-0}" \
      2>&1 | grep -v -e '^Test:' -e '^  ' | tee "$OUT/bench_main.log" | tail -40 ;;
  bench)
    python3 benchmarks/bench_main.py --out "$OUT" --data_root "$PWD/.bench/data" --cache_root "$PWD/.bench/cache" \
      --runs throughput,throughput_graph --budget_s "$(left 300)" --run_timeout_s 200 \
      2>&1 | tee "$OUT/bench_main.log" | tail -20
    timeout "$(left 540)" python3 benchmarks/memory_breakdown.py 2>&1 | tee "$OUT/memory.txt" | tail -30 ;;
  profile)
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; import bench_main as b
root = Path('.bench/data')
print(b.write_jpeg_folder(root, 12800, 1280, 100, 16) if not (root / 'val').is_dir() else 'data: kept')"
    FLAGS=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_main as b
print(' '.join(b.SLAK_T_FLAGS + b.COMMON_FLAGS))")
    # cold and warm as main.py runs by default (the parallel kernel precompile, the tail graphs traced ahead, the
    # CUDA-graph capture), then cold and warm without the graphs traced ahead (SLAK_WARM_GRAPHS=0)
    timeout "$(left 440)" python3 benchmarks/profile_startup.py --out "$OUT" --cache_root "$PWD/.bench/pcache" \
      --runs "${PROFILE_RUNS:-cold,warm,cold_nowg,warm_nowg}" --steps 3 --eval_batches 2 --timeout_s 200 -- $FLAGS \
      --batch_size 128 --epochs 2 --data_path .bench/data --num_workers 16 2>&1 | tee "$OUT/profile_startup.txt" ;;
  compile)
    # is a whole-model torch.compile of SLaK-T (our op inside, plain BatchNorms for Inductor to fuse) faster than
    # eager + the blocks' compiled tails? Graph replays at training batch ${2:-64}, beside compiled ConvNeXt-T.
    FOLDED="SLaK-T ours folded decomposed,SLaK-T ours folded decomposed torch.compile"  # (inference only)
    WHOLE="SLaK-T ours torch.compile"
    timeout "$(left 560)" python3 benchmarks/bench_throughput.py --graph --train-batch "${2:-64}" --infer-batch 128 \
      --steps 20 --models "convnext_tiny (timm) torch.compile,$WHOLE,$WHOLE op BN,SLaK-T ours,$FOLDED" \
      --json "$OUT/throughput_compile_b${2:-64}.json" 2>&1 | grep -v -i warn | tee "$OUT/compile.log"
    # then where each one's step time goes (Inductor's FX/Triton caches are warm from the runs above)
    timeout "$(left 560)" python3 benchmarks/profile_step.py --batch "${2:-64}" --steps 3 --models \
      "SLaK-T ours torch.compile op BN,SLaK-T ours torch.compile,convnext_tiny (timm) torch.compile,SLaK-T ours" 2>&1 \
      | grep -v -i warn | tee "$OUT/profile_step_compile_b${2:-64}.txt" ;;
  eval)
    python3 benchmarks/bench_main.py --out "$OUT" --data_root "$PWD/.bench/data" --cache_root "$PWD/.bench/cache" \
      --runs eval_loader,eval_loader_gpu,eval_loader_mix,slak_eval_bf16,slak_eval_bf16_gpu,slak_eval_bf16_mix,slak_eval --budget_s "$(left 400)" --run_timeout_s 200 2>&1 \
      | grep -v -e '^Test:' | tee "$OUT/bench_eval.log" | tail -20
    timeout "$(left 560)" python3 benchmarks/bench_throughput.py --graph --train-batch 64 --infer-batch 128 \
      --steps 20 --models "SLaK-T ours folded decomposed" --json "$OUT/throughput_folded_b128.json" 2>&1 \
      | grep -v -i warn | tee -a "$OUT/bench_eval.log" ;;
  step)
    timeout "$(left 560)" python3 benchmarks/profile_step.py --batch "${2:-64}" --steps 3 --models \
      "SLaK-T ours,SLaK-T dwconv=identity,SLaK-T large_kernel=identity,convnext_tiny (timm) torch.compile" 2>&1 \
      | grep -v -i warn | tee "$OUT/profile_step_b${2:-64}.txt" ;;
  inferprofile)
    # issue 20: where folded SLaK-T's inference time goes against compiled ConvNeXt-T's (profile_step.py --infer:
    # eager bf16 forwards, kernels grouped; batch B, default 128; ~4 min)
    timeout "$(left 560)" python3 benchmarks/profile_step.py --infer --batch "${2:-128}" --steps 3 --models \
      "SLaK-T ours folded decomposed,SLaK-T ours folded decomposed torch.compile,convnext_tiny (timm) torch.compile" \
      2>&1 | grep -v -i warn | tee "$OUT/profile_infer_b${2:-128}.txt" ;;
  ab)
    # session 11's eager-path changes, A/B in one process: the channels_first LayerNorm through F.layer_norm and the
    # block input's gradient in one pass, each against the old ops; graph replays, then eager launches (host time
    # counts there), then where the remaining elementwise time comes from (profile_step names the launching ops)
    # first the suite's GPU-only tests (they skip on CPU CI): the new kernels' results against references
    timeout 240 python3 -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/test_branch_bn.py \
      tests/test_dwconv.py tests/test_slak.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
    AB="SLaK-T ours,SLaK-T ours torch fan-in,SLaK-T ours original LN,SLaK-T ours original LN torch fan-in"
    for g in --graph ""; do
      timeout "$(left 400)" python3 benchmarks/bench_throughput.py $g --train-batch "${2:-64}" --infer-batch 128 \
        --steps 20 --repeats 2 --models "$AB" --json "$OUT/throughput_ab${g:+_graph}_b${2:-64}.json" 2>&1 \
        | grep -v -i warn | tee -a "$OUT/ab.log"
    done
    timeout "$(left 560)" python3 benchmarks/profile_step.py --batch "${2:-64}" --steps 3 --models "SLaK-T ours" 2>&1 \
      | grep -v -i warn | tee "$OUT/profile_step_ab_b${2:-64}.txt" ;;
  wgrad)
    # the suite's GPU-only tests; the weight-gradient tiles and the never-timed all-columns kernel (each candidate
    # checked against the default launch first); then session 11's eager-path changes, graph replays, one round
    timeout 200 python3 -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/test_branch_bn.py \
      tests/test_dwconv.py tests/test_slak.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
    timeout "$(left 330)" python3 benchmarks/bench_dwconv.py --skip-check --skip-table --sweep --sweep-pass wgrad \
      --sweep-maps 56,28,14,7 --json "$OUT/wgrad_sweep.json" 2>&1 | grep -v -i warn | tee "$OUT/wgrad_sweep.txt"
    AB="SLaK-T ours,SLaK-T ours torch fan-in,SLaK-T ours original LN,SLaK-T ours original LN torch fan-in"
    timeout "$(left 570)" python3 benchmarks/bench_throughput.py --graph --train-batch "${2:-64}" --infer-batch 128 \
      --steps 20 --models "$AB" --json "$OUT/throughput_ab_graph_b${2:-64}.json" 2>&1 | grep -v -i warn \
      | tee -a "$OUT/ab.log" ;;
  allj)
    # session 12: the all-columns weight gradient made the default. Training graph replays (no inference) at batch
    # 64 with the per-column kernel as the same-call A/B, eager + compiled tails and whole-model compile, then batch
    # 128, then the GPU-only tests of the kernels and of the block's one-pass input gradient (~8 min in all;
    # ALLJ_END_S, default 560, is the second by which everything must be done)
    E=${ALLJ_END_S:-560}
    M="convnext_tiny (timm) torch.compile,SLaK-T ours,SLaK-T ours per-column wgrad,SLaK-T ours torch.compile"
    timeout "$(left $((E * 7 / 10)))" python3 benchmarks/bench_throughput.py --graph --train-batch 64 --infer-batch 0 \
      --steps 20 --models "$M" --json "$OUT/throughput_allj_b64.json" 2>&1 | grep -v -i warn | tee -a "$OUT/allj.log"
    M="convnext_tiny (timm) torch.compile,SLaK-T ours torch.compile,SLaK-T ours"
    timeout "$(left $((E * 95 / 100)))" python3 benchmarks/bench_throughput.py --graph --train-batch 128 \
      --infer-batch 0 --steps 20 --models "$M" --json "$OUT/throughput_allj_b128.json" 2>&1 | grep -v -i warn \
      | tee -a "$OUT/allj.log"
    timeout "$(left "$E")" python3 -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/test_dwconv.py \
      tests/test_slak.py::test_gpu_one_pass_input_gradient_and_layer_norm_match_the_old_ops \
      tests/test_branch_bn.py::test_gpu_compiled_model_with_the_branch_bn_op_matches_eager 2>&1 | tail -8 \
      | tee "$OUT/gpu_tests.txt" ;;
  ncu)
    # issue 20's ncu evidence: the counters of every kernel of one training step (benchmarks/ncu_step.py)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
    M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
    M=$M,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread
    IFS=',' read -ra models <<< "${NCU_MODELS:-SLaK-T ours,convnext_tiny (timm) torch.compile,SLaK-T dwconv=identity}"
    for m in "${models[@]}"; do
      f="$OUT/ncu_step_$(echo "$m" | tr -c 'A-Za-z0-9=\n' _)_b${2:-64}"
      timeout "$(left 560)" "$NCU" --clock-control none --profile-from-start off --csv --page raw --print-units base \
        --metrics "$M" python3 benchmarks/ncu_step.py run --model "$m" --batch "${2:-64}" > "$f.csv" 2> "$f.err"
      echo "== $m (ncu exit $?)"; tail -3 "$f.err"
      python3 benchmarks/ncu_step.py report "$f.csv" 2>&1 | tee "$f.txt" | head -24
    done ;;
  kernels)
    # issue 20's record in one call (~9.5 min on one H100): training graph replays at batch 64 and 128 of compiled
    # ConvNeXt-T and whole-model-compiled SLaK-T (the faster path since session 12), inference at 128 only for
    # compiled ConvNeXt-T and folded SLaK-T (compiled and eager tails), the L2-rotating layer check, the record;
    # then, with the compile caches warm, the same training without graphs (as users run them) in what time is left
    C="convnext_tiny (timm) torch.compile"; S="SLaK-T ours torch.compile"; F="SLaK-T ours folded decomposed"
    timeout "$(left 230)" python3 benchmarks/bench_throughput.py --graph --train-batch 64 --infer-batch 0 --steps 20 \
      --models "$C,$S" --json "$OUT/throughput_b64.json" 2>&1 | grep -v -i warn | tee -a "$OUT/kernels.log"
    timeout "$(left 450)" python3 benchmarks/bench_throughput.py --graph --train-batch 128 --infer-batch 128 \
      --steps 20 --models "$C,$S,$F torch.compile,$F" --infer-models "$C,$F torch.compile,$F" \
      --json "$OUT/throughput_b128.json" 2>&1 | grep -v -i warn | tee -a "$OUT/kernels.log"
    timeout "$(left 520)" python3 benchmarks/bench_dwconv.py --skip-check --rotate_mb 256 \
      --layers_json "$OUT/layers_rotate256.json" 2>&1 | tee -a "$OUT/kernels.log" | tail -20
    python3 benchmarks/compiled_baseline.py --b64 "$OUT/throughput_b64.json" --b128 "$OUT/throughput_b128.json" \
      --layers "$OUT/layers_rotate256.json" --out "$OUT" 2>&1 | tee -a "$OUT/kernels.log"
    timeout "$(left 590)" python3 benchmarks/bench_throughput.py --train-batch 64 --infer-batch 0 --steps 20 \
      --models "$C,$S,SLaK-T ours" --json "$OUT/throughput_eager_b64.json" 2>&1 | grep -v -i warn \
      | tee -a "$OUT/kernels.log" ;;
esac
echo "device_e2e: total $(( $(date +%s) - START )) s"
