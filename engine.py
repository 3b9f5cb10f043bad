"""One training epoch and one evaluation pass, shared by ``main.py`` and ``main_KD.py``.

Differences from the original ``engine.py``, on purpose:

* Sparse training also works with AMP: the loss scaler steps the optimizer and then ``mask.after_step`` re-applies
  the masks and advances the prune/grow schedule (the original never stepped the mask under ``--use_amp``).
* ``--clip_grad`` clips in fp32 training too (the original clipped only in the AMP path).
* Gradient-accumulation micro-batches that do not update run under DDP ``no_sync`` (one all-reduce per step).
* The lr/wd schedule is applied once per optimizer step (the original's guard had a precedence bug).
* A non-finite loss raises :class:`NonFiniteLossError` (epoch, step, value) instead of ``assert``; nothing is saved.
* ``evaluate`` counts every validation image exactly once (see ``utils.DistributedEvalSampler``), averages the loss
  over images, and reports top-min(5, classes) accuracy as ``acc5`` for datasets with fewer than 5 classes.
* ``grad_norm`` is logged whenever it is computed: always with AMP, and in fp32 when ``--clip_grad`` is set.
* ``compute_loss(samples, targets) -> (loss, output, terms)`` lets distillation reuse this loop; each named term is
  logged as a meter and as TensorBoard ``loss/<name>``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from timm.data import Mixup

import utils


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; carries where, so ``main.py`` can say it in one line."""

    def __init__(self, epoch: int, step: int, value: float):
        super().__init__(f'loss is {value} at epoch {epoch}, optimizer step {step}; stopping (the last checkpoint '
                         f'on disk is from before this epoch). Try a lower --lr, --clip_grad or fp32 training')
        self.epoch, self.step, self.value = epoch, step, value


@dataclasses.dataclass
class _StepFigures:
    """One micro-batch's logged figures, tensors still on the device until :meth:`record` reads them."""
    it: int
    loss: torch.Tensor
    class_acc: Optional[torch.Tensor]
    grad_norm: Optional[torch.Tensor]
    terms: Dict[str, torch.Tensor]
    max_lr: float
    min_lr: float
    weight_decay: Optional[float]

    def record(self, epoch: int, metric_logger: utils.MetricLogger, log_writer, wandb_logger) -> None:
        """Stop on a non-finite loss, else log the figures (meters, TensorBoard, W&B)."""
        loss_value = self.loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(epoch, self.it, loss_value)
        class_acc = float(self.class_acc) if self.class_acc is not None else None
        grad_norm = float(self.grad_norm) if self.grad_norm is not None else None
        terms = {k: float(v) for k, v in self.terms.items()}
        metric_logger.update(loss=loss_value, class_acc=class_acc, lr=self.max_lr, min_lr=self.min_lr,
                             weight_decay=self.weight_decay, grad_norm=grad_norm, **terms)
        if log_writer is not None:
            log_writer.update(loss=loss_value, head='loss')
            log_writer.update(class_acc=class_acc, head='loss')
            log_writer.update(head='loss', **terms)
            log_writer.update(lr=self.max_lr, head='opt')
            log_writer.update(min_lr=self.min_lr, head='opt')
            log_writer.update(weight_decay=self.weight_decay, head='opt')
            log_writer.update(grad_norm=grad_norm, head='opt')
            log_writer.set_step()
        if wandb_logger is not None:
            wandb_logger.log_batch({
                'Rank-0 Batch Wise/train_loss': loss_value,
                'Rank-0 Batch Wise/train_max_lr': self.max_lr,
                'Rank-0 Batch Wise/train_min_lr': self.min_lr,
                **({'Rank-0 Batch Wise/train_class_acc': class_acc} if class_acc is not None else {}),
                **({'Rank-0 Batch Wise/train_grad_norm': grad_norm} if grad_norm is not None else {}),
                'Rank-0 Batch Wise/global_train_step': self.it,
            })


def _settle(pending: list, everything: bool, record: Callable) -> None:
    """Read (``record``) and drop the figures queued in ``pending``: all of them before a progress line
    (``everything``), else all but the newest, whose step or batch the device may still be computing."""
    upto = len(pending) if everything else len(pending) - 1
    for figures in pending[:upto]:
        record(figures)
    del pending[:upto]


def _autocast(device: torch.device, use_amp: bool, amp_dtype: torch.dtype, cache: bool = True):
    return torch.amp.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp, cache_enabled=cache)


def _to_device(samples: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    samples = samples.to(device, non_blocking=True)
    return samples.contiguous(memory_format=torch.channels_last) if channels_last else samples


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, loss_scaler,
                    max_norm: float = 0, model_ema=None, mixup_fn: Optional[Mixup] = None, log_writer=None,
                    wandb_logger=None, start_steps: Optional[int] = None, lr_schedule_values=None,
                    wd_schedule_values=None, num_training_steps_per_epoch: Optional[int] = None,
                    update_freq: Optional[int] = None, use_amp: bool = False, mask=None,
                    amp_dtype: torch.dtype = torch.float16,
                    compute_loss: Optional[Callable] = None, channels_last: bool = False,
                    clip_parameters: Optional[Iterable[torch.Tensor]] = None,
                    sync_modules: Sequence[torch.nn.Module] = (), print_freq: int = 200,
                    train_forward: Optional[Callable] = None) -> Dict[str, float]:
    """Train for one epoch; returns the epoch averages of every meter (``loss``, ``class_acc``, ``lr``, ...).

    The optimizer steps every ``update_freq`` micro-batches (gradients summed, each loss divided by ``update_freq``).
    With ``use_amp`` the ``loss_scaler`` (``utils.NativeScalerWithGradNormCount``; disabled scaling for bfloat16)
    does backward and step; otherwise ``mask.step()`` (which steps the optimizer) or ``optimizer.step()``.
    ``clip_parameters`` (default: the model's) are the tensors whose gradient norm is clipped and logged, and
    ``sync_modules`` further DDP modules trained alongside (distillation heads) that skip their all-reduce on
    accumulation micro-batches like the model. A progress line is printed every ``print_freq`` micro-batches.
    ``train_forward`` (``main.graph_training_forward``: the model's forward and backward replayed as CUDA graphs)
    replaces ``model(samples)``; autocast then runs without its weight cache, as the graphs were captured.
    """
    model.train(True)
    update_freq = update_freq or 1
    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    metric_logger.add_meter('min_lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    clip = max_norm if max_norm and max_norm > 0 else None
    ddp_modules = [m for m in (model, *sync_modules) if isinstance(m, torch.nn.parallel.DistributedDataParallel)]
    clip_parameters = list(model.parameters() if clip_parameters is None else clip_parameters)
    second_order = getattr(optimizer, 'is_second_order', False)

    optimizer.zero_grad()
    pending: List[_StepFigures] = []
    for data_iter_step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        step = data_iter_step // update_freq
        if num_training_steps_per_epoch is not None and step >= num_training_steps_per_epoch:
            continue
        it = start_steps + step if start_steps is not None else step
        is_update = (data_iter_step + 1) % update_freq == 0
        if data_iter_step % update_freq == 0:  # python floats: numpy scalars would break weights_only loading
            for param_group in optimizer.param_groups:
                if lr_schedule_values is not None:
                    param_group['lr'] = float(lr_schedule_values[it]) * param_group.get('lr_scale', 1.0)
                if wd_schedule_values is not None and param_group['weight_decay'] > 0:
                    param_group['weight_decay'] = float(wd_schedule_values[it])

        samples = _to_device(samples, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        grad_norm = None
        with contextlib.ExitStack() as sync_ctx:
            if not is_update:
                for module in ddp_modules:
                    sync_ctx.enter_context(module.no_sync())
            with _autocast(device, use_amp, amp_dtype, cache=train_forward is None):
                if compute_loss is not None:
                    loss, output, terms = compute_loss(samples, targets)
                else:
                    output = (train_forward or model)(samples)
                    loss = criterion(output, targets)
                    terms = {}
            loss_value = loss.detach()  # read after backward is queued: .item() here would idle the GPU meanwhile
            loss = loss / update_freq
            if use_amp:
                grad_norm = loss_scaler(loss, optimizer, clip_grad=clip, parameters=clip_parameters,
                                        create_graph=second_order, update_grad=is_update)
                if is_update:
                    if mask is not None:  # before zero_grad: --growth gradient reads the gradients
                        mask.after_step(stepped=not loss_scaler.last_step_skipped)
                    optimizer.zero_grad()
            else:
                loss.backward(create_graph=second_order)
                if is_update:
                    if clip is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(clip_parameters, clip)
                    if mask is not None:
                        mask.step()
                    else:
                        optimizer.step()
                    optimizer.zero_grad()
        # The step's figures stay on the device until the next step is queued: reading them now (.item()) would
        # leave the GPU idle while the host loads and launches the next step.
        min_lr = min(group['lr'] for group in optimizer.param_groups)
        max_lr = max(group['lr'] for group in optimizer.param_groups)
        weight_decay_value = next((g['weight_decay'] for g in reversed(optimizer.param_groups)
                                   if g['weight_decay'] > 0), None)
        class_acc = (output.argmax(dim=-1) == targets).float().mean() if mixup_fn is None else None
        pending.append(_StepFigures(it, loss_value, class_acc, grad_norm, terms, max_lr, min_lr, weight_decay_value))
        if is_update and model_ema is not None:
            model_ema.update(model, mask)
        # progress lines (log_every prints after this body at these iterations) show every step so far
        _settle(pending, data_iter_step % print_freq == 0 or data_iter_step == len(data_loader) - 1,
                lambda figures: figures.record(epoch, metric_logger, log_writer, wandb_logger))
    for figures in pending:  # the epoch ended on skipped micro-batches (steps past num_training_steps_per_epoch)
        figures.record(epoch, metric_logger, log_writer, wandb_logger)

    metric_logger.synchronize_between_processes(device)
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@dataclasses.dataclass
class _EvalFigures:
    """One evaluation batch's loss, top-1 and top-k hit rates (float32, on the device until read) and its size."""
    n: int
    values: torch.Tensor

    def record(self, metric_logger: utils.MetricLogger) -> None:
        loss, acc1, acc5 = self.values.tolist()
        metric_logger.update(n=self.n, loss=loss, acc1=acc1 * 100., acc5=acc5 * 100.)


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device: torch.device, use_amp: bool = False,
             amp_dtype: torch.dtype = torch.float16, channels_last: bool = False,
             print_freq: int = 10) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole validation set, all ranks together.

    Each batch's figures are read (one host wait) once the next batch is queued, so the device is never idle
    between batches; progress lines (every ``print_freq`` batches) read all so far. The figures are those the
    original read at once (the same float32 values, averaged in the same order)."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = utils.MetricLogger(delimiter='  ')
    for name in ('loss', 'acc1', 'acc5'):  # every rank joins the same all-reduces, even one with no images
        metric_logger.add_meter(name, utils.SmoothedValue())
    model.eval()
    pending: List[_EvalFigures] = []
    last = len(data_loader) - 1
    for i, batch in enumerate(metric_logger.log_every(data_loader, print_freq, 'Test:')):
        images = _to_device(batch[0], device, channels_last)
        target = batch[-1].to(device, non_blocking=True)
        with _autocast(device, use_amp, amp_dtype):
            output = model(images)
            loss = criterion(output.float(), target)
        k = min(5, output.shape[-1])
        top = output.topk(k, dim=-1).indices
        correct = top.eq(target[:, None])
        pending.append(_EvalFigures(images.shape[0], torch.stack(
            [loss.float(), correct[:, 0].float().mean(), correct.any(dim=-1).float().mean()])))
        _settle(pending, i % print_freq == 0 or i == last, lambda figures: figures.record(metric_logger))
    for figures in pending:  # (a loader longer than its len())
        figures.record(metric_logger)
    metric_logger.synchronize_between_processes(device)
    print(f'* Acc@1 {metric_logger.acc1.global_avg:.3f} Acc@5 {metric_logger.acc5.global_avg:.3f} '
          f'loss {metric_logger.loss.global_avg:.3f}')
    return {k: metric_logger.meters[k].global_avg for k in ('loss', 'acc1', 'acc5')}
