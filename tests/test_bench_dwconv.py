"""benchmarks/bench_dwconv.py on CPU: issue 20's rotating input sets (how many, what one call runs) and its record.

The GPU timing (CUDA graphs) cannot run here: ``bench_graph`` and ``bench`` are replaced by fakes that call the
function once and return a fixed time, so the rest of ``main`` (layer loop, record, table) runs as on the device.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import bench_dwconv  # noqa: E402

MIB = 2 ** 20


def test_rotation_sets_fill_the_asked_bytes_and_zero_means_one_set():
    assert bench_dwconv.rotation_sets(6 * MIB, 0) == 1
    assert bench_dwconv.rotation_sets(300 * MIB, 256) == 1
    assert bench_dwconv.rotation_sets(6 * MIB, 256) == 43
    assert bench_dwconv.rotation_sets(64 * MIB, 256) == 4
    assert bench_dwconv.rotation_sets(64 * MIB + 1, 256) == 4
    assert bench_dwconv.rotation_sets(64 * MIB - 1, 256) == 5


def test_set_bytes_of_slak_t_layers_and_their_set_counts():
    """Batch 64 bf16: x and dy of stage 1 are 47.5 MiB each, of stage 4 6 MiB each (weights are a few KB)."""
    bytes_s1 = bench_dwconv.layer_set_bytes(124, 56, 51, 5)
    bytes_s4 = bench_dwconv.layer_set_bytes(998, 7, 13, 5)
    assert bytes_s1 == (2 * 64 * 124 * 56 * 56 + 124 * 51 * 5) * 2
    assert bytes_s4 == (2 * 64 * 998 * 7 * 7 + 998 * 13 * 5) * 2
    assert [bench_dwconv.rotation_sets(b, 256) for b in (bytes_s1, bytes_s4)] == [3, 22]
    for _, c, hw, kh, kw in bench_dwconv.layers():  # every layer rotates through more than the 50 MiB of L2
        n = bench_dwconv.rotation_sets(bench_dwconv.layer_set_bytes(c, hw, kh, kw), 256)
        assert n * bench_dwconv.layer_set_bytes(c, hw, kh, kw) >= 256 * MIB


def test_one_call_runs_every_set_and_returns_gradients_without_accumulating():
    sets = [(torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(3, 1, 5, 3, requires_grad=True),
             torch.randn(2, 3, 6, 6)) for _ in range(4)]
    seen = []

    def conv(x, w):
        seen.append(x)
        return F.conv2d(x, w, padding=(2, 1), groups=3)
    bench_dwconv.over_sets(conv, sets, backward=True)()
    assert [id(x) for x in seen] == [id(x) for x, _, _ in sets]
    assert all(x.grad is None and w.grad is None for x, w, _ in sets)
    seen.clear()
    with torch.no_grad():
        bench_dwconv.over_sets(conv, sets, backward=False)()
    assert len(seen) == 4


def fake_row(model, c, hw, kh, kw, ours_fb, cudnn_fb, sets=None):
    row = {"model": model, "C": c, "map": hw, "kernel": [kh, kw], "ours_fwd": ours_fb / 3, "cudnn_fwd": cudnn_fb / 2,
           "ours_fb": ours_fb, "cudnn_fb": cudnn_fb}
    if sets is not None:
        row["sets"] = sets
    return row


def test_layers_record_keeps_the_slak_t_rows_and_names_layers_as_the_issue_does():
    rows = [fake_row("T/S", 124, 56, 51, 5, 0.5, 5.0, sets=3), fake_row("B", 166, 56, 51, 5, 1.0, 2.0, sets=3),
            fake_row("T/S", 998, 7, 13, 5, 0.02, 0.18, sets=22), fake_row("T/S", 998, 7, 5, 5, 0.01, 0.05, sets=22)]
    record = bench_dwconv.layers_record(rows, "H100_80GB_HBM3", 256.)
    assert json.loads(json.dumps(record)) == record
    assert {k: record[k] for k in ("card", "batch", "rotate_mb")} == {"card": "H100_80GB_HBM3", "batch": 64,
                                                                       "rotate_mb": 256.}
    assert [e["layer"] for e in record["layers"]] == ["124@56 51x5", "998@7 13x5", "998@7 5x5"]
    first = record["layers"][0]
    assert first == {"layer": "124@56 51x5", "large_kernel": True, "sets": 3, "ours_fb_ms": 0.5, "cudnn_fb_ms": 5.0,
                     "ours_fwd_ms": 0.16667, "cudnn_fwd_ms": 2.5, "speedup_fb": 10.0, "speedup_fwd": 15.0}
    assert record["min_speedup_fb"] == 5.0 and record["min_speedup_fb_large_kernel"] == 9.0
    assert "998@7 13x5" in bench_dwconv.speedup_line(record["layers"][1])


def test_a_failed_timing_leaves_no_minimum():
    rows = [fake_row("T/S", 124, 56, 51, 5, 0.5, 5.0), fake_row("T/S", 998, 7, 13, 5, float("nan"), 0.18)]
    record = bench_dwconv.layers_record(rows, "cpu", 0.)
    assert record["layers"][0]["sets"] == 1
    assert record["layers"][1]["ours_fb_ms"] is None and record["layers"][1]["speedup_fb"] is None
    assert record["min_speedup_fb"] is None and record["min_speedup_fb_large_kernel"] is None
    assert "nan" in bench_dwconv.speedup_line(record["layers"][1])
    json.dumps(record, allow_nan=False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Small layers at batch 2, a device name, and timers that run the function once and return 1 ms."""
    calls = []

    def fake_time(fn):
        calls.append(fn)
        fn()
        return 1.0
    monkeypatch.setattr(bench_dwconv, "BATCH", 2)
    monkeypatch.setattr(bench_dwconv, "layers", lambda: iter([("T/S", 4, 7, 13, 5), ("B", 6, 7, 13, 5),
                                                              ("T/S", 4, 9, 5, 5)]))
    monkeypatch.setattr(bench_dwconv, "bench_graph", fake_time)
    monkeypatch.setattr(bench_dwconv, "bench", fake_time)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake card")
    return calls


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench_dwconv.py", "--skip-check", *argv])
    if bench_dwconv.kern is not None:  # main() sets it; restored after the test
        monkeypatch.setattr(bench_dwconv.kern, "SPECIALISED_SIZES", bench_dwconv.kern.SPECIALISED_SIZES)
    bench_dwconv.main()


def test_main_rotating_times_the_slak_t_layers_per_set_and_writes_the_record(fake_gpu, monkeypatch, tmp_path,
                                                                            capsys):
    path = tmp_path / "results" / "layers.json"
    run_main(monkeypatch, "--rotate_mb", "0.01", "--layers_json", str(path))
    record = json.loads(path.read_text())
    sets = [bench_dwconv.rotation_sets(bench_dwconv.layer_set_bytes(4, hw, kh, kw), 0.01)
            for hw, kh, kw in ((7, 13, 5), (9, 5, 5))]
    assert sets == [6, 4]
    assert [(e["layer"], e["sets"], e["ours_fb_ms"]) for e in record["layers"]] == [
        ("4@7 13x5", 6, round(1 / 6, 5)), ("4@9 5x5", 4, 0.25)]
    assert record["min_speedup_fb"] == 1.0 and record["card"] == "cpu" and record["rotate_mb"] == 0.01
    assert len(fake_gpu) == 8  # ours and cuDNN, forward and forward+backward, per SLaK-T layer; no eager timing
    out = capsys.readouterr().out
    assert "4@7 13x5" in out and "min f+b speed-up over the SLaK-T layers: 1.0" in out


def test_main_without_the_new_options_keeps_the_one_set_table(fake_gpu, monkeypatch, capsys):
    assert bench_dwconv.get_args_parser().parse_args([]).rotate_mb == 0
    run_main(monkeypatch)
    out = capsys.readouterr().out
    assert len(fake_gpu) == 3 * 8  # every layer (B too), graph and eager timings
    assert "ours f+b" in out and "floor f+b" in out and "min f+b speed-up 1.0x" in out
    assert "SLaK-T layers" not in out
    if bench_dwconv.kern is not None:  # the tables time the fully specialised kernels, whatever the sizes
        assert bench_dwconv.kern.SPECIALISED_SIZES == 10 ** 9


def test_main_one_set_record(fake_gpu, monkeypatch, tmp_path):
    path = tmp_path / "layers.json"
    run_main(monkeypatch, "--layers_json", str(path))
    record = json.loads(path.read_text())
    assert record["rotate_mb"] == 0 and [e["sets"] for e in record["layers"]] == [1, 1]


def test_negative_rotation_is_refused(monkeypatch):
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--rotate_mb", "-1")


def test_detection_twin_timing_times_each_layer_specialised_then_twin_and_restores(fake_gpu, monkeypatch):
    """Every detection layer is timed once with every size specialised and once with none (the twins), plus
    cuDNN; the module's SPECIALISED_SIZES is restored afterwards."""
    seen = []

    class FakeKernels:
        SPECIALISED_SIZES = 8

        def reset_specialised_sizes(self):
            seen.append(("reset", self.SPECIALISED_SIZES))

        def launch_forward(self, x, w):
            seen.append(("fwd", self.SPECIALISED_SIZES, tuple(x.shape), tuple(w.shape)))

        def launch_weight_grad(self, g, x, w):
            seen.append(("wgrad", self.SPECIALISED_SIZES, tuple(x.shape), tuple(w.shape)))

    fake = FakeKernels()
    monkeypatch.setattr(bench_dwconv, "kern", fake)
    monkeypatch.setattr(bench_dwconv, "SLAK_T_STAGES", [(3, 7), (4, 5)])
    out = bench_dwconv.detection_twin_timing(inputs=((64, 96),), n=1)
    # stage 2's large kernel is 5: its three layers share one name
    assert list(out) == ["3@16x24 7x5", "3@16x24 5x7", "3@16x24 5x5", "4@8x12 5x5"]
    launches = [s for s in seen if s[0] != "reset"]
    # six layers, each forward + input gradient + weight gradient, once specialised and once through the twins
    assert [s[1] for s in launches] == ([10 ** 9] * 3 + [0] * 3) * 6
    assert [s[0] for s in launches[:3]] == ["fwd", "fwd", "wgrad"]
    assert {s[2] for s in launches} == {(1, 3, 16, 24), (1, 4, 8, 12)}
    assert all(r == {"specialised": 1.0, "twin": 1.0, "cudnn": 1.0} for r in out.values())
    assert fake.SPECIALISED_SIZES == 8 and seen[-1] == ("reset", 8)


SWEEP_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_dwconv
bench_dwconv.BATCH = 2
timed = []
bench_dwconv.bench_graph = lambda fn: timed.append(fn) or 1.0
launch = bench_dwconv.kern._launch_wgrad

def one_wrong(dy, x, shape, config=None):
    dw = launch(dy, x, shape, config)
    return dw + 1 if config == ("allj", 16, 16, 64, 4) else dw
bench_dwconv.kern._launch_wgrad = one_wrong
fwd, wg = bench_dwconv.sweep(4, 9, 13, 5, passes=("wgrad",))
print(json.dumps({"fwd": fwd, "wgrad": wg, "timed": len(timed)}))
"""


def test_weight_gradient_sweep_checks_every_tile_against_the_default_before_timing():
    """--sweep-pass wgrad: every weight-gradient candidate (per-column tiles, the all-columns kernel's tiles) gives
    the default launch's values (through Triton's interpreter, batch 2, in a subprocess: the interpreter must be on
    before Triton is imported), and one that does not is reported as wrong instead of timed; the forward pass is
    not visited."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SWEEP_SCRIPT, os.path.join(REPO, "benchmarks")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    wg = out["wgrad"]
    assert out["fwd"] == {}
    assert wg.pop("banded allj 16 16 64 4").startswith("wrong ")
    assert {"default", "banded", "banded nohint", "banded allj", "banded allj 32 16 64 8"} <= set(wg)
    assert all(v == 1.0 for v in wg.values()) and out["timed"] == len(wg)


def test_sweep_pass_must_name_fwd_or_wgrad(monkeypatch):
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--sweep", "--sweep-pass", "dgrad")
