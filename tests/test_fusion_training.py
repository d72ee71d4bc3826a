"""Fused training steps (owlnet.fusion.NormalizationStep): BatchNorm with batch statistics and
the Scale and ReLU after it in place, run as one pass each way, give the layer-by-layer
values, gradients and statistics; either direction may run fused and the other layer by
layer; the kernels follow the formulas in float64."""
import numpy as np
import pytest

import fakecupy
import owlnet
from owlnet import backend, fusion
from owlnet.kernels import cpu, gpu

CONV = 'convolution_param { num_output: 4 kernel_size: 3 pad: 1 }'


def layer(name, kind, bottoms, top, body=""):
    bottoms = "".join(f'bottom: "{b}" ' for b in bottoms.split())
    return f'layer {{ name: "{name}" type: "{kind}" {bottoms}top: "{top}" {body} }}\n'


def training_net():
    """Chains a (BatchNorm, Scale with bias, ReLU, in place), b (BatchNorm, Scale without
    bias), c (BatchNorm, ReLU), and BatchNorms that do not fuse: d (its ReLU has a slope), e
    (global statistics), f (on the input, which needs no gradient), g (out of place: the top's
    diff would not end as the Scale's), then a loss."""
    text = ('name: "train" layer { name: "data" type: "Input" top: "data" top: "target" '
            'input_param { shape { dim: 3 dim: 2 dim: 5 dim: 4 } '
            'shape { dim: 3 dim: 4 dim: 5 dim: 4 } } }\n')
    bias, slope = "scale_param { bias_term: true }", "relu_param { negative_slope: 0.1 }"
    rows = [("f_bn", "BatchNorm", "data", "f", ""), ("f_scale", "Scale", "f", "f", bias),
            ("a", "Convolution", "f", "a", CONV),
            ("a_bn", "BatchNorm", "a", "a", "batch_norm_param { eps: 0.01 }"),
            ("a_scale", "Scale", "a", "a", bias), ("a_relu", "ReLU", "a", "a", ""),
            ("b", "Convolution", "a", "b", CONV), ("b_bn", "BatchNorm", "b", "b", ""),
            ("b_scale", "Scale", "b", "b", ""), ("g", "Convolution", "b", "g", CONV),
            ("g_bn", "BatchNorm", "g", "g_norm", ""), ("g_scale", "Scale", "g_norm", "g_norm", ""),
            ("c", "Convolution", "g_norm", "c", CONV), ("c_bn", "BatchNorm", "c", "c", ""),
            ("c_relu", "ReLU", "c", "c", ""), ("d", "Convolution", "c", "d", CONV),
            ("d_bn", "BatchNorm", "d", "d", ""), ("d_relu", "ReLU", "d", "d", slope),
            ("e", "Convolution", "d", "e", CONV),
            ("e_bn", "BatchNorm", "e", "e", "batch_norm_param { use_global_stats: true }"),
            ("e_scale", "Scale", "e", "e", bias), ("loss", "EuclideanLoss", "e target", "loss", "")]
    return text + "".join(layer(*row) for row in rows)


STEPS = [["a_bn", "a_scale", "a_relu"], ["b_bn", "b_scale"], ["c_bn", "c_relu"]]


def build(seed=0):
    net = owlnet.Net(training_net(), owlnet.TRAIN)
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BatchNorm":
            blobs[0].data[...] = rng.normal(0, 0.5, blobs[0].shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].shape)
            blobs[2].data[...] = 1
        else:
            for blob in blobs:
                blob.data[...] = rng.normal(0.3, 0.5, blob.shape)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["target"].data[...] = rng.standard_normal(net.blobs["target"].shape)
    return net


def step(net, fuse):
    """One forward and backward; everything they leave: loss, blobs, diffs, parameters."""
    net.fuse = fuse
    net.clear_param_diffs()
    last = len(net.layers) - 1
    loss = float(net.forward_range(0, last))
    net.backward_range(last, 0)
    found = {"loss": np.array(loss)}
    for name, blob in net.blobs.items():
        found[f"{name}.data"], found[f"{name}.diff"] = blob.data.copy(), blob.diff.copy()
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            found[f"{name}[{i}].data"] = blob.data.copy()
            found[f"{name}[{i}].diff"] = blob.diff.copy()
    return found


def assert_close(got, expected, tolerance):
    scale = max(np.abs(v).max() for v in expected.values() if v.size)
    for name, value in expected.items():
        np.testing.assert_allclose(backend.to_host(got[name]), value, rtol=tolerance,
                                   atol=tolerance * scale, err_msg=name)


def names(net, step):
    return net._layer_names[step.first:step.last + 1]


def test_steps_found():
    net = build()
    assert [names(net, s) for s in net._backward_steps.values()] == STEPS
    assert all(isinstance(s, fusion.NormalizationStep) for s in net._backward_steps.values())
    # Nothing learns in a TEST net: BatchNorm uses global statistics there, no step.
    assert not owlnet.Net(training_net(), owlnet.TEST)._backward_steps


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_fused_step_gives_the_layer_by_layer_values(dtype, tolerance):
    with backend.dtype_scope(dtype):
        expected = step(build(), fuse=False)
        got = step(build(), fuse=True)
    assert got["a.data"].dtype == dtype
    assert (got["a.data"] == 0).mean() > 0.2 and (got["c.data"] == 0).mean() > 0.2
    assert np.abs(expected["a_scale[0].diff"]).min() > 0
    assert_close(got, expected, tolerance)


def test_each_direction_fused_alone():
    """Forward fused, backward layer by layer (a backward callback observes it), and the
    other way round; a range ending inside a step runs it layer by layer."""
    with backend.dtype_scope(np.float64):
        expected = step(build(), fuse=False)
        seen = []
        net = build()
        net.after_backward(seen.append)
        assert_close(step(net, fuse=True), expected, 1e-12)
        assert sorted(seen) == list(range(len(net.layers)))
        net = build()
        net.after_forward(seen.append)
        assert_close(step(net, fuse=True), expected, 1e-12)

        calls = []
        net = build()
        for kind in ("forward", "backward"):
            run = getattr(net._backward_steps[net._layer_names.index("a_bn")], kind)
            setattr(net._backward_steps[net._layer_names.index("a_bn")], kind,
                    lambda run=run, kind=kind: (calls.append(kind), run()))
        scale = net._layer_names.index("a_scale")
        net.forward_range(0, scale)
        net.forward_range(scale + 1, len(net.layers) - 1)
        net.backward_range(len(net.layers) - 1, scale)
        net.backward_range(scale - 1, 0)
        assert not calls
        step(net, fuse=True)
        assert calls == ["forward", "backward"]


def test_scale_keeps_its_own_copy_after_a_fused_forward():
    """The Scale reads BatchNorm's normalized input after a fused forward, and its own copy
    after a forward layer by layer, which writes nothing into BatchNorm's."""
    with backend.dtype_scope(np.float64):
        nets = [build(), build()]
        step(nets[0], fuse=True)
        step(nets[1], fuse=False)
        a_bn = nets[0]._layer_names.index("a_bn")
        for net in nets:
            def doubled(li, net=net):
                if li == a_bn:
                    net.blobs["a"].data[...] *= 2
            net.after_forward(doubled)
        first, second = step(nets[0], fuse=True), step(nets[1], fuse=True)
    assert_close(first, second, 1e-12)


def test_gradients_against_finite_differences():
    with backend.dtype_scope(np.float64):
        net = build(seed=3)
        net.fuse = True
        last = len(net.layers) - 1

        def loss():
            return float(net.forward_range(0, last))

        net.clear_param_diffs()
        loss()
        net.backward_range(last, 0)
        checked = [net.params["a_scale"][0], net.params["a_scale"][1], net.params["b_scale"][0],
                   net.params["a"][0], net.params["c"][1]]
        analytic = [blob.diff.copy() for blob in checked]
        for blob, want in zip(checked, analytic):
            flat = blob.data.reshape(-1)
            for i in range(flat.size):
                keep = flat[i]
                flat[i] = keep + 1e-6
                up = loss()
                flat[i] = keep - 1e-6
                down = loss()
                flat[i] = keep
                assert abs((up - down) / 2e-6 - want.reshape(-1)[i]) <= 1e-6 * max(
                    1.0, abs(want.reshape(-1)[i])), (blob, i)


@pytest.mark.parametrize("kernels", ["cpu", "gpu"])
@pytest.mark.parametrize("shape", [(2, 3, 13), (4, 5, 64), (3, 2, 1)])
@pytest.mark.parametrize("with_scale, with_bias, relu",
                         [(True, True, True), (True, False, False), (False, False, True)])
def test_kernels_follow_the_formulas(kernels, shape, with_scale, with_bias, relu):
    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape) * 2 + 0.5
    dy = rng.standard_normal(shape)
    scale = rng.normal(1, 0.5, shape[1]) if with_scale else None
    bias = rng.normal(0, 0.5, shape[1]) if with_bias else None
    eps = 1e-3
    # The layers composed, in float64 NumPy.
    mean = x.mean(axis=(0, 2))[:, None]
    inv_std = 1 / np.sqrt(((x - mean) ** 2).mean(axis=(0, 2))[:, None] + eps)
    xhat = (x - mean) * inv_std
    y = xhat * (1 if scale is None else scale[:, None]) + (0 if bias is None else bias[:, None])
    y = np.maximum(y, 0) if relu else y
    g = dy * (y > 0) if relu else dy
    dxhat = g * (1 if scale is None else scale[:, None])
    dx = (dxhat - dxhat.mean(axis=(0, 2))[:, None]
          - xhat * (dxhat * xhat).mean(axis=(0, 2))[:, None]) * inv_std

    def run(module, to_device, to_host):
        arrays = [None if a is None else to_device(a) for a in (x, dy, scale, bias)]
        out, kept = to_device(np.full(shape, np.nan)), to_device(np.full(shape, np.nan))
        stats = module.batch_norm_forward(arrays[0], out, kept, eps, arrays[2], arrays[3], relu)
        grad = to_device(np.full(shape, np.nan))
        sums = module.batch_norm_backward(arrays[1], kept, stats[2], grad, arrays[2],
                                          out if relu else None)
        return [to_host(a) for a in (out, kept, stats[2], grad, *sums)]

    if kernels == "cpu":
        got = run(cpu, np.array, np.asarray)
    else:
        with fakecupy.fake_gpu(), backend.device_arrays():
            got = run(gpu, backend.to_device, backend.to_host)
    for value, want in zip(got, (y, xhat, inv_std[:, 0], dx, (g * xhat).sum(axis=(0, 2)),
                                 g.sum(axis=(0, 2)))):
        np.testing.assert_allclose(value, want, rtol=1e-11, atol=1e-11)
    if kernels == "cpu":         # in place: y over x, dx over dy
        in_place, grads = x.copy(), dy.copy()
        stats = cpu.batch_norm_forward(in_place, in_place, None, eps, scale, bias, relu)
        cpu.batch_norm_backward(grads, got[1], stats[2], grads, scale, in_place if relu else None)
        np.testing.assert_array_equal(in_place, got[0])
        np.testing.assert_array_equal(grads, got[3])


def test_fused_training_on_the_fake_gpu():
    with backend.dtype_scope(np.float64):
        expected = step(build(), fuse=False)
        with fakecupy.fake_gpu():
            net = build()
            with backend.device_arrays():
                assert type(net.blobs["a"].data) is not np.ndarray
            got = step(net, fuse=True)
    assert_close(got, expected, 1e-12)


# -- learning convolutions with the ReLU after them (plan_learning_convolutions) --------------
def convolution_relu_net():
    """p (Convolution, ReLU in place) and q (Deconvolution, ReLU in place) fuse; r (its ReLU
    out of place), s (its ReLU has a slope) and the input's own ReLU do not."""
    text = ('name: "train" layer { name: "data" type: "Input" top: "data" top: "target" '
            'input_param { shape { dim: 3 dim: 2 dim: 6 dim: 5 } '
            'shape { dim: 3 dim: 4 dim: 6 dim: 5 } } }\n')
    rows = [("data_relu", "ReLU", "data", "data", ""),
            ("p", "Convolution", "data", "p", CONV), ("p_relu", "ReLU", "p", "p", ""),
            ("q", "Deconvolution", "p", "q", CONV), ("q_relu", "ReLU", "q", "q", ""),
            ("r", "Convolution", "q", "r", CONV), ("r_relu", "ReLU", "r", "r_out", ""),
            ("s", "Convolution", "r_out", "s", CONV),
            ("s_relu", "ReLU", "s", "s", "relu_param { negative_slope: 0.1 }"),
            ("loss", "EuclideanLoss", "s target", "loss", "")]
    return text + "".join(layer(*row) for row in rows)


def test_learning_convolution_and_relu_forward_as_one_step():
    net = owlnet.Net(convolution_relu_net(), owlnet.TRAIN)
    learning = fusion.plan_learning_convolutions(net)
    assert [names(net, s) for s in learning.values()] == [["p", "p_relu"], ["q", "q_relu"]]
    assert all(first in net._forward_steps for first in learning)
    assert not set(learning) & set(net._backward_steps)      # backward: layer by layer


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_learning_convolution_step_gives_the_layer_by_layer_bits(dtype):
    def built():
        net = owlnet.Net(convolution_relu_net(), owlnet.TRAIN)
        rng = np.random.default_rng(3)
        for blobs in net.params.values():
            for blob in blobs:
                blob.data[...] = rng.normal(0, 0.5, blob.shape)
        for name in ("data", "target"):
            net.blobs[name].data[...] = rng.standard_normal(net.blobs[name].shape)
        return net

    with backend.dtype_scope(dtype):
        expected, got = step(built(), fuse=False), step(built(), fuse=True)
    assert got["p.data"].dtype == dtype
    assert 0.2 < (got["p.data"] == 0).mean() < 0.8 and (got["q.data"] == 0).mean() > 0.2
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
