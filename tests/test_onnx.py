"""ONNX export: every exported net runs in onnxruntime and agrees with owlnet's forward.

Each net is exported with every blob as a graph output, so each layer's result is compared,
not only the net's last one (relative error: max |difference| over max |value|). The nets of
our own: every blob within 1e-4. The deploy nets: outputs and classifier scores within 1e-4,
every intermediate blob within 1e-3 (float32 rounding grows through ResNet-110's 100+
layers to ~2e-4 on some pre-BatchNorm convolutions; a wrong layer gives O(1)).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import owlnet
from owlnet import cli, config
from owlnet.onnx_export import MIN_OPSET

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from test_model_zoo import (fill_weights, forward_calibrating_batchnorm,  # noqa: E402
                            without_fillers)

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT.parent / "shared" / "caffe-zoo"
OUTPUT_TOLERANCE = 1e-4
BLOB_TOLERANCE = 1e-3
# The big nets' fully connected layers fix their input size; the fully convolutional
# CaffeNet does not (451 x 451 in the file, its smallest whole output at 227).
SPATIAL = {"zoo-bvlc_caffenet_full_conv": (227, 227)}
BIG = {"alexnet", "alexnet_nogroup", "caffenet", "zoo-bvlc_alexnet",
       "zoo-bvlc_reference_caffenet", "zoo-bvlc_caffenet_full_conv"}       # ~60M weights each: seconds to fill, export and load


def _is_deploy_net(path: Path) -> bool:
    try:
        param, _ = config.read_net(str(path))
    except owlnet.OwlnetError:
        return False                     # a solver file
    return bool(param.layer) and param.layer[0].type == "Input"


def _deploy_nets():
    nets = sorted(ROOT.glob("models/*/deploy.prototxt"))
    if ZOO.is_dir():
        nets += sorted(p for p in ZOO.rglob("*.prototxt") if _is_deploy_net(p))
    return nets


def _net_id(path: Path) -> str:
    name = path.parent.name if path.name == "deploy.prototxt" else path.stem
    return f"zoo-{name}" if ZOO in path.parents else name


def _params(paths):
    return [pytest.param(p, id=_net_id(p), marks=[pytest.mark.slow] if _net_id(p) in BIG
                         else []) for p in paths]


def relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


def run_onnx(path_or_model, feeds, outputs=None):
    model = path_or_model.SerializeToString() if hasattr(path_or_model, "graph") \
        else str(path_or_model)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def check_every_blob(net, path=None, strict=(), **options):
    """Export ``net`` (forward already run) with every blob as an output (to ``path``, or
    kept in memory), run it in onnxruntime on the same inputs and compare each blob: the
    net's outputs and the ``strict`` blobs within OUTPUT_TOLERANCE, the others within
    BLOB_TOLERANCE. Returns each blob's relative error."""
    model = owlnet.export_onnx(net, path, outputs=list(net.blobs), **options)
    got = run_onnx(path or model, {name: net.blobs[name].data for name in net.inputs})
    errors = {name: relative_error(got[name], net.blobs[name].data) for name in net.blobs}
    for name, error in errors.items():
        limit = OUTPUT_TOLERANCE if name in net.outputs or name in strict else BLOB_TOLERANCE
        assert error <= limit, f"blob '{name}' differs from owlnet by {error:.2e} (relative)"
    return errors


def prepare_zoo_net(path: Path, rng):
    """The deploy net at batch 1 with seeded random weights, run forward on random inputs
    (ImageNet-sized ones at pixel scale, so LRN sees realistic magnitudes) with BatchNorm
    statistics calibrated on the data, as the OpenCV interoperability test does; a final
    Softmax's scores are scaled to a few units, so its probabilities spread. Returns the net
    and the scores' blob name (None without a final Softmax)."""
    param = without_fillers(config.read_net(str(path))[0])
    for shape in param.layer[0].input_param.shape:
        shape.dim[0] = 1
        if _net_id(path) in SPATIAL:
            shape.dim[2:] = SPATIAL[_net_id(path)]
    net = owlnet.Net(param, owlnet.TEST)
    fill_weights(net, rng)
    for name in net.inputs:
        x = rng.uniform(-1, 1, net.blobs[name].shape).astype(np.float32)
        net.blobs[name].data[...] = x * (100 if x.shape[-1] > 32 else 1)
    forward_calibrating_batchnorm(net, rng)
    if net.layers[-1].param.type != "Softmax":
        return net, None
    scores = net.layers[-1].param.bottom[0]
    classifier = next(name for name, tops in net.top_names.items() if scores in tops)
    factor = np.float32(3 / np.abs(net.blobs[scores].data).max())
    for blob in net.params[classifier]:
        blob.data[...] *= factor
    net.forward(start=classifier)
    return net, scores


@pytest.mark.parametrize("path", _params(_deploy_nets()))
def test_deploy_net_matches_onnxruntime(path, tmp_path):
    net, scores = prepare_zoo_net(path, np.random.default_rng(3))
    # the big nets' 240 MB stay in memory: pytest keeps the last runs' temporary folders
    errors = check_every_blob(net, None if _net_id(path) in BIG else tmp_path / "net.onnx",
                              strict=[scores])
    assert len(errors) == len(net.blobs)
    for name in net.outputs:      # outputs that vary, so agreement means something
        assert np.ptp(net.blobs[name].data) > 0, name
    if scores:                    # probabilities not all on one class
        assert net.blobs[net.outputs[0]].data.max() < 0.999


def test_every_deploy_net_is_covered():
    names = {_net_id(p) for p in _deploy_nets()}
    assert {"alexnet", "googlenet", "resnet110", "lenet", "cifar10_quick"} <= names
    if ZOO.is_dir():
        assert {f"zoo-{name}" for name in ("bvlc_googlenet", "bvlc_alexnet", "lenet",
                "bvlc_reference_caffenet", "bvlc_caffenet_full_conv", "mnist_siamese",
                "cifar10_full", "cifar10_quick")} <= names


# -- nets of our own for the awkward settings ---------------------------------------------

def build(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return owlnet.Net(str(path), owlnet.TEST), path


def randomise(net, rng, scale=1.0, **inputs):
    """Seeded random parameters (He scaling; BatchNorm's statistics left to the test) and
    inputs in [-scale, scale] (or as given by name), then a forward."""
    for name, blobs in net.params.items():
        if net.layer_dict[name].param.type == "BatchNorm":
            continue
        for blob in blobs:
            fan_in = blob.count // blob.shape[0] if blob.shape else 1
            blob.data[...] = rng.normal(0, np.sqrt(2 / fan_in), blob.shape)
    for name in net.inputs:
        net.blobs[name].data[...] = inputs[name] if name in inputs else \
            rng.uniform(-scale, scale, net.blobs[name].shape)
    net.forward()


def _input(name, *dims):
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" ' \
           f'input_param {{ shape {{ {shape} }} }} }}\n'


def _layer(name, kind, bottoms, params="", tops=None):
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms.split())
    top = " ".join(f'top: "{t}"' for t in (tops or name).split())
    return f'layer {{ name: "{name}" type: "{kind}" {bottom} {top} {params} }}\n'


def _pool(name, params):
    return _layer(name, "Pooling", "data", f"pooling_param {{ {params} }}")


# 6 x 5 images. Rows: k3 s2 p1 gives 4 windows, the last [5, 8) cut by Caffe's divisor to the
# padded image's end 7; k4 s3 p3 has a 4th window starting at row 6 (in the pad), dropped.
POOLING_NET = _input("data", 2, 3, 6, 5) + "".join([
    _pool("max_ceil", "pool: MAX kernel_size: 3 stride: 2 pad: 1"),
    _pool("ave_ceil", "pool: AVE kernel_size: 3 stride: 2 pad: 1"),
    _pool("max_drop", "pool: MAX kernel_h: 4 kernel_w: 2 stride_h: 3 stride_w: 2 "
                      "pad_h: 3 pad_w: 1"),
    _pool("ave_drop", "pool: AVE kernel_h: 4 kernel_w: 2 stride_h: 3 stride_w: 2 "
                      "pad_h: 3 pad_w: 1"),
    _pool("ave_unpadded_ceil", "pool: AVE kernel_size: 2 stride: 2"),
    _pool("max_floor", "pool: MAX kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR"),
    _pool("ave_floor", "pool: AVE kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR"),
    _pool("ave_rect", "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 2 "
                      "pad_w: 0"),
    _pool("max_rows_padded", "pool: MAX kernel_h: 3 kernel_w: 1 stride_h: 1 stride_w: 3 "
                             "pad_h: 1 pad_w: 0"),
    _layer("max_masked", "Pooling", "data", "pooling_param { pool: MAX kernel_size: 3 "
           "stride: 2 pad: 1 }", tops="max_masked max_mask"),
    _pool("max_global", "pool: MAX global_pooling: true"),
    _pool("ave_global", "pool: AVE global_pooling: true"),
])


def test_pooling_follows_caffes_windows(tmp_path):
    net, _ = build(tmp_path, POOLING_NET)
    shapes = {name: net.blobs[name].shape[2:] for name in net.blobs}
    # the settings do what the comments say: Caffe's sizes, not ONNX's ceil_mode ones
    assert shapes["ave_ceil"] == (4, 3) and shapes["ave_drop"] == (3, 3)
    assert shapes["ave_unpadded_ceil"] == (3, 3) and shapes["max_rows_padded"] == (6, 2)
    randomise(net, np.random.default_rng(0))
    check_every_blob(net, tmp_path / "pool.onnx", strict=net.blobs)
    # ave_ceil's last window covers rows 5..7 and columns 3..5; Caffe divides its sum by
    # the part inside the padded 8 x 7 frame: rows 5..6 (6 is pad) by columns 3..5 (5 is pad)
    x = net.blobs["data"].data
    corner = x[..., 5:, 3:].sum(axis=(2, 3)) / (2 * 3)
    np.testing.assert_allclose(net.blobs["ave_ceil"].data[..., 3, 2], corner, rtol=1e-5)


def test_pooling_window_wholly_in_the_pad_is_refused(tmp_path):
    text = _input("data", 1, 1, 6, 5) + _pool("empty", "pool: MAX kernel_size: 1 stride: 3")
    net, path = build(tmp_path, text)
    with pytest.raises(owlnet.ConfigError) as info:
        owlnet.export_onnx(net, tmp_path / "x.onnx")
    assert f"{path}:2: layer 'empty' (Pooling) cannot be exported to ONNX" in str(info.value)
    assert not (tmp_path / "x.onnx").exists()


CONV_NET = _input("data", 2, 4, 9, 8) + "".join([
    _layer("conv_rect", "Convolution", "data", "convolution_param { num_output: 6 group: 2 "
           "kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2 }"),
    _layer("conv_dilated", "Convolution", "data", "convolution_param { num_output: 4 "
           "kernel_size: 3 dilation: 2 pad: 2 stride: 2 }"),
    _layer("conv_depthwise", "Convolution", "data", "convolution_param { num_output: 4 "
           "group: 4 kernel_size: 3 pad: 1 bias_term: false }"),
    _layer("deconv", "Deconvolution", "data", "convolution_param { num_output: 6 group: 2 "
           "kernel_size: 4 stride: 2 pad: 1 }"),
    _layer("deconv_rect", "Deconvolution", "data", "convolution_param { num_output: 3 "
           "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 dilation: 2 bias_term: false }"),
    _layer("ip", "InnerProduct", "conv_depthwise", "inner_product_param { num_output: 5 }"),
    _layer("ip_axis2", "InnerProduct", "data", "inner_product_param { num_output: 3 axis: 2 }"),
    _layer("ip_transposed", "InnerProduct", "data",
           "inner_product_param { num_output: 3 axis: -1 transpose: true }"),
])


def test_convolution_and_inner_product_settings(tmp_path):
    net, _ = build(tmp_path, CONV_NET)
    assert net.blobs["conv_rect"].shape == (2, 6, 5, 8)
    assert net.blobs["ip_axis2"].shape == (2, 4, 3)
    randomise(net, np.random.default_rng(1))
    check_every_blob(net, tmp_path / "conv.onnx", strict=net.blobs)


LRN_NET = _input("data", 2, 7, 5, 6) + "".join([
    _layer("lrn_k2", "LRN", "data", "lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }"),
    _layer("lrn_k1", "LRN", "data", "lrn_param { local_size: 3 alpha: 0.01 beta: 0.5 }"),
    _layer("lrn_within", "LRN", "data", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 "
           "norm_region: WITHIN_CHANNEL k: 5 }"),
])


def test_lrn_with_k_and_within_channel(tmp_path):
    net, _ = build(tmp_path, LRN_NET)
    randomise(net, np.random.default_rng(2), scale=3.0)
    check_every_blob(net, tmp_path / "lrn.onnx", strict=net.blobs)
    x, y = net.blobs["data"].data, net.blobs["lrn_k2"].data
    assert relative_error(y, x) > 0.1       # k = 2 and alpha matter at this input scale


MISC_NET = _input("data", 2, 4, 6, 6) + _input("gain", 2, 4) + "".join([
    _layer("bn", "BatchNorm", "data", "batch_norm_param { eps: 0.001 }"),
    _layer("bn_scale", "Scale", "bn", "scale_param { bias_term: true }", tops="bn"),
    _layer("bn_batch", "BatchNorm", "data", "batch_norm_param { use_global_stats: false }"),
    _layer("bias", "Bias", "data"),
    _layer("gained", "Scale", "data gain", "scale_param { axis: 0 bias_term: true }"),
    _layer("sum", "Eltwise", "data bias bn", "eltwise_param { coeff: 1 coeff: -0.5 coeff: 2 }"),
    _layer("prod", "Eltwise", "data bias bn", "eltwise_param { operation: PROD }"),
    _layer("max", "Eltwise", "data bn", "eltwise_param { operation: MAX }"),
    _layer("concat", "Concat", "data bn"),
    _layer("concat_rows", "Concat", "data bn", "concat_param { axis: 2 }"),
    _layer("slice", "Slice", "concat", "slice_param { slice_point: 3 slice_point: 5 }",
           tops="part0 part1 part2"),
    _layer("split", "Split", "data", tops="copy0 copy1"),
    _layer("softmax", "Softmax", "data", "softmax_param { axis: 2 }"),
    _layer("flat", "Flatten", "data", "flatten_param { axis: 1 end_axis: 2 }"),
    _layer("flat_all", "Flatten", "data", "flatten_param { axis: 0 }"),
    _layer("reshaped", "Reshape", "data", "reshape_param { shape { dim: 0 dim: -1 dim: 3 } }"),
    _layer("small", "Pooling", "data", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"),
    _layer("crop", "Crop", "data small", "crop_param { axis: 2 offset: 1 offset: 2 }"),
    _layer("leaky", "ReLU", "copy0", "relu_param { negative_slope: 0.1 }"),
    _layer("relu", "ReLU", "copy1", tops="copy1"),
    _layer("prelu", "PReLU", "data"),
    _layer("prelu_shared", "PReLU", "data", "prelu_param { channel_shared: true }"),
    _layer("elu", "ELU", "data", "elu_param { alpha: 0.7 }"),
    _layer("sigmoid", "Sigmoid", "data"),
    _layer("tanh", "TanH", "data"),
    _layer("abs", "AbsVal", "data"),
    _layer("bnll", "BNLL", "data"),
    _layer("square", "Power", "data", "power_param { power: 2 scale: 0.5 shift: 1 }"),
    _layer("root", "Power", "sigmoid", "power_param { power: 0.5 }"),
    _layer("constant", "Power", "data", "power_param { power: 3 scale: 0 shift: 2 }"),
    _layer("exp2", "Exp", "data", "exp_param { base: 2 scale: 0.3 shift: 0.1 }"),
    _layer("exp", "Exp", "data"),
    _layer("log10", "Log", "sigmoid", "log_param { base: 10 scale: 2 shift: 0.5 }"),
    _layer("log", "Log", "sigmoid"),
    _layer("dropout", "Dropout", "tanh", "dropout_param { dropout_ratio: 0.3 }", tops="tanh"),
    _layer("threshold", "Threshold", "data", "threshold_param { threshold: 0.2 }"),
    _layer("clip", "Clip", "data", "clip_param { min: -0.3 max: 0.5 }"),
    _layer("swish", "Swish", "data", "swish_param { beta: 1.5 }"),
    _layer("mvn", "MVN", "data"),
    _layer("mvn_across", "MVN", "data", "mvn_param { across_channels: true "
           "normalize_variance: false }"),
    _layer("argmax", "ArgMax", "data", "argmax_param { axis: 1 }"),
    _layer("argmax_flat", "ArgMax", "data", "argmax_param { out_max_val: true }"),
])


@pytest.mark.parametrize("opset", [MIN_OPSET, 17, 20])
def test_every_layer_kind(tmp_path, opset):
    net, _ = build(tmp_path, MISC_NET)
    rng = np.random.default_rng(4)
    randomise(net, rng)
    mean, var, factor = net.params["bn"]
    mean.data[...] = rng.normal(0, 1, mean.shape) * 2.5
    var.data[...] = rng.uniform(0.5, 2, var.shape) * 2.5
    factor.data[...] = 2.5          # Caffe's moving-average factor divides both
    net.forward()
    check_every_blob(net, tmp_path / "misc.onnx", strict=net.blobs, opset=opset)
    exported = onnx.load(str(tmp_path / "misc.onnx"))
    assert exported.opset_import[0].version == opset
    onnx.checker.check_model(exported, full_check=True)


def test_batchnorm_uses_the_moving_average_factor(tmp_path):
    net, _ = build(tmp_path, _input("data", 1, 2, 1, 1) + _layer("bn", "BatchNorm", "data"))
    net.params["bn"][0].data[...] = [4, 8]
    net.params["bn"][1].data[...] = [4, 16]
    net.params["bn"][2].data[...] = 4            # mean (1, 2), variance (1, 4)
    x = np.array([3, 6], np.float32).reshape(1, 2, 1, 1)
    got = run_onnx(owlnet.export_onnx(net), {"data": x})["bn"]
    np.testing.assert_allclose(got.ravel(), [2 / np.sqrt(1 + 1e-5), 4 / np.sqrt(4 + 1e-5)],
                               rtol=1e-6)


# -- batch size ------------------------------------------------------------------------------

SMALL_NET = _input("data", 2, 3, 8, 8) + "".join([
    _layer("conv", "Convolution", "data", "convolution_param { num_output: 4 kernel_size: 3 }"),
    _layer("relu", "ReLU", "conv", tops="conv"),
    _layer("pool", "Pooling", "conv", "pooling_param { pool: AVE kernel_size: 3 stride: 2 "
           "pad: 1 }"),
    _layer("flat", "Flatten", "pool"),
    _layer("rows", "Reshape", "pool", "reshape_param { shape { dim: -1 dim: 4 } }"),
    _layer("ip", "InnerProduct", "flat", "inner_product_param { num_output: 5 }"),
    _layer("prob", "Softmax", "ip"),
])


def test_dynamic_batch_runs_at_any_batch_size(tmp_path):
    net, _ = build(tmp_path, SMALL_NET)
    rng = np.random.default_rng(5)
    randomise(net, rng)
    path = tmp_path / "small.onnx"
    model = owlnet.export_onnx(net, path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert [o.name for o in model.graph.output] == ["rows", "prob"]
    for batch in (1, 3):
        net.blobs["data"].reshape((batch, 3, 8, 8))
        net.reshape()
        net.blobs["data"].data[...] = rng.normal(0, 1, net.blobs["data"].shape)
        net.forward()
        got = run_onnx(path, {"data": net.blobs["data"].data})
        for name in ("rows", "prob"):
            assert got[name].shape == net.blobs[name].shape
            assert relative_error(got[name], net.blobs[name].data) <= OUTPUT_TOLERANCE


def test_fixed_batch_and_the_net_keeps_its_shape(tmp_path):
    net, _ = build(tmp_path, SMALL_NET)
    model = owlnet.export_onnx(net, None, batch=5)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [5, 3, 8, 8]
    assert net.blobs["data"].shape == (2, 3, 8, 8) and net.blobs["prob"].shape == (2, 5)
    x = np.random.default_rng(6).normal(size=(5, 3, 8, 8)).astype(np.float32)
    assert run_onnx(model, {"data": x})["prob"].shape == (5, 5)


def test_batch_mixing_layers_need_a_fixed_batch(tmp_path):
    text = _input("data", 2, 3) + _layer("wide", "Reshape", "data",
                                          "reshape_param { shape { dim: 1 dim: -1 } }")
    net, path = build(tmp_path, text)
    with pytest.raises(owlnet.ConfigError, match=re.escape(f"{path}:2: layer 'wide'")):
        owlnet.export_onnx(net)
    model = owlnet.export_onnx(net, batch=2)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_onnx(model, {"data": x})["wide"], x.reshape(1, 6))


# -- refusals and arguments -----------------------------------------------------------------

def test_a_layer_without_onnx_form_is_refused_with_its_line(tmp_path):
    text = (_input("data", 2, 3) + _input("label", 2)
            + _layer("ip", "InnerProduct", "data", "inner_product_param { num_output: 2 }")
            + "# the loss has no ONNX form\n"
            + _layer("loss", "SoftmaxWithLoss", "ip label"))
    net, path = build(tmp_path, text)
    with pytest.raises(owlnet.ConfigError) as info:
        owlnet.export_onnx(net, tmp_path / "x.onnx")
    message = str(info.value)
    assert message.startswith(f"{path}:5: layer 'loss' (SoftmaxWithLoss) cannot be exported")
    assert "Convolution" in message            # it lists what can be exported
    assert "\n" not in message


def test_bad_arguments(tmp_path):
    net, _ = build(tmp_path, SMALL_NET)
    with pytest.raises(owlnet.ConfigError, match="opset 9"):
        owlnet.export_onnx(net, opset=9)
    with pytest.raises(owlnet.ConfigError, match="batch"):
        owlnet.export_onnx(net, batch=0)
    with pytest.raises(owlnet.ConfigError, match="no blob 'nope'"):
        owlnet.export_onnx(net, outputs=["nope"])
    train = owlnet.Net(str(tmp_path / "net.prototxt"), owlnet.TRAIN)
    with pytest.raises(owlnet.ConfigError, match="TEST-phase"):
        owlnet.export_onnx(train)


# -- the command ------------------------------------------------------------------------------

def test_export_onnx_command(tmp_path, capsys):
    deploy = ROOT / "models/lenet/deploy.prototxt"
    net = owlnet.Net(str(deploy), owlnet.TEST)
    rng = np.random.default_rng(8)
    fill_weights(net, rng)
    weights = tmp_path / "lenet.caffemodel"
    net.save(weights)
    out = tmp_path / "lenet.onnx"
    assert cli.main(["export-onnx", str(deploy), str(weights), str(out), "--batch", "2",
                     "--opset", "13"]) == 0
    assert f"Wrote {out}: opset 13" in capsys.readouterr().out
    x = rng.uniform(0, 1, (2, 1, 28, 28)).astype(np.float32)
    got = run_onnx(out, {"data": x})["prob"]
    net.blobs["data"].reshape(x.shape)
    net.reshape()
    want = net.forward(data=x)["prob"]
    assert relative_error(got, want) <= OUTPUT_TOLERANCE

    assert cli.main(["export-onnx", str(deploy), str(weights), str(out), "--output", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("owlnet export-onnx: error:") and "no blob 'nope'" in err


# -- layer types beyond BVLC Caffe's (where this tree has them) ----------------------------

FORK_TYPES = {"ReLU6", "Permute", "ShuffleChannel", "Upsample", "Interp", "Reduction", "Tile",
              "Parameter", "Embed", "Normalize", "PriorBox", "SPP"}

FORK_NET = (_input("data", 2, 6, 5, 4) + _input("words", 2, 3) + _input("image", 2, 2, 9, 7)
            + "".join([
    _layer("relu6", "ReLU6", "data"),
    _layer("permuted", "Permute", "data", "permute_param { order: 0 order: 2 order: 3 }"),
    _layer("shuffled", "ShuffleChannel", "data", "shuffle_channel_param { group: 3 }"),
    _layer("nearest", "Upsample", "data", "upsample_param { scale: 3 }"),
    _layer("zoomed", "Interp", "data", "interp_param { zoom_factor: 3 }"),
    _layer("sized", "Interp", "data", "interp_param { height: 7 width: 1 pad_beg: -1 }"),
    _layer("cropped", "Interp", "data", "interp_param { zoom_factor: 2 pad_end: -1 }"),
    _layer("cropped_both", "Interp", "data", "interp_param { shrink_factor: 2 pad_beg: -1 "
           "pad_end: -2 }"),
    _layer("sum", "Reduction", "data", "reduction_param { axis: 2 coeff: -0.5 }"),
    _layer("asum", "Reduction", "data", "reduction_param { operation: ASUM axis: 1 }"),
    _layer("sumsq", "Reduction", "data", "reduction_param { operation: SUMSQ axis: 3 }"),
    _layer("mean", "Reduction", "data", "reduction_param { operation: MEAN axis: 0 coeff: 2 }"),
    _layer("tiled", "Tile", "data", "tile_param { axis: 2 tiles: 3 }"),
    _layer("param", "Parameter", "", "parameter_param { shape { dim: 2 dim: 3 } }"),
    _layer("embedded", "Embed", "words", "embed_param { num_output: 4 input_dim: 5 }"),
    _layer("l2", "Normalize", "data", "norm_param { across_spatial: false }"),
    _layer("l2_all", "Normalize", "data", "norm_param { channel_shared: true }"),
    _layer("priors", "PriorBox", "data nearest", "prior_box_param { min_size: 4 max_size: 9 "
           "aspect_ratio: 2 flip: true clip: true variance: 0.1 variance: 0.1 variance: 0.2 "
           "variance: 0.2 }"),
    _layer("spp_max", "SPP", "image", "spp_param { pyramid_height: 3 }"),
    _layer("spp_ave", "SPP", "image", "spp_param { pyramid_height: 3 pool: AVE }"),
    _layer("spp_one", "SPP", "image", "spp_param { pyramid_height: 1 }"),
]))


@pytest.mark.skipif(not FORK_TYPES <= set(owlnet.layer_type_list()),
                    reason="this tree lacks the forks' layer types")
@pytest.mark.parametrize("opset", [MIN_OPSET, 18])
def test_forks_layer_types(tmp_path, opset):
    net, _ = build(tmp_path, FORK_NET)
    rng = np.random.default_rng(9)
    randomise(net, rng, words=rng.integers(0, 5, (2, 3)))
    check_every_blob(net, tmp_path / "forks.onnx", strict=net.blobs, opset=opset)
