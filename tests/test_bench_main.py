"""benchmarks/bench_main.py: its JPEG folder and its reading of a real main.py log (the parser must follow main.py's
log format, or the end-to-end figures silently go missing)."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mnist_mini import REPO, make_mini_mnist

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_main  # noqa: E402


def test_jpeg_folder_has_imagenet_layout_and_natural_sizes(tmp_path):
    info = bench_main.write_jpeg_folder(tmp_path, n_train=12, n_val=4, classes=3, workers=1)
    assert (info['train_images'], info['val_images'], info['classes']) == (12, 4, 3)
    for split, n in (('train', 12), ('val', 4)):
        classes = sorted(os.listdir(tmp_path / split))
        assert classes == ['n00000000', 'n00000001', 'n00000002']
        files = [tmp_path / split / c / f for c in classes for f in os.listdir(tmp_path / split / c)]
        assert len(files) == n and all(str(f).endswith('.JPEG') for f in files)
    with Image.open(files[0]) as im:
        assert im.format == 'JPEG' and im.mode == 'RGB' and 300 <= min(im.size) <= 500
    assert 20 < info['mean_kb'] < 400


def test_parser_reads_a_real_main_py_log(tmp_path):
    """A tiny sparse run with EMA on CPU: start-up phases, first step, 20-step windows, evaluations."""
    data = make_mini_mnist(str(tmp_path / 'data'), 20, 5)  # 200 train / 50 val images
    cmd = [sys.executable, 'main.py', '--model', 'SLaK_tiny', '--Decom', 'true', '--sparse', '-u', '30',
           '--width_factor', '0.125', '--kernel_size', '7', '7', '5', '5', '3', '--input_size', '32', '--epochs', '2',
           '--batch_size', '8', '--print_freq', '5', '--warmup_epochs', '0', '--mixup', '0', '--cutmix', '0',
           '--aa', 'none', '--num_workers', '0', '--pin_mem', 'false', '--device', 'cpu', '--model_ema', 'true',
           '--model_ema_eval', 'true', '--data_path', data, '--output_dir', str(tmp_path / 'out')]
    lines = bench_main.run_logged(cmd, dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'), timeout=300)
    figures = bench_main.parse_main_log(lines, val_images=50)
    assert figures['exit_code'] == 0, [line for _, line in lines[-5:]]
    order = ['data_ready_s', 'masks_ready_s', 'flops_counted_s', 'training_starts_s', 'first_step_s']
    times = [figures[k] for k in order]
    assert all(t is not None for t in times), figures
    assert times == sorted(times)
    assert figures['img_s'] > 0 and figures['img_s_with_updates'] > 0  # windows ending at steps 20 and 24
    assert 0 < figures['first_eval_s'] < 60 and figures['eval_img_s'] > 0
    assert figures['peak_mem_gb'] is None  # CPU run: no 'max mem' column


def test_eval_parser_reads_a_real_main_py_eval_log_through_the_training_images_view(tmp_path):
    """Issue 20's main.py --eval true figures: the view gives the evaluation the training images (links, both
    splits), a main.py-format sparse checkpoint (the writer bench_downstream uses too) loads with --resume, and the
    parser finds the steady img/s, the first batch's and the end's seconds, the images counted and their top-1."""
    data = make_mini_mnist(str(tmp_path / 'data'), 20, 5)  # 200 train / 50 val images
    view = bench_main.eval_view(data, tmp_path / 'view')
    assert os.path.realpath(os.path.join(view, 'val')) == os.path.realpath(os.path.join(data, 'train'))
    assert bench_main.eval_view(data, tmp_path / 'view') == view  # kept, not re-linked
    flags = ['--Decom', 'true', '--width_factor', '0.125', '--kernel_size', '7', '7', '5', '5', '3',
             '--nb_classes', '10']
    checkpoint = tmp_path / 'ckpt.pth'
    density = bench_main.write_classification_checkpoint(checkpoint, flags, 0.4)['density_2d_4d']
    assert density == pytest.approx(0.6, abs=0.02)
    cmd = [sys.executable, 'main.py', '--model', 'SLaK_tiny', '--eval', 'true', *flags[:-2], '--input_size', '32',
           '--resume', str(checkpoint), '--data_path', view, '--batch_size', '16', '--num_workers', '0',
           '--pin_mem', 'false', '--device', 'cpu']
    lines = bench_main.run_logged(cmd, dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'), timeout=300)
    figures = bench_main.parse_eval_log(lines)
    assert figures['exit_code'] == 0, [line for _, line in lines[-5:]]
    assert figures['images'] == 200 and 0 <= figures['acc1'] <= 100  # the training images, through the view
    assert figures['eval_img_s'] > 0 and 0 < figures['first_batch_s'] <= figures['done_s']


@pytest.mark.parametrize('text, expected', [
    ('Epoch: [1]  [19/100]  eta: 0:00:01  img/s: 1000.0  max mem: 2048', (1000.0, 2.0)),
])
def test_parser_skips_windows_with_a_prune_grow_update(text, expected):
    lines = [(1.0, 'Epoch: [0]  [ 0/100]  img/s: 10.0  max mem: 1024'), (2.0, text),
             (3.0, 'prune/grow at step 120: density 0.6000, prune rate 0.4, 150.0 ms'),
             (4.0, 'Epoch: [1]  [39/100]  img/s: 500.0  max mem: 2048'), (5.0, 'bench_main: exit code 0')]
    lines.insert(0, (0.5, 'Triton kernels: 37 versions compiled ahead of the first step in 4.2 s'))
    lines.insert(1, (0.6, 'Block tails: 7 training graphs traced ahead of the first step in 12.5 s'))
    figures = bench_main.parse_main_log(lines, val_images=10)
    assert (figures['precompiled_kernels'], figures['precompile_s']) == (37, 4.2)
    assert (figures['graphs_ahead'], figures['graphs_ahead_s']) == (7, 12.5)
    assert (figures['img_s'], figures['peak_mem_gb']) == expected
    assert figures['img_s_with_updates'] == pytest.approx(750.0)
    assert figures['first_step_s'] == 1.0 and figures['exit_code'] == 0


def test_run_logged_kills_a_silent_command_at_its_timeout():
    """The timeout holds even when the command prints nothing (a hung run must not eat the device call)."""
    import time
    start = time.time()
    lines = bench_main.run_logged([sys.executable, '-c', 'print("started", flush=True); import time; time.sleep(60)'],
                                  dict(os.environ), timeout=2)
    assert time.time() - start < 20
    assert [line for _, line in lines][0] == 'started'
    assert lines[-2][1] == 'bench_main: killed after 2 s' and lines[-1][1] == 'bench_main: exit code -9'


def test_main_runs_go_in_the_order_asked_and_unknown_names_are_refused():
    assert bench_main.main_run_order('all') == ['slak_cold', 'convnext', 'convnext_compile', 'slak_warm']
    # non-main.py runs (the loader, the bare-step benchmarks) are accepted and left to their own places
    assert bench_main.main_run_order('loader,slak_compile_ro,convnext,slak_compile_ro,throughput_graph') == [
        'slak_compile_ro', 'convnext']
    flags, cache, env = bench_main.MAIN_RUNS['slak_compile_ro']
    assert flags[-4:] == ['--compile', 'true', '--compile_mode', 'reduce-overhead'] and cache == 'slak_compile_ro'
    assert bench_main.MAIN_RUNS['slak_warm'][1] == bench_main.MAIN_RUNS['slak_cold'][1]  # warm reuses cold's caches
    for bad in ('slak_fast', ''):
        with pytest.raises(ValueError, match='unknown run'):
            bench_main.main_run_order(bad)


def test_parser_reads_the_cuda_graph_and_reserved_memory_lines():
    """main.py --cuda_graph true on a GPU prints the capture's seconds and, at the end, the reserved peak (a graph's
    memory pool is reserved, not allocated, between replays): the parser keeps both, in main.py's wording."""
    import main
    import inspect
    source = inspect.getsource(main)
    assert "f'CUDA graphs: training forward and backward captured at batch {args.batch_size} in '" in source
    assert "print(f'Peak GPU memory reserved: {" in source
    lines = [(9.0, 'CUDA graphs: training forward and backward captured at batch 128 in 3.4 s'),
             (9.5, 'Epoch: [0]  [  0/100]  eta: 0:01:00  img/s: 100.0  max mem: 12000'),
             (99.0, 'Peak GPU memory reserved: 14.25 GiB')]
    figures = bench_main.parse_main_log(lines, val_images=10)
    assert figures['graph_capture_s'] == 3.4 and figures['peak_reserved_gb'] == 14.25 and figures['first_step_s'] == 9.5


def test_parser_reads_the_snip_and_graph_warm_up_lines(capsys):
    """Start-up's parts: SNIP's wait for its batch and its scoring pass, and the background trace of the tail graphs
    (the line a real GraphWarmUp prints), in sparse_core's and SLaK's wording."""
    import inspect
    import SLaK
    import sparse_core
    assert ("print(f'SNIP: first batch in {batch_s:.1f} s, scoring pass in "
            "{time.perf_counter() - start - batch_s:.1f} s')") in inspect.getsource(sparse_core)
    SLaK.GraphWarmUp(lambda: None, meanwhile=lambda: None).wait(timeout=30)
    warm_line = capsys.readouterr().out.strip().splitlines()[-1]
    lines = [(12.0, 'SNIP: first batch in 0.8 s, scoring pass in 2.5 s'), (13.0, warm_line),
             (20.0, 'Epoch: [0]  [  0/100]  eta: 0:01:00  img/s: 100.0  max mem: 12000')]
    figures = bench_main.parse_main_log(lines, val_images=10)
    assert figures['snip_batch_s'] == 0.8 and figures['snip_pass_s'] == 2.5
    assert figures['graphs_ahead'] == 0 and figures['graphs_ahead_s'] == 0.0 and figures['first_step_s'] == 20.0


def test_tail_compile_time_counts_one_graph_per_mode_for_every_stage_when_dynamic(tmp_path):
    """benchmarks/tail_compile_time.py (tracing only, no code generation): SLaK-T's four stage shapes take four
    training and four evaluation graphs by default and one of each with SLAK_TAIL_SHAPES=dynamic, each equal to the
    eager tail."""
    out = tmp_path / 'tails.json'
    run = subprocess.run([sys.executable, 'benchmarks/tail_compile_time.py', '--backend', 'count', '--json',
                          str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    reports = {r['mode']: r for r in json.loads(out.read_text())}
    assert (reports['static']['train_graphs'], reports['static']['graphs']) == (4, 8)
    assert (reports['dynamic']['train_graphs'], reports['dynamic']['graphs']) == (1, 2)
    assert all(r['max_abs_diff'] == 0.0 for r in reports.values())


def test_eval_runs_are_the_readme_command_then_bf16_then_gpu_decoding():
    """Issue 20's main.py --eval runs: the README's evaluation command as written (no extra flag), then bf16 at the
    benchmark's batch, then the same with the JPEGs decoded on the GPU, then both decoders at once; every flag is
    one main.py accepts, and passes its checks."""
    import main
    assert list(bench_main.EVAL_RUNS) == ['slak_eval', 'slak_eval_bf16', 'slak_eval_bf16_gpu', 'slak_eval_bf16_mix']
    assert bench_main.eval_run_flags('slak_eval', 128, 0.4) == []
    assert bench_main.EVAL_RUNS['slak_eval_bf16_gpu'][-2:] == ['--gpu_pipeline', 'true']
    assert bench_main.eval_run_flags('slak_eval_bf16_mix', 128, 0.4)[-2:] == ['--gpu_pipeline_cpu_share', '0.4']
    for name in bench_main.EVAL_RUNS:
        args = main.get_args_parser().parse_args([*bench_main.EVAL_FLAGS, *bench_main.eval_run_flags(name, 128, 0.4),
                                                  '--resume', 'x.pth', '--device', 'cpu'])
        main.check_args(args)
        assert args.eval is True and args.model == 'SLaK_tiny'
    assert bench_main.main_run_order('slak_eval_bf16_gpu,slak_cold') == ['slak_cold']
