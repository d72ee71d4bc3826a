"""GPU (CuPy) against CPU (NumPy): every layer's forward and backward, the column kernels, the
cuDNN convolution graphs and a LeNet training step agree within float32 tolerance.

Tests marked ``gpu`` need a CUDA device (conftest skips them without one). Every layer case
also runs on the fake device (tests/fakecupy.py: NumPy storage with CuPy's strictness, the
real kernel bodies through the C harness), so the GPU path of each layer is exercised on
every machine.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import column_reference
import fakecupy
from gradcheck import TEST, TRAIN, make_layer
from owlnet import backend, kernels
from owlnet.kernels import counter_random
from owlnet.kernels import cpu as cpu_kernels

gpu = pytest.mark.gpu

GAUSS = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 }'


def X(*shape):
    return ("normal", shape)


def POS(*shape):
    return ("positive", shape)


def LABEL(n, classes):
    return ("label", (n,), classes)


def BINARY(*shape):
    return ("binary", shape)


def PROB(n, classes):
    return ("prob", (n, classes))


def case(name, text, bottoms, n_tops=1, phase=TRAIN, propagate=None, backward=True):
    """One layer configuration: ``propagate`` lists which bottoms get a gradient (default: all
    float bottoms); ``backward=False`` for layers without one."""
    if propagate is None:
        propagate = [spec[0] not in ("label", "binary") for spec in bottoms]
    return pytest.param(text, bottoms, n_tops, phase, propagate, backward, id=name)


CASES = [
    case("conv_group_stride_pad_dilation",
         f'type: "Convolution" convolution_param {{ num_output: 6 kernel_h: 3 kernel_w: 2 '
         f'stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2 dilation: 2 group: 2 {GAUSS} }}',
         [X(2, 4, 9, 7)]),
    case("conv_plain", f'type: "Convolution" convolution_param {{ num_output: 5 kernel_size: 3 '
         f'pad: 1 {GAUSS} }}', [X(3, 3, 8, 6)]),
    case("conv_1x1_no_bias", 'type: "Convolution" convolution_param { num_output: 4 '
         'kernel_size: 1 bias_term: false weight_filler { type: "gaussian" } }', [X(1, 6, 5, 4)]),
    case("deconv_group_stride", f'type: "Deconvolution" convolution_param {{ num_output: 4 '
         f'kernel_size: 3 stride: 2 pad: 1 group: 2 {GAUSS} }}', [X(2, 4, 4, 5)]),
    case("pool_max_two_tops", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 '
         'stride: 2 }', [X(2, 3, 7, 6)], n_tops=2, propagate=[True]),
    case("pool_ave_pad", 'type: "Pooling" pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 '
         'stride: 2 pad: 1 }', [X(2, 2, 6, 7)]),
    case("pool_global", 'type: "Pooling" pooling_param { pool: AVE global_pooling: true }',
         [X(2, 3, 4, 5)]),
    case("lrn_across", 'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }',
         [X(2, 5, 3, 4)]),
    case("lrn_within", 'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 '
         'norm_region: WITHIN_CHANNEL }', [X(2, 2, 5, 4)]),
    case("inner_product", f'type: "InnerProduct" inner_product_param {{ num_output: 7 {GAUSS} }}',
         [X(3, 2, 3, 4)]),
    case("inner_product_transpose", f'type: "InnerProduct" inner_product_param {{ num_output: 5 '
         f'transpose: true {GAUSS} }}', [X(4, 6)]),
    case("eltwise_sum_coeff", 'type: "Eltwise" eltwise_param { operation: SUM coeff: 2 '
         'coeff: -0.5 }', [X(2, 3, 4), X(2, 3, 4)]),
    case("eltwise_prod", 'type: "Eltwise" eltwise_param { operation: PROD }',
         [X(2, 3, 4), X(2, 3, 4), X(2, 3, 4)]),
    case("eltwise_max", 'type: "Eltwise" eltwise_param { operation: MAX }',
         [X(2, 3, 4), X(2, 3, 4)]),
    case("concat", 'type: "Concat" concat_param { axis: 1 }', [X(2, 3, 4), X(2, 1, 4)]),
    case("slice", 'type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 3 }',
         [X(2, 5, 3)], n_tops=3),
    case("split", 'type: "Split"', [X(2, 3)], n_tops=2),
    case("flatten", 'type: "Flatten"', [X(2, 3, 4, 2)]),
    case("reshape", 'type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } }',
         [X(2, 3, 4)]),
    case("crop", 'type: "Crop" crop_param { axis: 2 offset: 1 offset: 2 }',
         [X(2, 3, 6, 7), X(2, 3, 3, 4)], propagate=[True, False]),
    case("softmax", 'type: "Softmax"', [X(3, 4, 2)]),
    case("argmax", 'type: "ArgMax" argmax_param { top_k: 2 }', [X(3, 6)], backward=False),
    case("relu_leaky", 'type: "ReLU" relu_param { negative_slope: 0.1 }', [X(2, 3, 4)]),
    case("prelu", 'type: "PReLU" prelu_param { filler { type: "gaussian" } }', [X(2, 3, 4)]),
    case("elu", 'type: "ELU" elu_param { alpha: 0.7 }', [X(2, 3, 4)]),
    case("sigmoid", 'type: "Sigmoid"', [X(2, 3, 4)]),
    case("tanh", 'type: "TanH"', [X(2, 3, 4)]),
    case("absval", 'type: "AbsVal"', [X(2, 3, 4)]),
    case("bnll", 'type: "BNLL"', [X(2, 3, 4)]),
    case("power", 'type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', [X(2, 3, 4)]),
    case("exp", 'type: "Exp" exp_param { base: 2 scale: 0.5 }', [X(2, 3, 4)]),
    case("log", 'type: "Log" log_param { scale: 2 shift: 0.5 }', [POS(2, 3, 4)]),
    case("threshold", 'type: "Threshold" threshold_param { threshold: 0.2 }', [X(2, 3, 4)],
         backward=False),
    case("dropout_test", 'type: "Dropout"', [X(4, 5)], phase=TEST),
    case("swish", 'type: "Swish" swish_param { beta: 1.5 }', [X(2, 3, 4)]),
    case("clip", 'type: "Clip" clip_param { min: -0.5 max: 0.7 }', [X(2, 3, 4)]),
    case("batchnorm", 'type: "BatchNorm"', [X(4, 3, 2, 3)]),
    case("scale_bias", 'type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } '
         'bias_filler { type: "gaussian" } }', [X(2, 3, 4, 2)]),
    case("scale_two_bottoms", 'type: "Scale" scale_param { axis: 1 }', [X(2, 3, 4), X(3, 4)]),
    case("bias", 'type: "Bias" bias_param { filler { type: "gaussian" } }', [X(2, 3, 4)]),
    case("mvn", 'type: "MVN" mvn_param { across_channels: true }', [X(2, 3, 4, 2)]),
    case("softmax_loss", 'type: "SoftmaxWithLoss"', [X(5, 4), LABEL(5, 4)]),
    case("softmax_loss_ignore", 'type: "SoftmaxWithLoss" loss_param { ignore_label: 1 '
         'normalization: VALID }', [X(6, 3), LABEL(6, 3)]),
    case("accuracy", 'type: "Accuracy" accuracy_param { top_k: 2 }', [X(6, 4), LABEL(6, 4)],
         backward=False),
    case("euclidean", 'type: "EuclideanLoss"', [X(3, 4), X(3, 4)]),
    case("sigmoid_xent", 'type: "SigmoidCrossEntropyLoss"', [X(3, 4), BINARY(3, 4)]),
    case("hinge_l2", 'type: "HingeLoss" hinge_loss_param { norm: L2 }', [X(5, 3), LABEL(5, 3)]),
    case("contrastive", 'type: "ContrastiveLoss" contrastive_loss_param { margin: 1.5 }',
         [X(4, 3), X(4, 3), BINARY(4)]),
    case("multinomial", 'type: "MultinomialLogisticLoss"', [PROB(4, 3), LABEL(4, 3)]),
]


def _bottom_arrays(specs, rng):
    arrays = []
    for spec in specs:
        kind, shape = spec[0], spec[1]
        if kind == "normal":
            a = rng.standard_normal(shape)
        elif kind == "positive":
            a = rng.uniform(0.5, 2.0, shape)
        elif kind == "label":
            a = rng.integers(0, spec[2], shape)
        elif kind == "binary":
            a = rng.integers(0, 2, shape)
        else:
            a = rng.uniform(0.1, 1.0, shape)
            a /= a.sum(axis=1, keepdims=True)
        arrays.append(a.astype(np.float32))
    return arrays


def _run_layer(device, text, arrays, n_tops, phase, propagate, backward, top_diffs):
    """Forward (and backward with the given top diffs) on ``device``; host copies of the
    tops, the propagated bottom diffs and the parameter diffs."""
    if device == "gpu":
        backend.set_mode_gpu()
    try:
        with backend.device_arrays():      # where the net runs layers: device arrays
            arrays = [backend.to_device(a) for a in arrays]
            layer, bottom, top = make_layer(f'name: "layer" {text}', arrays, n_tops, phase,
                                            dtype=np.float32)
            backend.set_random_seed(11)
            layer.forward(bottom, top)
            outputs = [backend.to_host(t.data).copy() for t in top]
            grads = []
            if backward:
                diffs = top_diffs([t.shape for t in top])
                for t, d in zip(top, diffs):
                    t.diff[...] = backend.to_device(d)
                for p in layer.blobs:
                    p.diff[...] = 0
                layer.backward(top, propagate, bottom)
                grads = [backend.to_host(b.diff).copy() for b, p in zip(bottom, propagate) if p]
                grads += [backend.to_host(p.diff).copy() for p in layer.blobs]
        return outputs, grads
    finally:
        backend.set_mode_cpu()


def _assert_close(gpu, cpu, what):
    scale = max(1.0, float(np.abs(cpu).max(initial=0.0)))
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize("where", ["fake", pytest.param("device", marks=gpu)])
def test_dropout_on_the_gpu_draws_the_counted_mask(where):
    """At TRAIN on the GPU, Dropout's mask m is counter_random's keyed draw (the random seed,
    the device's counter, the layer's name): y = x m / (1 - r), dx = dy m / (1 - r). In an
    executor's iteration the counter is the iteration; outside, each forward draws anew."""
    ratio = 0.4
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 5, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    scale = np.float32(1.0 / (1.0 - ratio))
    with fakecupy.fake_gpu() if where == "fake" else contextlib.nullcontext():
        backend.set_mode_gpu()
        try:
            with backend.device_arrays():
                layer, bottom, top = make_layer(
                    'name: "drop" type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
                    [backend.to_device(x)], 1, TRAIN, dtype=np.float32, seed=11)
                with kernels.get(backend.xp()).iteration_draws(7):
                    layer.forward(bottom, top)
                kept = counter_random.dropout_keep(counter_random.draw_key(11, 7, "drop"),
                                                   x.shape, ratio)
                assert 0.4 < kept.mean() < 0.8
                np.testing.assert_allclose(backend.to_host(top[0].data),
                                           np.where(kept, x * scale, 0), rtol=1e-6)
                top[0].diff[...] = backend.to_device(dy)
                layer.backward(top, [True], bottom)
                np.testing.assert_allclose(backend.to_host(bottom[0].diff),
                                           np.where(kept, dy * scale, 0), rtol=1e-6)
                masks = []
                for _ in range(2):
                    layer.forward(bottom, top)
                    masks.append(backend.to_host(top[0].data) != 0)
                assert not np.array_equal(masks[0], masks[1])
        finally:
            backend.set_mode_cpu()


def _new_convolution_contract():
    """The layers pass ``group`` to the kernels' convolution (issue 12's contract)."""
    import inspect
    return "group" in inspect.signature(cpu_kernels.conv_forward).parameters


@pytest.mark.parametrize("where", ["fake", pytest.param("device", marks=gpu)])
@pytest.mark.parametrize("text, specs, n_tops, phase, propagate, backward", CASES)
def test_layer_matches_cpu(where, text, specs, n_tops, phase, propagate, backward):
    if where == "fake" and "Convolution" in text and not _new_convolution_contract():
        pytest.skip("the layers still call the old convolution contract (issue 12)")
    arrays = _bottom_arrays(specs, np.random.default_rng(3))

    def top_diffs(shapes):
        rng = np.random.default_rng(4)
        return [rng.standard_normal(s).astype(np.float32) for s in shapes]

    cpu = _run_layer("cpu", text, arrays, n_tops, phase, propagate, backward, top_diffs)
    if where == "fake":
        with fakecupy.fake_gpu():
            gpu = _run_layer("gpu", text, arrays, n_tops, phase, propagate, backward, top_diffs)
    else:
        gpu = _run_layer("gpu", text, arrays, n_tops, phase, propagate, backward, top_diffs)
    for k, (g, c) in enumerate(zip(gpu[0], cpu[0])):
        _assert_close(g, c, f"top {k}")
    assert len(gpu[1]) == len(cpu[1])
    for k, (g, c) in enumerate(zip(gpu[1], cpu[1])):
        _assert_close(g, c, f"gradient {k} (propagated bottoms, then parameters)")


@gpu
@pytest.mark.parametrize("geometry", [
    ((3, 2), (1, 2), (2, 1), (2, 1)),
    ((3, 3), (0, 0), (1, 1), (1, 1)),
    ((1, 4), (0, 1), (1, 3), (1, 1)),
], ids=["stride_pad_dilation", "plain", "wide"])
def test_column_kernels_match_cpu(geometry):
    from owlnet.kernels import gpu as gpu_kernels
    cupy = backend.import_cupy()
    kernel, pad, stride, dilation = geometry
    shape = (2, 3, 9, 8)
    out_size = tuple((shape[2 + a] + 2 * pad[a] - dilation[a] * (kernel[a] - 1) - 1)
                     // stride[a] + 1 for a in range(2))
    rng = np.random.default_rng(0)
    images = rng.standard_normal(shape).astype(np.float32)
    cols = column_reference.im2col(images, kernel, pad, stride, dilation, out_size)
    got = gpu_kernels.im2col(cupy.asarray(images), kernel, pad, stride, dilation, out_size)
    np.testing.assert_array_equal(cupy.asnumpy(got), cols)
    back = rng.standard_normal(cols.shape).astype(np.float32)
    want = column_reference.col2im(back, shape, kernel, pad, stride, dilation, out_size)
    got = gpu_kernels.col2im(cupy.asarray(back), shape, kernel, pad, stride, dilation, out_size)
    np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("math_mode, rtol", [("fp32", 1e-5), ("tf32", 5e-3)])
def test_cudnn_convolution_matches_float64(math_mode, rtol):
    """The three cuDNN graphs against a float64 im2col reference (grouped, strided, dilated)."""
    pytest.importorskip("cudnn")
    from owlnet.kernels import gpu as gpu_kernels
    cupy = backend.import_cupy()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 11, 9))
    w = rng.standard_normal((8, 3, 3, 2))      # group 2
    pad, stride, dilation = (1, 0), (2, 1), (1, 2)
    kernel = w.shape[2:]
    out_size = tuple((x.shape[2 + a] + 2 * pad[a] - dilation[a] * (kernel[a] - 1) - 1)
                     // stride[a] + 1 for a in range(2))
    cols = column_reference.im2col(x, kernel, pad, stride, dilation, out_size).reshape(2, 3 * 6, -1)
    y = np.matmul(w.reshape(2, 4, -1), cols).reshape(8, 4, *out_size).transpose(1, 0, 2, 3)
    dy = rng.standard_normal(y.shape)
    dy_groups = dy.transpose(1, 0, 2, 3).reshape(2, 4, -1)
    dw = np.matmul(dy_groups, cols.transpose(0, 2, 1)).reshape(w.shape)
    dx = column_reference.col2im(np.matmul(w.reshape(2, 4, -1).transpose(0, 2, 1), dy_groups)
                            .reshape(-1, cols.shape[-1]), x.shape, kernel, pad, stride, dilation,
                            out_size)

    old = backend.math_mode()
    backend.set_math_mode(math_mode)
    try:
        f32 = [cupy.asarray(a, dtype=cupy.float32) for a in (x, w, dy)]
        y_gpu, dx_gpu = cupy.empty(y.shape, cupy.float32), cupy.empty(x.shape, cupy.float32)
        dw_gpu = cupy.empty(w.shape, cupy.float32)
        assert gpu_kernels.plan("fprop", x.shape, w.shape, y.shape, pad, stride, dilation, 2,
                                "default", "float32").algorithm == "cudnn"
        gpu_kernels.conv_forward(f32[0], f32[1], y_gpu, pad, stride, dilation, 2)
        gpu_kernels.conv_backward_data(f32[2], f32[1], dx_gpu, pad, stride, dilation, 2)
        gpu_kernels.conv_backward_filter(f32[0], f32[2], dw_gpu, pad, stride, dilation, 2)
    finally:
        backend.set_math_mode(old)
    for got, want in ((y_gpu, y), (dx_gpu, dx), (dw_gpu, dw)):
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=rtol,
                                   atol=rtol * np.abs(want).max())


@gpu
def test_float64_takes_im2col():
    from owlnet.kernels import gpu as gpu_kernels
    found = gpu_kernels.plan("fprop", (1, 2, 4, 4), (3, 2, 3, 3), (1, 3, 2, 2), (0, 0), (1, 1),
                             (1, 1), 1, "default", "float64")
    assert found.algorithm == "im2col"


LENET_TRAIN = """
name: "LeNetStep"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 8 dim: 1 dim: 28 dim: 28 } shape { dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _lenet_steps(device, images, labels, steps=3):
    """Loss after each SGD step and the final weights, on ``device``."""
    from google.protobuf import text_format

    from owlnet.proto import caffe_pb2
    from owlnet.solver import get_solver
    if device == "gpu":
        backend.set_mode_gpu()
    try:
        backend.set_random_seed(0)
        param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4,
                                          lr_policy="fixed", max_iter=steps, display=0,
                                          snapshot_after_train=False, type="SGD")
        text_format.Parse(LENET_TRAIN, param.net_param)
        solver = get_solver(param)
        net = solver.net
        net.blobs["data"].data[...] = backend.to_device(images)
        net.blobs["label"].data[...] = backend.to_device(labels)
        losses = []
        for _ in range(steps):
            solver.step(1)
            losses.append(float(net.blobs["loss"].data))
        weights = {name: [backend.to_host(b.data).copy() for b in blobs]
                   for name, blobs in net.params.items()}
        return losses, weights
    finally:
        backend.set_mode_cpu()


@gpu
def test_lenet_train_steps_match_cpu():
    rng = np.random.default_rng(5)
    images = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.float32)
    cpu_losses, cpu_weights = _lenet_steps("cpu", images, labels)
    gpu_losses, gpu_weights = _lenet_steps("gpu", images, labels)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4)
    for name, blobs in cpu_weights.items():
        for k, want in enumerate(blobs):
            _assert_close(gpu_weights[name][k], want, f"{name} param {k}")


@gpu
def test_pycaffe_forward_returns_numpy_and_sees_host_writes(tmp_path):
    """Defect 4 on the device: host NumPy in and out, whatever the mode."""
    from owlnet.net import Net
    path = tmp_path / "tiny.prototxt"
    path.write_text('name: "tiny" layer { name: "data" type: "Input" top: "data" input_param '
                    '{ shape { dim: 4 dim: 5 } } } layer { name: "ip" type: "InnerProduct" '
                    'bottom: "data" top: "ip" inner_product_param { num_output: 3 '
                    'weight_filler { type: "gaussian" } } }')
    backend.set_mode_gpu()
    try:
        net = Net(str(path), phase=1)
        w = net.params["ip"][0].data
        for seed in (0, 1):
            x = np.random.default_rng(seed).standard_normal((4, 5)).astype(np.float32)
            net.blobs["data"].data[...] = x
            out = net.forward()["ip"]
            assert type(out) is np.ndarray
            np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-5)
    finally:
        backend.set_mode_cpu()


@gpu
@pytest.mark.parametrize("math_mode", ["fp32", "tf32"])
def test_math_mode_reaches_cupy_matmul(math_mode):
    """Defect 5: strict fp32 products are exact to float32 rounding; tf32 ones are not."""
    rng = np.random.default_rng(6)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    b = rng.standard_normal((512, 512)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    backend.set_math_mode(math_mode)
    backend.set_mode_gpu()
    try:
        cupy = backend.import_cupy()
        got = cupy.asnumpy(cupy.asarray(a) @ cupy.asarray(b))
    finally:
        backend.set_mode_cpu()
        backend.set_math_mode("fp32")
    error = np.abs(got - want).max() / np.abs(want).max()
    assert (error < 1e-5) if math_mode == "fp32" else (error > 3e-5), error
