"""Layers the Net marks as never running backward skip what only backward reads (input copies,
the max-pooling argmax), with outputs unchanged."""
import numpy as np

import owlnet

BODY = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv"
  batch_norm_param { use_global_stats: true } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
"""
DEPLOY = """layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }""" + BODY
TRAIN = """layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } shape { dim: 2 } } }""" + BODY + """
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }"""


def _net(text, phase):
    owlnet.set_random_seed(3)
    net = owlnet.Net(text, phase)
    net.params["bn"][0].data[...] = 0.5
    net.params["bn"][1].data[...] = 2.0
    net.params["bn"][2].data[...] = 1.0
    net.blobs["data"].data[...] = np.random.default_rng(4).standard_normal((2, 3, 9, 9))
    return net


def test_deploy_net_keeps_nothing_for_backward_and_computes_the_same():
    net = _net(DEPLOY, owlnet.TEST)
    assert not any(layer.runs_backward for layer in net.layers)
    lean = net.forward()["pool"].copy()
    layers = net.layer_dict
    assert layers["prelu"]._saved_input is None and layers["scale"]._saved_input is None
    assert getattr(layers["pool"], "argmax", None) is None
    for layer in net.layers:
        layer.runs_backward = True
    full = net.forward()["pool"]
    assert layers["prelu"]._saved_input is not None and layers["pool"].argmax is not None
    np.testing.assert_array_equal(lean, full)


def test_train_net_layers_run_backward():
    net = _net(TRAIN, owlnet.TRAIN)
    assert all(net.layer_dict[name].runs_backward
               for name in ("conv", "prelu", "bn", "scale", "pool", "ip", "loss"))
    net.forward_backward()
    assert np.any(net.params["conv"][0].diff != 0)
