"""benchmarks/multigpu.py's log readers, on log text in main.py's exact formats (the script's numbers in
benchmarks/RESULTS.md come from these)."""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import multigpu  # noqa: E402


def progress(i, total, seconds, rate):
    return (f'Epoch: [0]  [{i}/{total}]  eta: 0:00:00  lr: 0.000004  min_lr: 0.000004  loss: 7.3869 (7.4366)  '
            f'weight_decay: 0.0500 (0.0500)  grad_norm: 3.0429 (3.7431)  time: {seconds:.4f}  data: 0.0002  '
            f'img/s: {rate:.1f}  max mem: 12376')


LOG = '\n'.join([
    progress(0, 60, 13.9865, 4.6),
    'prune/grow at step 5: 7064 of 24425 active weights moved (prune rate 0.2888), density 0.5037, 161.1 ms',
    'prune/grow at step 10: 7064 of 24425 active weights moved (prune rate 0.2888), density 0.5037, 120.0 ms',
    '[rank 1] checksum weights 1.1614688993e+07 masks 1.3493343073e+10',
    'prune/grow at step 15: 7064 of 24425 active weights moved (prune rate 0.2888), density 0.5037, 140.0 ms',
    progress(59, 60, 0.1261, 507.3),
    '[rank 0] checksum weights 1.1614688993e+07 masks 1.3493343073e+10',
])


def test_checksums_and_rates_are_read_per_rank_and_from_the_last_progress_line():
    assert multigpu.checksums(LOG) == {0: ('1.1614688993e+07', '1.3493343073e+10'),
                                       1: ('1.1614688993e+07', '1.3493343073e+10')}
    assert multigpu.last_rate(LOG) == 507.3
    assert multigpu.update_ms(LOG) == [161.1, 120.0, 140.0]
    assert math.isnan(multigpu.last_rate('no progress lines'))


def test_rate_without_updates_removes_the_updates_inside_the_logged_window():
    """30 optimizer steps of 2 micro-batches, updates every 5 steps: the last 20 micro-batches are steps 21-30, which
    hold the updates after steps 25 and 30 (the last two in the log: 120 + 140 ms)."""
    upd = multigpu.update_ms(LOG)
    rate = multigpu.rate_without_updates(LOG, upd, batch=64, steps=30, u=5)
    assert math.isclose(rate, 20 * 64 / (20 * 0.1261 - 0.260), rel_tol=1e-12)
    # updates every 9 steps: only step 27 falls inside steps 21-30, so only the last update is taken out
    rate9 = multigpu.rate_without_updates(LOG, upd, batch=64, steps=30, u=9)
    assert math.isclose(rate9, 20 * 64 / (20 * 0.1261 - 0.140), rel_tol=1e-12)
    # a short run: the window shrinks to the run's 6 micro-batches (steps 1-3, no update)
    assert math.isclose(multigpu.rate_without_updates(LOG, upd, batch=8, steps=3, u=5), 6 * 8 / (6 * 0.1261),
                        rel_tol=1e-12)
