"""Fused inference steps (owlnet.fusion): a convolution and the BatchNorm/Scale/Bias/ReLU after
it in place give the values of the layer-by-layer run, and are run layer by layer wherever
the intermediate values can be seen or a backward needs them."""
import numpy as np

import fakecupy
import owlnet
from owlnet import backend, fusion

CONV = 'convolution_param {{ num_output: {out} kernel_size: 3 pad: 1 bias_term: {bias} }}'


def layer(name, kind, bottom, top, body=""):
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top}" {body} }}\n'


def chain_net(force_backward=False, loss=False):
    """Chains of every kind, and one that cannot fuse (BatchNorm with batch statistics).
    Chain c has more weights than outputs (its output is scaled, the others' weights)."""
    text = ('name: "chains" layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 2 dim: 3 dim: 6 dim: 5 } } }\n')
    if force_backward:
        text = "force_backward: true\n" + text
    text += layer("a", "Convolution", "data", "a", CONV.format(out=4, bias="true"))
    text += layer("a_bn", "BatchNorm", "a", "a", "batch_norm_param { eps: 0.01 }")
    text += layer("a_scale", "Scale", "a", "a", "scale_param { bias_term: true }")
    text += layer("a_relu", "ReLU", "a", "a")
    text += layer("b", "Convolution", "a", "b", CONV.format(out=8, bias="false"))
    text += layer("b_bn", "BatchNorm", "b", "b")
    text += layer("b_scale", "Scale", "b", "b")
    text += layer("b_relu", "ReLU", "b", "b", "relu_param { negative_slope: 0.1 }")
    text += layer("c", "Convolution", "b", "c", CONV.format(out=3, bias="true"))
    text += layer("c_bn", "BatchNorm", "c", "c")
    text += layer("d", "Deconvolution", "c", "d", CONV.format(out=4, bias="false"))
    text += layer("d_relu", "ReLU", "d", "d")
    text += layer("e", "Convolution", "d", "e", CONV.format(out=4, bias="true"))
    text += layer("e_scale", "Scale", "e", "e", "scale_param { bias_term: true }")
    text += layer("e_bias", "Bias", "e", "e")
    text += layer("e_bn", "BatchNorm", "e", "e")
    text += layer("f", "Convolution", "e", "f", CONV.format(out=2, bias="false"))
    text += layer("f_bn", "BatchNorm", "f", "f", "batch_norm_param { use_global_stats: false }")
    text += layer("f_relu", "ReLU", "f", "f")
    if loss:
        text += layer("loss", "Reduction", "f", "loss", "loss_weight: 1")
    return text


CHAINS = [["a", "a_bn", "a_scale", "a_relu"], ["b", "b_bn", "b_scale", "b_relu"], ["c", "c_bn"],
          ["d", "d_relu"], ["e", "e_scale", "e_bias", "e_bn"]]


def build(phase=owlnet.TEST, force_backward=False, loss=False, seed=0):
    net = owlnet.Net(chain_net(force_backward, loss), phase)
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BatchNorm":
            blobs[0].data[...] = rng.normal(0, 0.5, blobs[0].shape) * 2.5
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].shape) * 2.5
            blobs[2].data[...] = 2.5         # the moving-average factor divides both
        else:
            for blob in blobs:
                blob.data[...] = rng.normal(0.2, 0.5, blob.shape)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    return net


def all_blobs(net, fuse, **kwargs):
    net.fuse = fuse
    net.forward(**kwargs)
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


def assert_same_blobs(got, expected, relative):
    for name, value in expected.items():
        error = np.abs(got[name] - value).max() / np.abs(value).max()
        assert error <= relative, (name, error)


def inference_steps(net):
    """The forward's fused steps but those of learning convolutions and their ReLU."""
    learning = fusion.plan_learning_convolutions(net)
    return [s for first, s in net._forward_steps.items()
            if isinstance(s, fusion.FusedStep) and first not in learning]


def names(net, step):
    return net._layer_names[step.first:step.last + 1]


def count_fused_steps(monkeypatch):
    calls = []
    run = fusion.FusedStep.forward
    monkeypatch.setattr(fusion.FusedStep, "forward", lambda step: (calls.append(step), run(step)))
    return calls


def batch_norm_scale_relu(y, net, prefix):
    """The chain ``prefix`` (BatchNorm, Scale with bias, ReLU) applied to ``y`` in NumPy."""
    mean, var, count = (b.data for b in net.params[f"{prefix}_bn"])
    gamma, beta = (b.data for b in net.params[f"{prefix}_scale"])
    eps = net.layer_dict[f"{prefix}_bn"].eps
    by_channel = (slice(None), None, None)
    y = (y - (mean / count)[by_channel]) / np.sqrt(var / count + eps)[by_channel]
    return np.maximum(y * gamma[by_channel] + beta[by_channel], 0)


def test_chains_found():
    net = build()
    assert [names(net, s) for s in inference_steps(net)] == CHAINS
    assert not inference_steps(build(force_backward=True))
    assert not inference_steps(build(owlnet.TRAIN, loss=True))
    assert not inference_steps(build(loss=True))          # a TEST net with a loss learns too
    # A TRAIN net that runs no backward: BatchNorm uses batch statistics, the rest fuses.
    train = build(owlnet.TRAIN)
    assert [names(train, s) for s in inference_steps(train)] == [
        ["d", "d_relu"], ["e", "e_scale", "e_bias"]]
    assert_same_blobs(all_blobs(train, fuse=True), all_blobs(build(owlnet.TRAIN), fuse=False),
                      1e-5)


def test_fused_forward_gives_the_layer_by_layer_blobs(monkeypatch):
    calls = count_fused_steps(monkeypatch)
    net = build()
    expected = all_blobs(net, fuse=False)
    assert not calls
    got = all_blobs(net, fuse=True)
    assert len(calls) == len(CHAINS)
    assert_same_blobs(got, expected, 1e-5)
    with backend.dtype_scope(np.float64):
        net = build()
        assert net.blobs["a"].data.dtype == np.float64
        assert_same_blobs(all_blobs(net, fuse=True), all_blobs(net, fuse=False), 1e-12)


def test_fused_chain_follows_the_formula_and_the_current_params():
    """forward(end="a") stops after the convolution (its un-normalised output, unfused);
    the whole forward then applies BatchNorm, Scale and ReLU to it, with the params' values
    at that forward."""
    with backend.dtype_scope(np.float64):
        net = build()
        # BatchNorm's mean, variance and moving-average factor, Scale's gamma and beta, the
        # convolution's bias (each edit seen by the next fused forward)
        for edit in (None, ("a_bn", 0), ("a_bn", 1), ("a_bn", 2), ("a_scale", 0), ("a_scale", 1),
                     ("a", 1)):
            if edit:
                net.params[edit[0]][edit[1]].data[...] += 0.75
            conv_output = net.forward(end="a")["a"].copy()
            net.fuse = True
            net.forward()
            expected = batch_norm_scale_relu(conv_output, net, "a")
            assert 0.2 < (expected > 0).mean() < 0.8
            np.testing.assert_allclose(net.blobs["a"].data, expected, rtol=1e-12, atol=1e-12)
            if edit:
                assert not np.allclose(expected, before)
            before = expected


def test_the_affine_is_composed_again_only_when_its_values_change(monkeypatch):
    """On the host, a step keeps its composed (a, b) while the values they come from keep
    their bytes: repeated forwards compose each chain's affine once; an edit composes the
    edited chain's again."""
    net = build()
    net.fuse = True
    composed = []
    original = fusion.FusedStep.per_channel_affine
    monkeypatch.setattr(fusion.FusedStep, "per_channel_affine",
                        lambda step: composed.append(step.first) or original(step))
    net.forward()
    first = len(composed)
    assert first > 0
    net.forward()
    net.forward()
    assert len(composed) == first
    net.params["a_bn"][1].data[...] *= 2.0
    net.forward()
    assert len(composed) == first + 1


def test_observed_chains_run_layer_by_layer(monkeypatch):
    net = build()
    calls = count_fused_steps(monkeypatch)
    net.forward(end="a_scale")                    # ends inside chain a: a runs unfused
    net.forward(start="b_bn")                      # starts inside chain b
    assert [names(net, s) for s in calls] == CHAINS[2:]
    calls.clear()
    x = np.random.default_rng(1).standard_normal(net.blobs["a"].shape)
    net.blobs["a"].data[...] = x
    net.forward(start="a_bn", end="a_relu")
    np.testing.assert_allclose(net.blobs["a"].data, batch_norm_scale_relu(x, net, "a"),
                               rtol=1e-5, atol=1e-6)
    seen = []
    net.after_forward(lambda li: seen.append((li, net.blobs["a"].data.copy())))
    net.forward()
    assert not calls and [li for li, _ in seen] == list(range(len(net.layers)))
    conv_output = seen[net._layer_names.index("a")][1]
    np.testing.assert_allclose(net.blobs["a"].data, batch_norm_scale_relu(conv_output, net, "a"),
                               rtol=1e-5, atol=1e-6)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("OWLNET_FUSE", "0")
    calls = count_fused_steps(monkeypatch)
    net = build()
    net.forward()
    assert net.fuse is False and not calls


def test_reshaped_net_still_fuses_right():
    net = build()
    net.blobs["data"].reshape((3, 3, 4, 7))
    net.reshape()
    net.blobs["data"].data[...] = np.random.default_rng(2).standard_normal((3, 3, 4, 7))
    expected = all_blobs(net, fuse=False)
    assert expected["e"].shape == (3, 4, 4, 7)
    assert_same_blobs(all_blobs(net, fuse=True), expected, 1e-5)


def test_fused_steps_follow_a_new_input_shape_between_forwards():
    """A fused step reshapes its convolution only when a shape changed: an input reshaped
    between two forwards (no net.reshape, as pycaffe scripts do) still gives the layer by layer
    blobs, at the new shape and back at the old one."""
    net = build()
    rng = np.random.default_rng(4)
    for shape in ((3, 3, 4, 7), (2, 3, 5, 5), (3, 3, 4, 7)):
        net.blobs["data"].reshape(shape)
        net.blobs["data"].data[...] = rng.standard_normal(shape)
        got = all_blobs(net, fuse=True)
        assert got["e"].shape[0] == shape[0] and got["e"].shape[2:] == shape[2:]
        assert_same_blobs(got, all_blobs(net, fuse=False), 1e-5)


def test_fused_forward_on_the_fake_gpu(monkeypatch):
    expected = all_blobs(build(), fuse=False)
    calls = count_fused_steps(monkeypatch)
    with fakecupy.fake_gpu():
        net = build()
        with backend.device_arrays():
            assert type(net.blobs["a"].data) is not np.ndarray
        got = all_blobs(net, fuse=True)
    assert len(calls) == len(CHAINS)
    assert_same_blobs({k: backend.to_host(v) for k, v in got.items()}, expected, 1e-5)

