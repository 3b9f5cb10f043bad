"""Convert a checkpoint you trust into one that the project's safe loader reads (``torch.load(weights_only=True)``).

Every loader of this project unpickles only tensors and plain Python values, so no checkpoint can run code when it
is loaded. Files that pickle anything else are refused, e.g. those of the original SLaK code, which stored an
``argparse.Namespace`` under ``args``. This tool loads such a file with **full unpickling, which runs any code the file
holds**: use it only on files whose origin you trust. It writes a new file where ``args`` is a plain dict, numpy
values are tensors or Python numbers, whole pickled modules are their state dicts, and any other object is dropped
(each dropped entry is named). The input is never modified; the output is written atomically and must not exist yet.

Usage: ``python tools/convert_checkpoint.py original_checkpoint.pth converted.pth``
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import SLaK  # noqa: E402
import utils  # noqa: E402


def to_plain(value: Any, where: str, dropped: List[str]) -> Any:
    """``value`` rebuilt from tensors, builtins, dicts, lists and tuples only. What cannot be becomes None (a dict
    entry is left out) and its path, starting at ``where``, is appended to ``dropped``."""
    if isinstance(value, np.generic):  # before the builtins: np.float64 is a float subclass, still pickled as numpy
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, argparse.Namespace):
        return utils.args_to_dict(value)  # the original's args: every value as a builtin (others as str)
    if isinstance(value, torch.nn.Module):
        return value.state_dict()
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        plain = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                dropped.append(f'{where}[{key!r}]')
                continue
            converted = to_plain(item, f'{where}[{key!r}]', dropped)
            if converted is not None or item is None:
                plain[key] = converted
        return plain
    if isinstance(value, (list, tuple)):
        items = [to_plain(item, f'{where}[{i}]', dropped) for i, item in enumerate(value)]
        return type(value)(items) if isinstance(value, list) else tuple(items)
    dropped.append(f'{where} ({type(value).__module__}.{type(value).__qualname__})')
    return None


def convert(source: str, target: str) -> List[str]:
    """Write ``source``'s plain conversion to ``target`` (atomically) and check that the safe loader reads it back;
    returns the dropped entries. Raises ValueError for a missing input, an existing output, or an unreadable input."""
    if not os.path.isfile(source):
        raise ValueError(f'{source} not found')
    if os.path.exists(target):
        raise ValueError(f'{target} already exists; choose a new file name (the input is never overwritten)')
    print(f'warning: loading {source} with full unpickling, which runs any code the file holds; continue only with '
          f'files whose origin you trust', file=sys.stderr, flush=True)
    try:
        checkpoint = torch.load(source, map_location='cpu', weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated, corrupted or not a checkpoint at all
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ValueError(f'cannot read {source} ({type(e).__name__}: {cause})') from None
    dropped: List[str] = []
    converted = to_plain(checkpoint, 'checkpoint', dropped)
    if not isinstance(converted, dict):
        raise ValueError(f'{source} holds a {type(checkpoint).__name__}, not a checkpoint dict')
    utils.atomic_save(converted, target)
    try:
        SLaK.load_checkpoint_file(target)
    except SLaK.CheckpointError as e:
        os.remove(target)
        raise ValueError(f'the conversion of {source} would still be refused ({e}); nothing was written') from None
    return dropped


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser('Convert a trusted checkpoint into one that loads with weights_only=True')
    parser.add_argument('source', help='checkpoint to convert (loaded with full unpickling: trust it first)')
    parser.add_argument('target', help='new file to write')
    args = parser.parse_args(argv)
    try:
        dropped = convert(args.source, args.target)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.target}' + (f'; dropped (not tensors or plain values): {", ".join(dropped)}' if dropped
                                    else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
