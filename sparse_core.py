"""Dynamic sparse training for SLaK: masks, SNIP/ERK initialisation, prune-and-grow, prune-rate decay, sparse EMA.

Usage in ``main.py`` (same order as the original)::

    decay = CosineDecay(args.prune_rate, T_max=steps_per_epoch * args.epochs, init_step=steps_per_epoch * start_epoch)
    mask = Masking(optimizer, train_loader, decay, prune_mode=args.prune, growth_mode=args.growth,
                   redistribution_mode=args.redistribution, args=args, log_writer=log_writer)
    mask.add_module(model, mask_state=checkpoint.get('mask'))   # masks come back from the checkpoint if saved
    ...
    mask.step()                      # fp32: optimizer.step() + after_step(True)
    mask.after_step(stepped)         # AMP: the GradScaler stepped (or skipped) the optimizer itself

Differences from the original, all deliberate fixes:

* AMP keeps sparsity: :meth:`Masking.after_step` is the hook for the GradScaler path.
* Masks, step counter, prune-rate schedule and the mask RNG live in checkpoints (:meth:`Masking.state_dict`),
  keyed by parameter names without ``module.`` so DDP and single-process runs interchange.
* Prune and grow are exact: ``magnitude`` removes exactly ``ceil(rate * nonzeros)`` active weights and every growth
  mode turns on exactly as many inactive positions, so each layer's non-zero count never drifts. Grown (and pruned)
  positions restart with zero weight and zero optimizer state. ``SET`` is implemented; ``global_magnitude``,
  ``random_unfired``, ``mix`` and ``global_momentum_growth`` are refused with a clear error.
* Masks are ``torch.bool`` and identical on all ranks by construction plus one broadcast from rank 0 after init and
  after every prune/grow, instead of a broadcast after every optimizer step. Every random draw of the masks
  (uniform, ERK and SNIP positions, random growth) comes from one ``torch.Generator`` on the parameters' device,
  seeded with ``args.seed`` (the same on every rank, not ``seed + rank``) and saved in checkpoints: float32
  ``torch.rand`` of each tensor's shape, tensors in parameter order.
* What to prune and grow is ranked in the parameter's own dtype, ties going to the lower index as with a stable sort
  (the original sorted), and SNIP's threshold is the keep-th largest score in the scores' dtype: a float64 run
  follows the original's masks exactly (apart from the fixes listed here).
* SNIP when more than the asked sparsity of the scores are exactly 0 (norm layers that start at zero scale): the
  original's strict ``score > threshold`` kept none of them (~99 % sparsity for timm's ResNets); the rest of the
  budget is spread evenly over them, with one line that says so.
* One console line at init and per prune/grow (overall density, prune rate, time); the per-layer table goes to
  ``report_path`` (and the console with ``verbose``).
* ``--fix`` no longer mutates ``args``; ``--only-L`` without ``large_kernel.LoRA`` parameters raises.
* The EMA learns which positions were grown from :attr:`Masking.grown` instead of guessing from ``EMA == 0``,
  and restarts them at their live value once the optimizer has moved them from 0.
"""
import contextlib
import copy
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

SNIP_INITS = ('snip', 'snip_topk')  # the inits that score one training batch (Masking._snip_scores)
SPARSE_INITS = (*SNIP_INITS, 'ERK', 'uniform', 'resume')
PRUNE_MODES = ('magnitude', 'SET')
GROWTH_MODES = ('random', 'gradient', 'momentum', 'momentum_neuron')
REDISTRIBUTION_MODES = ('none', 'momentum', 'nonzero', 'magnitude')
# Strategy names that exist in the original registry but never worked there.
_BROKEN_IN_ORIGINAL = ('global_magnitude', 'random_unfired', 'mix', 'global_momentum_growth')
DENSE_LAYER_DENSITY = 0.99  # layers at least this dense after init are dropped from the mask set (original rule)


def _strip_module(name: str) -> str:
    """Parameter name without the DDP ``module.`` prefix: masks are keyed the same in DDP and single-process runs."""
    return name[len('module.'):] if name.startswith('module.') else name


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def count_nonzero_params(model: nn.Module) -> int:
    """Number of non-zero entries over all parameters (the "#params" the seed README reports for sparse models)."""
    return int(sum(int(torch.count_nonzero(p.detach())) for p in model.parameters()))


class CosineDecay:
    """Cosine decay of the prune rate from ``prune_rate`` to ``eta_min`` over ``T_max`` optimizer steps.

    The original drove a ``CosineAnnealingLR`` on a dummy optimizer; this computes the same values in closed form,
    rate(n) = eta_min + (prune_rate - eta_min) * (1 + cos(pi * n / T_max)) / 2, where n counts :meth:`step` calls
    (plus ``init_step`` fast-forwarded steps, plus ``last_epoch + 1`` as torch's constructor steps once). Like torch
    past ``T_max`` the cosine keeps going (it rises again).

    Args:
        prune_rate: initial prune rate (``--prune_rate``).
        T_max: steps of a half cosine period (total optimizer steps of the run).
        eta_min: final prune rate.
        last_epoch: torch's scheduler argument; -1 for a fresh schedule.
        init_step: steps to fast-forward at construction (resume at ``start_epoch``).
    """

    def __init__(self, prune_rate: float, T_max: int, eta_min: float = 0.005, last_epoch: int = -1,
                 init_step: int = 0):
        if T_max <= 0:
            raise ValueError(f'CosineDecay T_max must be > 0 (total optimizer steps); got {T_max!r}')
        if last_epoch < -1 or init_step < 0:
            raise ValueError(f'CosineDecay needs last_epoch >= -1 and init_step >= 0; got {last_epoch}, {init_step}')
        self.prune_rate = float(prune_rate)
        self.T_max = int(T_max)
        self.eta_min = float(eta_min)
        self.last_epoch = last_epoch + 1 + int(init_step)

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.last_epoch += 1

    def get_dr(self, x: Any = None) -> float:
        """Current prune rate (``x`` is ignored, as in the original)."""
        return self.eta_min + (self.prune_rate - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch /
                                                                              self.T_max)) / 2

    def state_dict(self) -> Dict[str, Any]:
        return {'prune_rate': self.prune_rate, 'T_max': self.T_max, 'eta_min': self.eta_min,
                'last_epoch': self.last_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.prune_rate = float(state['prune_rate'])
        self.T_max = int(state['T_max'])
        self.eta_min = float(state['eta_min'])
        self.last_epoch = int(state['last_epoch'])


def erk_densities(shapes: Dict[str, Tuple[int, ...]], density: float, erk_power_scale: float = 1.0
                  ) -> Tuple[Dict[str, float], List[str]]:
    """Erdos-Renyi-Kernel per-layer densities for an overall ``density`` over the layers in ``shapes``.

    Each layer's raw probability is (sum of its dims / number of elements) ** power; one epsilon scales all of them so
    the total number of kept weights is ``density * total``. A layer whose scaled probability would exceed 1 is made
    dense (all layers sharing the current maximum at once) and epsilon is solved again without it.

    Returns:
        (densities by name, names of the layers forced dense in the order they were found).
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / numel[name]) ** erk_power_scale for name, shape in shapes.items()}
    dense: List[str] = []
    while len(dense) < len(shapes):
        rhs = divisor = 0.0
        for name in shapes:  # one pass in layer order, as the original: the same float rounding, bit for bit
            if name in dense:
                rhs -= numel[name] * (1 - density)
            else:
                rhs += numel[name] * density
                divisor += raw[name] * numel[name]
        epsilon = rhs / divisor
        max_raw = max(raw[n] for n in shapes if n not in dense)
        if max_raw * epsilon <= 1:
            break
        dense.extend(n for n in shapes if n not in dense and raw[n] == max_raw)
    densities = {name: 1.0 if name in dense else epsilon * raw[name] for name in shapes}
    return densities, dense


class Masking:
    """Keeps a boolean mask per sparse weight tensor, re-applies it after each optimizer step and prunes/regrows it.

    Which tensors are sparse: every 2-D and 4-D parameter (stem, downsample, every large-kernel branch, pointwise
    convs, head), or with ``args.only_L`` only the decomposed large kernels (``large_kernel.LoRA*``). 1-D tensors are
    always dense. Layers whose density after initialisation is >= 0.99 (ERK makes the stem dense, for example) are
    dropped from the mask set and stay dense for the whole run, as in the original.

    Why masks are re-applied after every step: gradients are not masked, so AdamW moves inactive weights away from 0;
    multiplying by the mask right after the step restores exact zeros at the cost of one fused elementwise pass.

    Args:
        optimizer: the optimizer whose state is zeroed at pruned/grown positions and read by momentum growth.
        train_loader: loader whose first batch feeds SNIP (``--sparse_init snip``/``snip_topk``).
        prune_rate_decay: a :class:`CosineDecay` (or None for a constant ``prune_rate``).
        prune_rate: prune rate before the first decay step (the original's default 0.5).
        prune_mode: 'magnitude' or 'SET' (half smallest-magnitude, half most-negative).
        growth_mode: 'random', 'gradient', 'momentum' or 'momentum_neuron'.
        redistribution_mode: 'none', 'momentum', 'nonzero' or 'magnitude'. Accepted for compatibility, but as in the
            original no redistribution is applied: every layer keeps its own non-zero count.
        verbose: also print the per-layer table (:meth:`layer_table`) at init and every prune/grow step; otherwise
            each of them prints one line (overall density, prune rate, time).
        fp16: legacy apex flag of the original; native AMP keeps fp32 parameters, so it changes nothing.
        args: namespace with ``sparse_init``, ``sparsity``, ``update_frequency``, ``fix``, ``only_L``, ``seed`` (the
            fields ``prune``, ``growth``, ``redistribution``, ``prune_rate`` reach here through the arguments above;
            masks live on their parameter's device, so ``device`` is not needed). Never modified.
        log_writer: optional; an object with ``add_scalar(tag, value, step)`` (TensorBoard SummaryWriter; x axis:
            optimizer steps) or with ``update(head=..., **scalars)`` (the project's TensorboardLogger; x axis: its own
            step, i.e. micro-batches like ``loss/*`` and ``opt/*``, so a prune/grow lines up with the loss curve).
            Receives ``sparsity/overall``, ``sparsity/prune_rate`` and ``sparsity/<layer>`` densities at init and
            every update.
        report_path: optional text file the per-layer table is appended to at init and every prune/grow step (main.py:
            ``<output_dir>/sparsity.txt`` on the main process).
        prepare_copy: optional; applied to SNIP's throw-away copy of the model before its scoring pass (``main.py``
            passes ``SLaK.for_single_pass``: plain convolutions and eager block tails, nothing compiled for one batch).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train_loader: Optional[Iterable] = None,
                 prune_rate_decay: Optional[CosineDecay] = None, prune_rate: float = 0.5,
                 prune_mode: str = 'magnitude', growth_mode: str = 'random', redistribution_mode: str = 'momentum',
                 verbose: bool = False, fp16: bool = False, args: Any = None, log_writer: Any = None,
                 report_path: Optional[str] = None, prepare_copy: Optional[Callable[[nn.Module], Any]] = None):
        self.prune_func: Callable = _resolve('--prune', prune_mode, _PRUNE_FUNCS)
        self.growth_func: Callable = _resolve('--growth', growth_mode, _GROWTH_FUNCS)
        if redistribution_mode not in REDISTRIBUTION_MODES:
            raise ValueError(f'--redistribution must be one of {REDISTRIBUTION_MODES}; got {redistribution_mode!r}')
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.prune_rate_decay = prune_rate_decay
        self.prune_rate = float(prune_rate)
        self.prune_mode, self.growth_mode, self.redistribution_mode = prune_mode, growth_mode, redistribution_mode
        self.verbose = verbose
        self.fp16 = fp16
        self.args = args
        self.log_writer = log_writer
        self.report_path = report_path
        self.prepare_copy = prepare_copy

        self.sparse_init: str = getattr(args, 'sparse_init', 'snip')
        self.sparsity: float = float(getattr(args, 'sparsity', 0.4))
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f'--sparsity must be in [0, 1); got {self.sparsity!r}')
        update_frequency = getattr(args, 'update_frequency', None)
        if update_frequency is not None and int(update_frequency) <= 0:
            raise ValueError(f'-u/--update-frequency must be a positive number of steps; got {update_frequency!r}')
        # --fix means static masks: never prune/grow, but still re-apply after every step.
        self.update_frequency: Optional[int] = (None if getattr(args, 'fix', False) or update_frequency is None
                                                else int(update_frequency))
        self.only_L: bool = bool(getattr(args, 'only_L', False))
        self.seed: int = int(getattr(args, 'seed', 0))

        self.modules: List[nn.Module] = []
        self.params: Dict[str, nn.Parameter] = {}   # every eligible tensor, by name without `module.`
        self.masks: Dict[str, torch.Tensor] = {}    # the sparse subset of `params`, bool masks
        self.names: List[str] = []
        self.density: float = 1.0 - self.sparsity
        self.steps = 0
        self.update_seconds: List[float] = []  # wall time of each prune/grow update (benchmarks, logs)
        self.mask_version = 0  # bumped whenever masks change; lets the EMA refresh its copy of the masks cheaply
        # Positions (re)grown by the prune/grow at step `grown_at_step`, weight restarted at 0; kept until the next
        # optimizer step (and in a checkpoint taken in between) so that ModelEma restarts them one step later.
        self.grown: Dict[str, torch.Tensor] = {}
        self.grown_at_step = -1
        self.name2nonzeros: Dict[str, int] = {}
        self.name2zeros: Dict[str, int] = {}
        self.name2removed: Dict[str, int] = {}
        self.generator: Optional[torch.Generator] = None
        self._mask_list: List[torch.Tensor] = []
        self._param_list: List[torch.Tensor] = []

    # ---- registration and initialisation --------------------------------------------------------------------------
    def add_module(self, module: nn.Module, mask_state: Optional[Dict[str, Any]] = None) -> None:
        """Register ``module``'s sparse tensors and create masks (or restore them from ``mask_state``).

        Args:
            module: the model, DDP-wrapped or not.
            mask_state: a :meth:`state_dict` from a checkpoint. When given, no SNIP/random init runs: the saved masks,
                step counter, prune-rate schedule and RNG are restored, so training continues exactly.
        """
        if self.modules:
            raise ValueError('Masking.add_module was already called; create one Masking per model')
        self.modules.append(module)
        for name, param in module.named_parameters():
            name = _strip_module(name)
            if param.dim() not in (2, 4) or (self.only_L and 'large_kernel.LoRA' not in name):
                continue
            self.params[name] = param
        if not self.params:
            what = "parameters named 'large_kernel.LoRA*' (--only-L needs a Decom=True model)" if self.only_L \
                else '2-D or 4-D parameters'
            raise ValueError(f'Masking found no {what} to sparsify in {type(module).__name__}')
        device = next(iter(self.params.values())).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)  # same seed on every rank: identical draws without communication
        if mask_state is not None:
            self.load_state_dict(mask_state)
        else:
            self.init(mode=self.sparse_init, density=1.0 - self.sparsity)

    @torch.no_grad()
    def init(self, mode: str = 'ERK', density: float = 0.05, erk_power_scale: float = 1.0) -> None:
        """Build masks with ``mode`` for an overall ``density``; drop layers >= 0.99 dense; apply."""
        if mode not in SPARSE_INITS:
            raise ValueError(f'--sparse_init must be one of {SPARSE_INITS}; got {mode!r}')
        if not self.params:
            raise ValueError('Masking.init needs registered parameters: call add_module(model) instead')
        self.density = density
        gen = self.generator
        masks: Dict[str, torch.Tensor] = {}
        if mode == 'uniform':
            for name, p in self.params.items():
                masks[name] = torch.rand(p.shape, generator=gen, device=p.device) < density
        elif mode == 'resume':
            for name, p in self.params.items():
                masks[name] = p != 0
        elif mode == 'ERK':  # layers ERK makes dense show up as "dense" in the per-layer table
            shapes = {name: tuple(p.shape) for name, p in self.params.items()}
            densities, _ = erk_densities(shapes, density, erk_power_scale)
            for name, p in self.params.items():
                masks[name] = torch.rand(p.shape, generator=gen, device=p.device) < densities[name]
        else:
            scores = self._snip_scores()
            flat = torch.cat([s.flatten() for s in scores.values()])
            keep = int(flat.numel() * density)
            if keep < 1:
                raise ValueError(f'--sparsity {self.sparsity} keeps no weight at all; lower it')
            # tau = the keep-th largest score in the scores' own dtype (the original's topk); a position counts as
            # kept only if its score is strictly greater (original semantics)
            tau = _kth_largest(flat, keep)
            zero_share = _zero_score_share(flat, keep, tau, density)
            for name, p in self.params.items():
                above = scores[name] > tau
                if mode == 'snip_topk':
                    masks[name] = above
                    if zero_share:
                        draw = torch.rand(p.shape, generator=gen, device=p.device)
                        masks[name] |= (scores[name] == 0) & (draw < zero_share)
                    continue
                # original quirk: SNIP only decides the layer's density, positions are uniformly random; the density
                # is the original's Python-float 1 - (mask == 0).sum() / numel, so the draws compare alike
                layer_density = 1 - int((~above).sum()) / p.numel()
                if zero_share:
                    layer_density += zero_share * int((scores[name] == 0).sum()) / p.numel()
                masks[name] = torch.rand(p.shape, generator=gen, device=p.device) < layer_density
        self._broadcast_from_rank0(list(masks.values()))
        counts = _count_true(masks)
        self.masks, self.grown = {}, {}
        for name, mask in masks.items():
            if counts[name] / mask.numel() >= DENSE_LAYER_DENSITY:  # popped: dense and unmasked for the whole run
                continue
            # contiguous even for channels_last weights (masks from `p != 0` or scores inherit their layout):
            # prune/grow index masks through flat views
            self.masks[name] = mask.contiguous()
        self._refresh_lists()
        self.apply_mask()
        self.mask_version += 1
        kept = sum(counts.values())
        dense = len(masks) - len(self.masks)
        self._report(f'sparse masks ({mode}): {len(self.masks)} sparse layers'
                     f'{f" ({dense} more stay dense: >= {DENSE_LAYER_DENSITY} after init)" if dense else ""}, '
                     f'sparsity {1 - kept / sum(m.numel() for m in masks.values()):.4f} of the eligible weights '
                     f'(asked {1 - density:.4f})', {n: counts[n] for n in self.masks})

    def _snip_scores(self) -> Dict[str, torch.Tensor]:
        """|w * dL/dw| for every registered tensor, from one batch on a deep copy (the live model is untouched).

        The copy is of the un-wrapped model (deep-copying DDP is not supported by recent torch); in distributed runs
        the gradients are averaged across ranks by hand, which is what the original's DDP copy did.
        """
        if self.train_loader is None:
            raise ValueError('--sparse_init snip/snip_topk needs Masking(train_loader=...) for its first batch')
        sampler = getattr(self.train_loader, 'sampler', None)
        if _is_distributed() and hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(0)
        start = time.perf_counter()
        take = getattr(self.train_loader, 'first_batch', None)  # utils.FirstBatchShared: the workers keep running
        images, targets = (take() if callable(take) else next(iter(self.train_loader)))[:2]
        batch_s = time.perf_counter() - start
        live = self.modules[0]
        live = live.module if hasattr(live, 'module') else live
        model = copy.deepcopy(live)
        model.zero_grad(set_to_none=True)
        _recompute_in_backward(model)
        if self.prepare_copy is not None:
            self.prepare_copy(model)
        device = next(iter(self.params.values())).device
        with torch.enable_grad(), _without_cudnn_autotuning():
            F.cross_entropy(model(images.to(device)), targets.to(device)).backward()
        params = {_strip_module(n): p for n, p in model.named_parameters()}
        grads = [params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]) for n in self.params]
        if _is_distributed():
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            grads = list(torch.split(flat, [g.numel() for g in grads]))
        scores = {n: (params[n].detach() * g.view_as(params[n])).abs() for n, g in zip(self.params, grads)}
        del model
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        # where SNIP's seconds go (start-up, benchmarks/bench_main.py reads this line)
        print(f'SNIP: first batch in {batch_s:.1f} s, scoring pass in {time.perf_counter() - start - batch_s:.1f} s')
        return scores

    # ---- the per-step path ----------------------------------------------------------------------------------------
    def step(self) -> None:
        """fp32 path: ``optimizer.step()`` then :meth:`after_step` (``True``)."""
        self.optimizer.step()
        self.after_step(True)

    def after_step(self, stepped: bool = True) -> None:
        """Call right after the optimizer step (done by the GradScaler in the AMP path), before ``zero_grad``.

        Args:
            stepped: False when the GradScaler skipped the step (inf/NaN gradients). Then the masks are only
                re-applied and neither the step counter nor the prune-rate schedule advances.
        """
        self.apply_mask()
        if not stepped:
            return
        if self.prune_rate_decay is not None:
            self.prune_rate_decay.step()
            self.prune_rate = self.prune_rate_decay.get_dr()
        self.steps += 1
        self.grown = {}  # the EMA took them at the update after their prune/grow; the optimizer has now moved them
        if self.update_frequency is not None and self.steps % self.update_frequency == 0:
            start = time.perf_counter()
            self.truncate_weights()
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # update steps may sync: the timing below is then the real cost
            self.update_seconds.append(time.perf_counter() - start)
            moved = sum(self.name2removed.values())
            nonzeros = _count_true(self.masks)
            self._report(f'prune/grow at step {self.steps}: {moved} of {sum(self.name2nonzeros.values())} active '
                         f'weights moved (prune rate {self.prune_rate:.4f}), density {self._density(nonzeros):.4f}, '
                         f'{1000 * self.update_seconds[-1]:.1f} ms', nonzeros)

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero every inactive weight (one fused multiply over all sparse tensors, no host synchronisation)."""
        if self._param_list:
            torch._foreach_mul_(self._param_list, self._mask_list)

    # ---- prune and grow -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def truncate_weights(self) -> None:
        """Prune ``ceil(prune_rate * nonzeros)`` weights per layer, regrow exactly as many (the original's rule, made
        exact).

        Positions whose mask changed, and positions pruned then immediately regrown, restart with weight 0 and zero
        optimizer state (Adam moments, SGD momentum), so a regrown weight does not inherit stale statistics; the
        regrown ones are recorded in :attr:`grown` for the EMA. The new masks (and which positions to reset) are
        broadcast from rank 0 once, so all ranks apply the same change.
        """
        codes = []
        for name, mask in self.masks.items():
            weight = self.params[name]
            nonzeros = int(mask.sum())
            self.name2nonzeros[name] = nonzeros
            self.name2zeros[name] = mask.numel() - nonzeros
            pruned_mask = self.prune_func(self, mask, weight, name)
            removed = nonzeros - int(pruned_mask.sum())
            self.name2removed[name] = removed
            grown = self.growth_func(self, name, pruned_mask, removed, weight)
            reset = (mask & ~pruned_mask) | grown
            codes.append((pruned_mask | grown).to(torch.uint8) + 2 * reset.to(torch.uint8))
        self._broadcast_from_rank0(codes)
        self.grown, self.grown_at_step = {}, self.steps
        for (name, mask), code in zip(self.masks.items(), codes):
            mask.copy_(code & 1)
            reset = code >= 2
            self.grown[name] = reset & mask
            self.params[name].masked_fill_(reset, 0)
            state = self.optimizer.state.get(self.params[name], {})
            for value in state.values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.masked_fill_(reset, 0)
        self.apply_mask()
        self.mask_version += 1

    def get_momentum_for_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Adam-family: exp_avg / (sqrt(exp_avg_sq) + 1e-8); SGD: the momentum buffer."""
        state = self.optimizer.state.get(weight, {})
        if 'exp_avg' in state and 'exp_avg_sq' in state:
            return state['exp_avg'] / (torch.sqrt(state['exp_avg_sq']) + 1e-8)
        if state.get('momentum_buffer') is not None:
            return state['momentum_buffer']
        raise ValueError(f'--growth {self.growth_mode} needs Adam moments or an SGD momentum buffer; the optimizer '
                         f'{type(self.optimizer).__name__} has none for this weight (use --growth random or gradient)')

    def get_gradient_for_weights(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.grad is None:
            raise ValueError('--growth gradient needs the gradient at update time: call mask.step()/after_step() '
                             'before optimizer.zero_grad()')
        return weight.grad.clone()

    # ---- reporting ------------------------------------------------------------------------------------------------
    def layer_table(self, nonzeros: Optional[Dict[str, int]] = None) -> List[str]:
        """One line per eligible tensor: name, shape, non-zeros, density and the weights the last prune/grow moved;
        tensors outside the mask set (popped after init) are marked dense. ``nonzeros``: the masks' counts if already
        read."""
        nonzeros = _count_true(self.masks) if nonzeros is None else nonzeros
        lines = []
        width = max(len(name) for name in self.params)
        for name, param in self.params.items():
            shape = 'x'.join(str(s) for s in param.shape)
            if name not in self.masks:
                lines.append(f'{name:<{width}}  {shape:>16}  {param.numel():>10} / {param.numel():<10}  dense')
                continue
            moved = f'  moved {self.name2removed[name]}' if name in self.name2removed else ''
            lines.append(f'{name:<{width}}  {shape:>16}  {nonzeros[name]:>10} / {param.numel():<10}  '
                         f'density {nonzeros[name] / param.numel():.4f}{moved}')
        return lines

    def print_nonzero_counts(self) -> None:
        """The per-layer table (:meth:`layer_table`), then the prune rate (the original's per-layer print)."""
        print('\n'.join(self.layer_table()))
        print(f'Prune rate: {self.prune_rate}')

    def overall_density(self) -> float:
        """Non-zero fraction of the mask set (dense, popped layers are not included)."""
        return self._density(_count_true(self.masks))

    def _density(self, nonzeros: Dict[str, int]) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(nonzeros.values()) / max(total, 1)

    def _report(self, headline: str, nonzeros: Dict[str, int]) -> None:
        """``headline`` on the console (one line); the per-layer table appended to ``report_path`` (and printed with
        ``verbose``); overall density, prune rate and per-layer densities to the log writer. ``nonzeros``: each
        mask's count, read once for all of these."""
        if self.verbose or self.report_path:
            table = self.layer_table(nonzeros)
            if self.verbose:
                print('\n'.join(table))
            if self.report_path:
                with open(self.report_path, 'a', encoding='utf-8') as f:
                    f.write('\n'.join([headline, *table, '', '']))
        print(headline)
        if self.log_writer is None:
            return
        layers = {name: nonzeros[name] / m.numel() for name, m in self.masks.items()}
        scalars = {'overall': self._density(nonzeros), 'prune_rate': self.prune_rate, **layers}
        if hasattr(self.log_writer, 'add_scalar'):
            for key, value in scalars.items():
                self.log_writer.add_scalar(f'sparsity/{key}', value, self.steps)
        else:
            self.log_writer.update(head='sparsity', **scalars)

    # ---- checkpointing --------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain dict (builtins and CPU tensors; ``torch.load(weights_only=True)``-safe) that restores training."""
        return {
            'masks': {name: mask.detach().cpu().clone() for name, mask in self.masks.items()},
            'steps': self.steps,
            'prune_rate': self.prune_rate,
            'density': self.density,
            'prune_rate_decay': None if self.prune_rate_decay is None else self.prune_rate_decay.state_dict(),
            'rng_state': self.generator.get_state(),
            'rng_device': self.generator.device.type,
            # saved only while the EMA still needs them (checkpoint taken right after a prune/grow step)
            'grown': ({name: g.detach().cpu().clone() for name, g in self.grown.items()}
                      if self.grown and self.grown_at_step == self.steps else {}),
            'grown_at_step': self.grown_at_step,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore masks, counters, schedule and RNG from :meth:`state_dict`; then apply the masks."""
        if not self.params:
            raise ValueError('Masking.load_state_dict needs registered parameters: use add_module(model, mask_state)')
        unknown = [n for n in state['masks'] if n not in self.params]
        if unknown:
            raise ValueError(f'saved masks for parameters this model does not sparsify: {unknown[:5]} '
                             f'(different model, or --only-L differs from the saved run)')
        masks = {}
        for name, mask in state['masks'].items():
            param = self.params[name]
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f'saved mask {name} has shape {list(mask.shape)}, parameter has {list(param.shape)}')
            # a private contiguous copy: never alias (and later modify in place) the caller's checkpoint tensors
            masks[name] = mask.to(device=param.device, dtype=torch.bool, memory_format=torch.contiguous_format,
                                  copy=True)
        self.masks = masks
        self.grown = {name: g.to(device=masks[name].device, dtype=torch.bool, memory_format=torch.contiguous_format)
                      for name, g in state.get('grown', {}).items() if name in masks}
        self.grown_at_step = int(state.get('grown_at_step', -1))
        self.steps = int(state['steps'])
        self.prune_rate = float(state['prune_rate'])
        self.density = float(state['density'])
        if self.prune_rate_decay is not None and state.get('prune_rate_decay') is not None:
            self.prune_rate_decay.load_state_dict(state['prune_rate_decay'])
        if state['rng_device'] == self.generator.device.type:
            self.generator.set_state(state['rng_state'])
        else:
            self.generator.manual_seed(self.seed + self.steps)
            print(f'mask RNG state was saved on {state["rng_device"]}, now on {self.generator.device.type}: '
                  f'reseeded with {self.seed + self.steps} (future regrowth draws differ from an uninterrupted run)')
        self._refresh_lists()
        self.apply_mask()
        self.mask_version += 1
        print(f'Restored {len(masks)} masks at step {self.steps}, overall density {self.overall_density():.4f}')

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _refresh_lists(self) -> None:
        self.names = list(self.masks)
        self._mask_list = [self.masks[n] for n in self.names]
        self._param_list = [self.params[n] for n in self.names]

    @staticmethod
    def _broadcast_from_rank0(tensors: List[torch.Tensor]) -> None:
        """Overwrite ``tensors`` (bool or uint8) in place with rank 0's values, in one flat broadcast."""
        if not _is_distributed() or not tensors:
            return
        flat = torch.cat([t.flatten().to(torch.uint8) for t in tensors])
        dist.broadcast(flat, src=0)
        for t, chunk in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
            t.copy_(chunk.view_as(t))


def _count_true(masks: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """How many entries of each bool mask are set, read from the device in one transfer (not one sync per mask)."""
    if not masks:
        return {}
    return dict(zip(masks, torch.stack([m.sum() for m in masks.values()]).tolist()))


@contextlib.contextmanager
def _without_cudnn_autotuning():
    """cuDNN picks its algorithms by heuristics for SNIP's one pass: with ``cudnn.benchmark`` (main.py sets it) every
    conv shape of the pass would first time every algorithm, for shapes (float32, large depthwise kernels) that no
    training step uses again. Same maths; only ``cudnn.benchmark`` is touched, and restored."""
    cudnn = torch.backends.cudnn
    was = cudnn.benchmark
    cudnn.benchmark = False
    try:
        yield
    finally:
        cudnn.benchmark = was


def _recompute_in_backward(model: nn.Module) -> None:
    """Make SNIP's throw-away copy keep only block inputs for backward (gradient checkpointing, timm's
    ``set_grad_checkpointing``).

    SNIP scores one batch at the training batch size in float32, without autocast: stored in full, its activations
    took more GPU memory than the bf16 training steps that follow (the run's peak). Recomputed block by block, the
    scores are the same numbers (same ops in the same order; checkpointing restores the RNG for drop path).
    """
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError):  # timm models without it assert
        pass


def _zero_score_share(scores: torch.Tensor, keep: int, tau: torch.Tensor, density: float) -> float:
    """Fraction of the SNIP scores equal to 0 to keep at random, so that ``keep`` weights survive (0.0 normally).

    When fewer than ``keep`` scores are positive, the threshold is 0 and the original's strict ``score > tau`` keeps
    none of the zero-scored weights: a model whose norm layers start at zero scale (timm's ``zero_init_last``: no
    gradient reaches the convs of its residual branches) ends near 99 % sparsity whatever ``--sparsity`` asks. Here
    the rest of the budget is spread evenly over the zero-scored weights (SNIP cannot rank them), and it is said.
    """
    if tau.item() != 0:
        return 0.0
    positive = int((scores > 0).sum())
    zeros = int((scores == 0).sum())
    share = (keep - positive) / zeros
    print(f'SNIP: {zeros} of the {scores.numel()} weights score exactly 0 (no gradient reaches them, e.g. behind a '
          f'norm layer that starts at zero scale); the original keeps none of them and would end at sparsity '
          f'{1 - positive / scores.numel():.4f}; here each is kept with probability {share:.4f} to reach the asked '
          f'{1 - density:.4f}')
    return share


def _resolve(flag: str, mode: str, registry: Dict[str, Callable]) -> Callable:
    if mode in registry:
        return registry[mode]
    why = ' (it never worked in the original code and is not supported)' if mode in _BROKEN_IN_ORIGINAL else ''
    raise ValueError(f'{flag} must be one of {tuple(registry)}; got {mode!r}{why}')


def _num_to_remove(masking: Masking, mask: torch.Tensor) -> Tuple[int, int]:
    nonzeros = int(mask.sum())
    return nonzeros, min(math.ceil(masking.prune_rate * nonzeros), nonzeros)


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of a 1-D tensor, in its own dtype: ``torch.topk(values, k).values[-1]``, the
    original's SNIP threshold. On CPU through ``kthvalue`` (linear time, no k-sized copy); elsewhere through an unsorted
    ``topk`` (CUDA's ``kthvalue`` scans a 1-D tensor with a single thread block)."""
    if values.device.type == 'cpu':
        return torch.kthvalue(values, values.numel() - k + 1).values
    return torch.topk(values, k, sorted=False).values.amin()


def _select_ranked(candidates: torch.Tensor, scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Bool tensor marking the ``k`` candidates of highest (``largest``) or lowest ``scores``.

    Ranked in the scores' own dtype, ties going to the lower flat index: exactly the first ``k`` candidates of a stable
    ``torch.sort`` of the scores, which is how the original chose what to prune and grow. No sort is needed: every
    candidate strictly better than the k-th score is taken, and the slots left go to the candidates equal to it, in
    index order. (Negating the scores to rank the lowest is exact.)
    """
    chosen = torch.zeros_like(candidates, dtype=torch.bool)
    k = min(k, int(candidates.sum()))
    if k <= 0:
        return chosen
    flat = scores.detach().flatten()
    inside = candidates.flatten()
    ranked = (flat if largest else -flat).masked_fill(~inside, float('-inf'))
    kth = _kth_largest(ranked, k)
    better = ranked > kth
    tied = (ranked == kth) & inside
    chosen.view(-1).copy_(better | (tied & (torch.cumsum(tied, 0) <= k - better.sum())))
    return chosen


def _remove_lowest(mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Copy of ``mask`` with the ``k`` active positions of lowest ``scores`` switched off."""
    return mask & ~_select_ranked(mask, scores, k, largest=False)


def magnitude_prune(masking: Masking, mask: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    """Remove the ``ceil(prune_rate * nonzeros)`` active weights of smallest magnitude (exactly that many)."""
    _, num_remove = _num_to_remove(masking, mask)
    return _remove_lowest(mask, weight.detach().abs(), num_remove)


def magnitude_and_negativity_prune(masking: Masking, mask: torch.Tensor, weight: torch.Tensor,
                                   name: str) -> torch.Tensor:
    """SET: remove half of the budget as the most negative weights, the other half as the smallest magnitudes."""
    _, num_remove = _num_to_remove(masking, mask)
    w = weight.detach()
    without_negative = _remove_lowest(mask, w, num_remove // 2)
    return _remove_lowest(without_negative, w.abs(), num_remove - num_remove // 2)


def random_growth(masking: Masking, name: str, mask: torch.Tensor, total_regrowth: int,
                  weight: torch.Tensor) -> torch.Tensor:
    """Exactly ``total_regrowth`` inactive positions, uniformly at random (generator shared by all ranks)."""
    scores = torch.rand(mask.shape, generator=masking.generator, device=mask.device)
    return _select_ranked(~mask, scores, total_regrowth, largest=True)


def gradient_growth(masking: Masking, name: str, mask: torch.Tensor, total_regrowth: int,
                    weight: torch.Tensor) -> torch.Tensor:
    """The inactive positions with the largest |gradient| of the step that just happened."""
    scores = masking.get_gradient_for_weights(weight).abs()
    return _select_ranked(~mask, scores, total_regrowth, largest=True)


def momentum_growth(masking: Masking, name: str, mask: torch.Tensor, total_regrowth: int,
                    weight: torch.Tensor) -> torch.Tensor:
    """The inactive positions with the largest |momentum| (Adam: exp_avg / sqrt(exp_avg_sq))."""
    scores = masking.get_momentum_for_weight(weight).abs()
    return _select_ranked(~mask, scores, total_regrowth, largest=True)


def momentum_neuron_growth(masking: Masking, name: str, mask: torch.Tensor, total_regrowth: int,
                           weight: torch.Tensor) -> torch.Tensor:
    """Per output neuron, regrow a share of the budget proportional to its mean |momentum|, best positions first.

    The original floored each neuron's share and skipped neurons with < 10 slots or a zero threshold, so it regrew
    fewer weights than it pruned. Here each neuron gets floor(share), capped by its free slots, and the remainder
    goes to the best remaining inactive positions of the whole layer, so exactly ``total_regrowth`` are grown.
    Positions are ranked in the momentum's dtype, ties to the lower index (as :func:`_select_ranked`).
    """
    momentum = masking.get_momentum_for_weight(weight).abs().reshape(mask.shape[0], -1)
    free = ~mask.reshape(mask.shape[0], -1)
    share = momentum.double().mean(dim=1)
    share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1.0 / share.numel())
    quota = torch.minimum(torch.floor(share * total_regrowth).long(), free.sum(dim=1))
    scores = momentum.masked_fill(~free, -float('inf'))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    grown = (ranks < quota[:, None]) & free
    remainder = total_regrowth - int(grown.sum())
    grown |= _select_ranked(free & ~grown, momentum, remainder, largest=True)
    return grown.view(mask.shape)


_PRUNE_FUNCS: Dict[str, Callable] = {'magnitude': magnitude_prune, 'SET': magnitude_and_negativity_prune}
_GROWTH_FUNCS: Dict[str, Callable] = {'random': random_growth, 'gradient': gradient_growth,
                                      'momentum': momentum_growth, 'momentum_neuron': momentum_neuron_growth}


class ModelEma:
    """EMA of the model weights that respects the sparse masks.

    With a mask: pruned positions are 0, other active positions follow the usual EMA, and positions (re)grown by a
    prune/grow restart at the live value. Buffers (BN statistics) always follow the usual EMA; integer buffers are
    copied. A grown weight is 0 at the update right after its prune/grow (``Masking`` restarts it at 0), so its EMA
    restarts one update later, once the optimizer has moved it: the original reached the same point through its
    "active and EMA exactly 0" test. Here ``Masking.grown`` says which positions were grown, so an active weight
    whose EMA happens to be 0 is not mistaken for a new one, and pruned-then-regrown positions restart too.

    Call :meth:`update` after every optimizer step and :meth:`track_masks` once the masks exist (main.py does both).

    Args:
        model: the (un-wrapped) model; it is deep-copied.
        decay: EMA decay per update.
        device: if given, keep the copy there (e.g. 'cpu').
        resume: optional checkpoint path with ``state_dict_ema`` to start from.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, device: str = '', resume: str = ''):
        self.ema = copy.deepcopy(model)
        self.ema.eval()
        self.decay = decay
        self.device = device
        if device:
            self.ema.to(device=device)
        self.ema_has_module = hasattr(self.ema, 'module')
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self._masks: Dict[str, torch.Tensor] = {}    # the masks on the EMA's device, refreshed when they change
        self._mask_version = -1
        self._restart: Dict[str, torch.Tensor] = {}  # grown positions to restart at the next update after a step
        self._restart_after_step = -1
        if resume:
            checkpoint = torch.load(resume, map_location='cpu', weights_only=True)
            self.ema.load_state_dict(checkpoint['state_dict_ema'])
            print(f'Loaded state_dict_ema from {resume}')

    @torch.no_grad()
    def track_masks(self, mask: Masking) -> None:
        """Take ``mask``'s current masks (and any positions its latest prune/grow just regrew) as seen.

        Call after creating or restoring the masks: a run resumed from a checkpoint written right after a prune/grow
        then still restarts those grown positions at its first update, exactly as an uninterrupted run does.
        """
        ema = {_strip_module(k): v for k, v in self.ema.state_dict().items()}
        self._masks = {n: m.to(ema[n].device) for n, m in mask.masks.items()}
        self._mask_version = mask.mask_version
        if mask.grown and mask.grown_at_step == mask.steps:
            self._restart = {n: g.to(ema[n].device) for n, g in mask.grown.items()}
            self._restart_after_step = mask.steps

    @torch.no_grad()
    def update(self, model: nn.Module, mask: Optional[Masking] = None) -> None:
        """One EMA step towards ``model`` (DDP-wrapped or not); with ``mask``, the sparse rules above."""
        live = {_strip_module(k): v for k, v in model.state_dict().items()}
        ema = {_strip_module(k): v for k, v in self.ema.state_dict().items()}
        ema_float, live_float = [], []
        for name, ema_value in ema.items():
            value = live[name].to(device=ema_value.device)
            if ema_value.dtype.is_floating_point:
                ema_float.append(ema_value)
                live_float.append(value.to(ema_value.dtype))
            else:
                ema_value.copy_(value)
        torch._foreach_lerp_(ema_float, live_float, 1.0 - self.decay)  # e = d * e + (1 - d) * w
        if mask is None or not mask.masks:
            return
        if self._restart and mask.steps > self._restart_after_step:  # grown weights have had an optimizer step
            for name, grown in self._restart.items():
                ema[name].copy_(torch.where(grown, live[name].to(ema[name]), ema[name]))
            self._restart = {}
        if mask.mask_version != self._mask_version:
            self.track_masks(mask)
        torch._foreach_mul_([ema[n] for n in self._masks], list(self._masks.values()))  # pruned positions -> 0
