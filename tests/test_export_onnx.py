"""tools/export_onnx.py: folded SLaK models written by PyTorch's ONNX exporter give PyTorch's logits in onnxruntime
(fp32, 1e-4 relative), for Decom and full kernels, dense and sparse weights; Triton convs become plain ONNX Convs."""
import os
import sys

import onnx
import pytest
import torch
import timm

import SLaK

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import export_onnx  # noqa: E402

from test_timm import randomise_bn, sparsify  # noqa: E402

SMALL = dict(width_factor=0.125, kernel_size=[9, 7, 5, 5, 3], depths=[1, 1, 2, 1], num_classes=10)


def large_kernel_convs(path: str):
    """(kernel shape, group, pads) of every depthwise Conv node in the ONNX file."""
    graph = onnx.load(path).graph
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    convs = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == 'Conv' and attrs.get('group', 1) > 1:
            convs.append((weights[node.input[1]][-2:], attrs['group'], tuple(attrs['pads'])))
    return convs


@pytest.mark.parametrize('Decom,decomposed', [(True, False), (True, True), (False, False)],
                         ids=['decom-KxK', 'decom-decomposed', 'full-KxK'])  # only Decom keeps two kernels
@pytest.mark.parametrize('sparse', [False, True], ids=['dense', 'sparse'])
def test_folded_model_in_onnxruntime_gives_pytorch_logits(tmp_path, Decom, decomposed, sparse):
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('SLaK_tiny', Decom=Decom, **SMALL)).eval()
    if sparse:
        sparsify(model)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)  # unfolded: the comparison covers folding and export
    model.reparameterize(decomposed=decomposed)
    path = str(tmp_path / 'slak.onnx')
    export_onnx.export_onnx(model, path, 64)
    got = export_onnx.onnxruntime_logits(path, images)  # batch 3: the exported batch dimension is dynamic
    assert ((got - expected).abs().max() / expected.abs().max()).item() < export_onnx.RELATIVE_TOLERANCE
    convs = large_kernel_convs(path)
    stage_kernels = [9, 7, 5, 5, 5]  # one per block (depths 1, 1, 2, 1)
    if decomposed:  # tall K x k (the k x k kernel added into it) and wide k x K per block
        want = [s for k in stage_kernels for s in ((k, 3), (3, k))]
    else:
        want = [(k, k) for k in stage_kernels]
    assert [shape for shape, _, _ in convs] == want
    channels = [12, 24, 48, 48, 96]
    assert [group for _, group, _ in convs] == [c for c in channels for _ in range(2 if decomposed else 1)]
    assert all(pads == (kh // 2, kw // 2, kh // 2, kw // 2) for (kh, kw), _, pads in convs)


def test_triton_convs_export_as_the_plain_convolution(tmp_path):
    if SLaK._load_fast_dwconv() is None:
        pytest.skip('cutlass/ kernel not importable')
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('SLaK_tiny', Decom=True, conv_impl='cutlass', **SMALL)).eval()
    model.reparameterize()
    assert type(model.stages[0][0].large_kernel.lkb_reparam).__name__ == 'DepthWiseConv2dImplicitGEMM'
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # (without a GPU the module computes with F.conv2d: the same convolution)
        expected = model(images)
    path = str(tmp_path / 'slak.onnx')
    export_onnx.export_onnx(model, path, 64)
    assert type(model.stages[0][0].large_kernel.lkb_reparam) is torch.nn.Conv2d
    assert {node.op_type for node in onnx.load(path).graph.node} >= {'Conv'}
    assert all(node.domain in ('', 'ai.onnx') for node in onnx.load(path).graph.node)  # no custom op
    got = export_onnx.onnxruntime_logits(path, images)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < export_onnx.RELATIVE_TOLERANCE


def test_command_line_exports_a_checkpoint_and_reports_bad_input(tmp_path, capsys):
    torch.manual_seed(0)
    flags = ['--model', 'SLaK_tiny', '--Decom', 'true', '--width_factor', '0.125', '--kernel_size', '9', '7', '5',
             '5', '3', '--input_size', '64', '--nb_classes', '10']
    source = timm.create_model('SLaK_tiny', Decom=True, width_factor=0.125, kernel_size=[9, 7, 5, 5, 3],
                               num_classes=10)
    checkpoint = str(tmp_path / 'checkpoint-best.pth')
    torch.save({'model': source.state_dict(), 'epoch': 'best'}, checkpoint)
    output = str(tmp_path / 'out' / 'slak.onnx')
    parser = export_onnx.get_args_parser()
    code = export_onnx.train_main.run(flags + ['--resume', checkpoint, '--output', output], parser,
                                      export_onnx.export_main)
    printed = capsys.readouterr().out
    assert code == 0 and os.path.isfile(output) and not os.path.exists(output + '.tmp')
    assert 'onnxruntime vs PyTorch' in printed
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.eval()(images)
    got = export_onnx.onnxruntime_logits(output, images)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < export_onnx.RELATIVE_TOLERANCE

    code = export_onnx.train_main.run(flags + ['--resume', str(tmp_path / 'missing.pth')], parser,
                                      export_onnx.export_main)
    assert code == 2 and capsys.readouterr().err.startswith('error: --resume checkpoint not found')
    code = export_onnx.train_main.run(['--model', 'convnext_tiny'], parser, export_onnx.export_main)
    assert code == 2 and 'must be a SLaK model' in capsys.readouterr().err
