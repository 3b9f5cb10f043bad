"""Tests for engine.train_one_epoch's deferred reading of step figures (no host wait between queued steps)."""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402


class Recorder(nn.Module):
    """A linear classifier that notes every forward in ``events``."""

    def __init__(self, events):
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.events = events
        self.calls = 0

    def forward(self, x):
        self.events.append(('forward', self.calls))
        self.calls += 1
        return self.fc(x.flatten(1))


def loader(n, nan_at=None):
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 2, 2, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(n)]
    if nan_at is not None:
        data[nan_at][0][0, 0, 0, 0] = float('nan')
    return data


def run_epoch(events, monkeypatch, n=10, nan_at=None, update_freq=1):
    model = Recorder(events)
    losses = []

    def criterion(output, target):
        loss = F.cross_entropy(output, target)
        losses.append(loss.item())
        return loss

    read = engine._StepFigures.record

    def record(self, *args, **kwargs):
        events.append(('read', self.it))
        return read(self, *args, **kwargs)
    monkeypatch.setattr(engine._StepFigures, 'record', record)
    stats = engine.train_one_epoch(model, criterion, loader(n, nan_at), torch.optim.SGD(model.parameters(), lr=0.1),
                                   torch.device('cpu'), epoch=3, loss_scaler=None, update_freq=update_freq)
    return stats, losses


def test_step_figures_are_read_after_the_next_step_is_queued(monkeypatch):
    events = []
    stats, losses = run_epoch(events, monkeypatch)
    position = {event: i for i, event in enumerate(events)}
    # progress lines print after step 0 and the last step (print_freq 200): those are read at once
    assert position[('read', 0)] < position[('forward', 1)]
    for k in range(1, 9):
        assert position[('read', k)] > position[('forward', k + 1)], k
    assert [e for e in events if e[0] == 'read'] == [('read', k) for k in range(10)]
    assert stats['loss'] == pytest.approx(sum(losses) / len(losses), rel=1e-12)


def test_non_finite_loss_names_its_step_although_read_late(monkeypatch):
    with pytest.raises(engine.NonFiniteLossError) as info:
        run_epoch([], monkeypatch, nan_at=5, update_freq=2)
    assert (info.value.epoch, info.value.step) == (3, 2)  # micro-batch 5 belongs to optimizer step 2
    assert 'loss is nan at epoch 3, optimizer step 2' in str(info.value)


def test_evaluation_figures_are_read_after_the_next_batch_is_queued(monkeypatch):
    """engine.evaluate reads batch k's loss and hit rates once batch k + 1 is queued (progress lines, every 10
    batches and at the last, read at once), and its averages are the original's: each batch's float32 figures read
    at once, averaged over images (batches of unequal size)."""
    events = []
    model = Recorder(events).eval()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, 2, 2, generator=gen), torch.randint(0, 3, (n,), generator=gen))
            for n in [4] * 12 + [3]]
    read = engine._EvalFigures.record

    def record(self, *args, **kwargs):
        events.append(('read', len([e for e in events if e[0] == 'read'])))
        return read(self, *args, **kwargs)
    monkeypatch.setattr(engine._EvalFigures, 'record', record)
    stats = engine.evaluate(data, model, torch.device('cpu'))
    position = {event: i for i, event in enumerate(events)}
    for k in (0, 10, 12):  # progress lines
        assert position[('read', k)] < position.get(('forward', k + 1), len(events)), k
    for k in [*range(1, 10), 11]:
        assert position[('read', k)] > position[('forward', k + 1)], k
    assert [e for e in events if e[0] == 'read'] == [('read', k) for k in range(13)]

    meters = {name: [] for name in ('loss', 'acc1', 'acc5')}  # the original's figures, read batch by batch
    with torch.no_grad():
        for x, y in data:
            out = model.fc(x.flatten(1))
            correct = out.topk(3, dim=-1).indices.eq(y[:, None])
            for name, value in (('loss', F.cross_entropy(out.float(), y).item()),
                                ('acc1', correct[:, 0].float().mean().item() * 100.),
                                ('acc5', correct.any(dim=-1).float().mean().item() * 100.)):
                meters[name].append((value, len(y)))
    for name, values in meters.items():
        assert stats[name] == sum(v * n for v, n in values) / sum(n for _, n in values), name
    assert stats['acc5'] == 100.0  # 3 classes: top-min(5, 3) always hits
