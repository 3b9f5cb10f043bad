"""Export a SLaK model, folded for inference, to ONNX with PyTorch's exporter, and check it with onnxruntime.

The model flags are main.py's, so an evaluation command exports with the same flags::

    python tools/export_onnx.py --model SLaK_tiny --Decom true --kernel_size 51 49 47 13 5 --width_factor 1.3 \\
        --resume /path/to/checkpoint.pth --output slak_tiny.onnx

``--resume`` loads the checkpoint's ``model`` entry strictly (without it the weights are random: handy for timing).
The model is folded (``reparameterize``: one K x K kernel per block; ``--decomposed true`` keeps Decom models' two
rectangular kernels) and exported in eval mode for ``--input_size`` images with a dynamic batch dimension. Large
depthwise convolutions of our Triton kernel (the default on CUDA) are exported as the plain convolution they compute:
an ONNX ``Conv`` with ``group`` = channels and per-axis "same" padding. ``--check true`` (default) runs the file in
onnxruntime on random images and reports its largest difference to PyTorch. The file is written atomically.
"""
import argparse
import os
import sys
from typing import Optional

import torch
import torch.nn as nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import main as train_main  # noqa: E402  (model flags, model construction, the error-line entry point)
import SLaK  # noqa: E402
from utils import str2bool  # noqa: E402

# fp32 logits of onnxruntime and PyTorch agree to ~1e-7 relative; a larger gap means a wrong export
RELATIVE_TOLERANCE = 1e-4


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Export a folded SLaK model to ONNX', parents=[train_main.get_args_parser()])
    parser.add_argument('--output', default='slak.onnx', type=str, help='ONNX file to write')
    parser.add_argument('--decomposed', default=False, type=str2bool,
                        help='fold Decom models into their two rectangular kernels instead of one K x K kernel')
    parser.add_argument('--opset', default=None, type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--check', default=True, type=str2bool,
                        help='run the file in onnxruntime and compare its logits with PyTorch')
    return parser


def plain_convs(model: nn.Module) -> nn.Module:
    """Replace every Triton depthwise conv (``DepthWiseConv2dImplicitGEMM``) by the ``nn.Conv2d`` it computes, with
    the same weight and bias (``SLaK.get_conv2d(..., impl='torch')``), so the exporter sees a standard convolution."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ != 'DepthWiseConv2dImplicitGEMM':
            continue
        channels = module.in_channels
        conv = SLaK.get_conv2d(channels, channels, module.kernel_size, 1, 0, 1, channels, module.bias is not None,
                               impl='torch', device=module.weight.device, dtype=module.weight.dtype)
        conv.load_state_dict(module.state_dict())
        parent, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent), child, conv)
    return model


def export_onnx(model: nn.Module, path: str, input_size: int, opset: Optional[int] = None) -> None:
    """Write ``model`` (in eval mode, on the CPU, Triton convs as plain ones) to ``path`` for (N, C, input_size,
    input_size) images, N dynamic; a temporary file is renamed into place, so a failed export leaves none."""
    model = plain_convs(model.eval().cpu())
    example = torch.randn(2, model.in_chans, input_size, input_size)  # batch 2: torch.export specialises size 1
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    try:
        torch.onnx.export(model, (example,), tmp, dynamo=True, external_data=False, opset_version=opset,
                          input_names=['input'], output_names=['logits'], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim('batch')},))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def onnxruntime_logits(path: str, images: torch.Tensor) -> torch.Tensor:
    """The logits of the ONNX file at ``path`` for ``images``, computed by onnxruntime on the CPU."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {'input': images.numpy()})[0])


def export_main(args: argparse.Namespace) -> None:
    if not args.model.startswith('SLaK_'):
        raise ValueError(f'--model must be a SLaK model (SLaK_tiny/_small/_base/_large); got {args.model!r}')
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f'--resume checkpoint not found: {args.resume}')
    if args.input_size < 32:
        raise ValueError(f'--input_size must be >= 32 (SLaK downsamples 32x); got {args.input_size}')
    model = train_main.build_model(args, args.model)
    if args.resume:
        model.load_pretrained(args.resume)
    model.eval().reparameterize(decomposed=args.decomposed)
    export_onnx(model, args.output, args.input_size, args.opset)
    print(f'wrote {args.output} ({os.path.getsize(args.output) / 2 ** 20:.1f} MiB)')
    if args.check:
        images = torch.randn(3, model.in_chans, args.input_size, args.input_size)
        with torch.no_grad():
            expected = model(images)
        error = ((onnxruntime_logits(args.output, images) - expected).abs().max() / expected.abs().max()).item()
        print(f'onnxruntime vs PyTorch: largest logit difference {error:.2e} of the largest logit')
        if error > RELATIVE_TOLERANCE:
            raise ValueError(f'onnxruntime logits differ from PyTorch by {error:.2e} (relative); the export is wrong')


if __name__ == '__main__':
    sys.exit(train_main.run(parser=get_args_parser(), main_fn=export_main))
