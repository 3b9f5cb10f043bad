"""Multi-GPU checks and scaling for main.py / main_KD.py under torchrun (issue: "Multi-GPU for real").

Runs, one after another, each as real ``torchrun`` jobs (NCCL on GPUs, gloo with ``--device cpu``):

1. scaling: SLaK-T (51 49 47 13 5, width 1.3, Decom) with ``--sparse``, SyncBN, EMA, bf16 AMP and ``--update_freq 2``
   on N = 1, 2, 4 processes, same per-GPU batch, synthetic 224x224 data; img/s from rank 0's steady-state window
   times N, efficiency vs linear, prune/grow update time, and per-rank checksums of weights and masks after several
   prune/grow updates (they must be equal on every rank);
2. the legacy ``python -m torch.distributed.launch`` launcher;
3. ``--eval true --dist_eval true`` on N processes vs 1 on a validation set whose size is not a multiple of N;
4. ``main_KD.py`` distributed (SLaK teacher, ConvNeXt-emulation student, NKD);
5. crash and resume: SIGKILL the whole job mid-epoch, check no checkpoint is half-written, restart with
   ``--auto_resume true`` and check it continues from the last checkpoint;
6. kill one rank: the others must stop (not hang) and the job exit non-zero;
7. an all-reduce probe: the time one all-reduce of SLaK-T's gradient (fp32) takes on N GPUs.

Usage (GPU machine, from the repository root)::

    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --gpus 1,2,4 --out $OUT
    python benchmarks/multigpu.py --device cpu --tiny --gpus 1,2 --out /tmp/mg    # CPU smoke run (gloo)

Prints a table; full logs go to ``OUT/multigpu_logs.txt`` and numbers to ``OUT/multigpu.json``.
"""
import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = []


def sh(cmd, timeout, env=None, name=''):
    """Run a command, keep its output for the log file, return (exit code, output)."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = 'timeout', (e.stdout or b'').decode(errors='replace') + (e.stderr or b'').decode(errors='replace')
    LOGS.append(f'==== {name} ({time.time() - start:.0f} s, exit {code}): {" ".join(cmd)}\n{out}')
    print(f'[{time.strftime("%H:%M:%S")}] {name}: exit {code} in {time.time() - start:.0f} s', flush=True)
    return code, out


def save(a, results):
    """Write what is known so far (a run cut short by its time limit still returns its numbers)."""
    with open(os.path.join(a.out, 'multigpu.json'), 'w') as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(a.out, 'multigpu_logs.txt'), 'w') as f:
        f.write('\n'.join(LOGS))


def torchrun(n, script='main.py'):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', script]


def checksums(out):
    """{rank: (weights, masks)} from main.py's per-rank checksum lines."""
    found = re.findall(r'\[rank (\d+)\] checksum weights (\S+) masks (\S+)', out)
    return {int(r): (w, m) for r, w, m in found}


def last_rate(out):
    rates = re.findall(r'Epoch: \[\d+\].*?img/s: ([\d.]+)', out)
    return float(rates[-1]) if rates else float('nan')


def update_ms(out):
    """Milliseconds of each prune/grow update, in order, from main.py's log."""
    return [float(x) for x in re.findall(r'^prune/grow at step \d+: .*, ([\d.]+) ms$', out, flags=re.M)]


def rate_without_updates(out, upd, batch, steps, u, update_freq=2, window=20):
    """Rank 0's img/s over the logged window (the last ``window`` micro-batches, utils.SmoothedValue's default) with
    the prune/grow updates that fall inside it taken out (``upd``: their ms, from :func:`update_ms`): they cost
    110-160 ms each, vary run to run, and made the raw window's rate swing by about +-10 %. Updates run after
    optimizer steps k with k % u == 0."""
    times = re.findall(r'Epoch: \[\d+\].*?time: ([\d.]+)\s+data:', out)
    if not times:
        return float('nan')
    window = min(window, steps * update_freq)
    first_step = steps - window // update_freq + 1
    inside = sum(1 for k in range(first_step, steps + 1) if k % u == 0)
    seconds = window * float(times[-1]) - (sum(upd[len(upd) - inside:]) / 1000 if inside else 0.0)
    return window * batch / seconds


def model_args(a):
    if a.tiny:
        return ['--model', 'SLaK_tiny', '--Decom', 'true', '--width_factor', '0.125', '--kernel_size', '7', '7', '5',
                '5', '3', '--input_size', '32', '--batch_size', '8', '--nb_classes', '10']
    return ['--model', 'SLaK_tiny', '--Decom', 'true', '--width_factor', '1.3', '--kernel_size', '51', '49', '47', '13',
            '5', '--input_size', '224', '--batch_size', str(a.batch_size), '--nb_classes', '1000']


def common(a, out_dir, steps, n, epochs=1):
    per_step = (8 if a.tiny else a.batch_size) * 2 * n
    return model_args(a) + [
        '--data_set', 'synthetic', '--synthetic_size', str(per_step * steps), '--device', a.device,
        '--sparse', '--sparsity', '0.4', '--sparse_init', 'snip', '--prune_rate', '0.3', '-u', str(a.u),
        '--update_freq', '2', '--model_ema', 'true', '--sync_bn', 'true', '--use_amp', str(a.device == 'cuda').lower(),
        '--amp_dtype', 'bfloat16', '--epochs', str(epochs), '--warmup_epochs', '0', '--num_workers', '4',
        '--disable_eval', 'true', '--output_dir', out_dir, '--save_ckpt_freq', '1', '--lr', '1e-3']


def descendants(pid):
    kids = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(pid)], capture_output=True, text=True).stdout.split()
    result = []
    for k in map(int, kids):
        result += [k] + descendants(k)
    return result


def local_rank_of(pid):
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
        return int(env.get(b'LOCAL_RANK', b'-1'))
    except (OSError, ValueError):
        return -1


def spawn(cmd, log_path):
    log = open(log_path, 'w')
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def wait_for(path_glob_or_text, log_path, timeout, proc):
    """Wait until a file matching the glob exists, or the text appears in the log; False on timeout/exit."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if path_glob_or_text.startswith('glob:'):
            if glob.glob(path_glob_or_text[5:]):
                return True
        elif path_glob_or_text in open(log_path).read():
            return True
        time.sleep(0.5)
    return False


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--gpus', default='1,2,4')
    p.add_argument('--device', default='cuda')
    p.add_argument('--tiny', action='store_true', help='small model and images (CPU smoke run)')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--steps', type=int, default=40, help='optimizer steps per scaling run')
    p.add_argument('-u', type=int, default=5, help='prune/grow every u optimizer steps')
    p.add_argument('--out', default='/tmp/multigpu')
    p.add_argument('--skip', default='', help='comma-separated step names to skip')
    p.add_argument('--deadline', type=float, default=1e9, help='seconds; later steps are skipped after it')
    p.add_argument('--extra', default='', help='extra main.py flags for the scaling runs, e.g. "--sync_bn false"')
    p.add_argument('--variant', action='append', default=[],
                   help='"label|tokens": one more scaling run at the largest N; tokens are main.py flags and '
                        'NAME=VALUE environment settings, e.g. "one collective per BN|SLAK_SYNCBN_FUSE_BRANCHES=0"')
    a = p.parse_args()
    t_start = time.time()

    def wanted(step):
        return step not in skip and time.time() - t_start < a.deadline
    os.makedirs(a.out, exist_ok=True)
    work = '/tmp/slak_multigpu'
    subprocess.run(['rm', '-rf', work])
    os.makedirs(work)
    ns = [int(n) for n in a.gpus.split(',')]
    nmax = max(ns)
    skip = set(a.skip.split(','))
    results = {'gpus': ns}

    # 1. scaling, checksums, mask-update time
    rows = []
    for n in ns if wanted('scaling') else []:
        code, out = sh(torchrun(n) + common(a, f'{work}/scale{n}', a.steps, n) + a.extra.split(), 240,
                       name=f'scaling N={n}')
        sums = checksums(out)
        upd = update_ms(out)
        rate = last_rate(out) * n
        clean = rate_without_updates(out, upd, 8 if a.tiny else a.batch_size, a.steps, a.u) * n
        rows.append(dict(n=n, exit=code, img_s=rate, img_s_no_updates=clean,
                         ranks=len(sums), identical=len(set(sums.values())) == 1, updates=len(upd),
                         update_ms=sum(upd) / max(len(upd), 1), checksum=next(iter(sums.values()), None)))
    base = rows[0]['img_s'] / rows[0]['n'] if rows else float('nan')
    base_no_updates = rows[0]['img_s_no_updates'] / rows[0]['n'] if rows else float('nan')
    for r in rows:
        r['efficiency'] = r['img_s'] / (base * r['n'])
        r['efficiency_no_updates'] = r['img_s_no_updates'] / (base_no_updates * r['n'])
    results['scaling'] = rows
    save(a, results)

    # 1b. variants at the largest N (A/B in the same call), efficiency against the N=1 row above
    variants = []
    for spec in a.variant:
        label, _, tokens = spec.partition('|')
        env, flags = dict(os.environ), []
        for t in tokens.split():
            if '=' in t and not t.startswith('-'):
                key, _, value = t.partition('=')
                env[key] = value
            else:
                flags.append(t)
        code, out = sh(torchrun(nmax) + common(a, f'{work}/variant{len(variants)}', a.steps, nmax) + flags, 240,
                       env=env, name=f'variant N={nmax}: {label}')
        upd = update_ms(out)
        rate = last_rate(out) * nmax
        clean = rate_without_updates(out, upd, 8 if a.tiny else a.batch_size, a.steps, a.u) * nmax
        variants.append(dict(label=label, n=nmax, exit=code, img_s=rate, img_s_no_updates=clean,
                             efficiency=rate / (base * nmax), efficiency_no_updates=clean / (base_no_updates * nmax),
                             update_ms=sum(upd) / max(len(upd), 1)))
    results['variants'] = variants
    save(a, results)

    # 7. all-reduce probe: SLaK-T's fp32 gradient (50.7 M values) in 25 MB buckets, as DDP does
    if wanted('allreduce') and a.device == 'cuda':
        probe = ('import os,time,torch,torch.distributed as d;d.init_process_group("nccl");r=d.get_rank();'
                 'torch.cuda.set_device(r);n=50_703_838;b=[torch.randn(min(6_553_600,n-i),device="cuda") '
                 'for i in range(0,n,6_553_600)];'
                 '[d.all_reduce(x) for x in b];torch.cuda.synchronize();t=time.perf_counter();'
                 '[[d.all_reduce(x) for x in b] for _ in range(10)];torch.cuda.synchronize();'
                 'print(f"ALLREDUCE_MS {(time.perf_counter()-t)/10*1000:.3f}") if r==0 else None')
        results['allreduce_ms'] = {}
        for n in ns:
            if n > 1:
                code, out = sh(torchrun(n)[:-1] + ['--no-python', sys.executable, '-c', probe], 120,
                               name=f'allreduce probe N={n}')
                m = re.search(r'ALLREDUCE_MS ([\d.]+)', out)
                results['allreduce_ms'][n] = float(m.group(1)) if m else None

    save(a, results)
    ckpt = f'{work}/scale{nmax}/checkpoint-0.pth'

    # 2. legacy launcher
    if wanted('legacy'):
        cmd = [sys.executable, '-m', 'torch.distributed.launch', f'--nproc_per_node={min(2, nmax)}', 'main.py']
        code, out = sh(cmd + common(a, f'{work}/legacy', 6, min(2, nmax)), 300, name='legacy launcher')
        sums = checksums(out)
        results['legacy'] = dict(exit=code, ranks=len(sums), identical=len(set(sums.values())) == 1)

    save(a, results)
    # 3. distributed evaluation counts every image once (1001 val images: not a multiple of N)
    if wanted('eval'):
        ev = model_args(a) + ['--data_set', 'synthetic', '--synthetic_size', '10010', '--device', a.device,
                              '--eval', 'true', '--dist_eval', 'true', '--resume', ckpt, '--num_workers', '2',
                              '--use_amp', 'false']
        accs = {}
        for n in sorted({1, nmax}):
            code, out = sh(torchrun(n) + ev, 300, name=f'dist eval N={n}')
            m = re.findall(r'\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)', out)
            accs[n] = m[-1] if m else None
        results['eval'] = dict(accs={str(k): v for k, v in accs.items()},
                               equal=len({v[:2] if v else None for v in accs.values()}) == 1)

    save(a, results)
    # 4. distillation, distributed
    if wanted('kd'):
        kd = torchrun(min(2, nmax), 'main_KD.py') + common(a, f'{work}/kd', 6, min(2, nmax)) + [
            '--resume', ckpt, '--model_s', 'SLaK_tiny', '--distill_type', 'NKD', '--distill_resume']
        if a.tiny:
            kd += ['--width_factor_s', '0.125']
        code, out = sh(kd, 400, name='main_KD distributed')
        sums = checksums(out)
        results['kd'] = dict(exit=code, ranks=len(sums), identical=len(set(sums.values())) == 1)

    save(a, results)
    # 5. crash (SIGKILL the whole job mid-epoch) and auto-resume
    if wanted('crash'):
        n = min(2, nmax)
        out_dir = f'{work}/crash'
        cmd = torchrun(n) + common(a, out_dir, 12, n, epochs=3)
        log_path = f'{work}/crash1.log'
        proc, log = spawn(cmd, log_path)
        reached = wait_for('Epoch: [1]', log_path, 400, proc)
        time.sleep(1)
        for pid in [proc.pid] + descendants(proc.pid):  # torchrun's workers run in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        log.close()
        first = open(log_path).read()
        LOGS.append(f'==== crash run (killed mid-epoch 1: {reached})\n{first}')
        leftovers = [f for f in os.listdir(out_dir) if not re.fullmatch(r'checkpoint-(\d+|best|best-ema)\.pth', f)
                     and f != 'log.txt']
        before = sorted(os.listdir(out_dir))
        code, out = sh(cmd + ['--auto_resume', 'true'], 600, name='resume after SIGKILL')
        sums = checksums(out)
        epochs = [json.loads(line)['epoch'] for line in open(f'{out_dir}/log.txt')]
        results['crash_resume'] = dict(killed_mid_epoch_1=reached, files_after_kill=before, partial_files=leftovers,
                                       resumed_from=re.findall(r'Auto resume checkpoint: (\S+)', out),
                                       exit=code, logged_epochs=epochs, identical=len(set(sums.values())) == 1)

    save(a, results)
    # 6. kill one rank: the rest must stop, not hang
    if wanted('killrank') and nmax >= 2:
        cmd = torchrun(2) + common(a, f'{work}/killrank', 400, 2, epochs=2)
        env = dict(os.environ, SLAK_DIST_TIMEOUT='1')
        log_path = f'{work}/killrank.log'
        log = open(log_path, 'w')
        proc = subprocess.Popen(cmd + ['--dist_timeout', '1'], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        wait_for('Epoch: [0]', log_path, 300, proc)
        time.sleep(3)
        victims = [pid for pid in descendants(proc.pid) if local_rank_of(pid) == 1]
        t0 = time.time()
        if victims:
            os.kill(victims[0], signal.SIGKILL)
        try:
            code = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = 'hung'
        log.close()
        text = open(log_path).read()
        LOGS.append(f'==== kill one rank\n{text}')
        results['kill_rank'] = dict(killed_pid=victims[:1], exit=code, seconds_to_stop=round(time.time() - t0, 1),
                                    last_lines=text.strip().splitlines()[-4:])

    save(a, results)
    print('\n| N | img/s | efficiency | img/s, updates out | efficiency | ranks identical | prune/grow updates '
          '| ms / update |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['n']} | {r['img_s']:.1f} | {100 * r['efficiency']:.1f}% | {r['img_s_no_updates']:.1f} | "
              f"{100 * r['efficiency_no_updates']:.1f}% | {r['identical']} ({r['ranks']} ranks) "
              f"| {r['updates']} | {r['update_ms']:.1f} |")
    for v in variants:
        print(f"| {v['n']} ({v['label']}) | {v['img_s']:.1f} | {100 * v['efficiency']:.1f}% | "
              f"{v['img_s_no_updates']:.1f} | {100 * v['efficiency_no_updates']:.1f}% | | | {v['update_ms']:.1f} |")
    for key in ('allreduce_ms', 'legacy', 'eval', 'kd', 'crash_resume', 'kill_rank'):
        if key in results:
            print(f'{key}: {json.dumps(results[key], default=str)}')


if __name__ == '__main__':
    main()
