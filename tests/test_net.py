"""Net building on the real Caffe files in ../shared/caffe-zoo, and the Net API."""
from pathlib import Path

import numpy as np
import pytest

import netutil
import owlnet
from owlnet import config
from owlnet.proto import caffe_pb2

# (channels, height, width) of each net's images before any crop.
IMAGE_SHAPES = {"mnist": (1, 28, 28), "siamese": (2, 28, 28), "cifar10": (3, 32, 32)}


def swap_data_layers(path: Path, batch: int):
    """The net of ``path`` with its data layers replaced by Input layers of the right shapes."""
    return netutil.swap_data_layers(path, batch, IMAGE_SHAPES.get(path.parent.name, (3, 256, 256)))


def zoo_nets(zoo):
    return sorted(p for p in zoo.rglob("*.prototxt") if "solver" not in p.name)


def fill_inputs(net, rng, classes=10):
    for name in net.inputs:
        blob = net.blobs[name]
        if blob.num_axes == 1:
            blob.data[...] = rng.integers(0, 2 if "sim" in name else classes, blob.shape)
        else:
            blob.data[...] = rng.standard_normal(blob.shape)


@pytest.mark.parametrize("phase", [owlnet.TRAIN, owlnet.TEST])
def test_every_zoo_net_builds_and_runs(zoo, phase):
    rng = np.random.default_rng(0)
    built = 0
    for path in zoo_nets(zoo):
        stages = ("test-on-test",) if "autoencoder" in path.name else ()
        param = swap_data_layers(path, batch=1)
        if "googlenet" in str(path) or "alexnet" in str(path) or "caffenet" in str(path):
            if phase == owlnet.TRAIN and "deploy" in path.name:
                continue   # deploy nets are the same in both phases; test them once
        net = owlnet.Net(param, phase, stages=stages)
        fill_inputs(net, rng, classes=1000 if path.parent.parent.name == "models" else 10)
        out = net.forward()
        assert out, path
        for value in out.values():
            assert np.all(np.isfinite(value)), path
        net.backward()
        built += 1
    assert built >= 15


def _shapes(net):
    return {name: blob.shape for name, blob in net.blobs.items()}


def test_alexnet_shapes(zoo):
    net = owlnet.Net(swap_data_layers(zoo / "models/bvlc_alexnet/train_val.prototxt", 2),
                     owlnet.TEST)
    s = _shapes(net)
    assert s["data"] == (2, 3, 227, 227)
    assert s["conv1"] == (2, 96, 55, 55)
    assert s["pool1"] == (2, 96, 27, 27)
    assert s["conv2"] == (2, 256, 27, 27)
    assert s["pool2"] == (2, 256, 13, 13)
    assert s["conv5"] == (2, 256, 13, 13)
    assert s["pool5"] == (2, 256, 6, 6)
    assert s["fc6"] == (2, 4096)
    assert s["fc8"] == (2, 1000)
    assert net.params["conv2"][0].shape == (256, 48, 5, 5)      # group 2
    assert net.outputs == ["accuracy", "loss"]


def test_caffenet_and_lenet_shapes(zoo):
    caffenet = owlnet.Net(str(zoo / "models/bvlc_reference_caffenet/deploy.prototxt"),
                          owlnet.TEST)
    s = _shapes(caffenet)
    assert s["pool5"] == (10, 256, 6, 6) and s["prob"] == (10, 1000)
    lenet = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    s = _shapes(lenet)
    assert s["conv1"] == (64, 20, 24, 24) and s["pool1"] == (64, 20, 12, 12)
    assert s["conv2"] == (64, 50, 8, 8) and s["pool2"] == (64, 50, 4, 4)
    assert s["ip1"] == (64, 500) and s["prob"] == (64, 10)


def test_googlenet_three_heads(zoo):
    net = owlnet.Net(swap_data_layers(zoo / "models/bvlc_googlenet/train_val.prototxt", 1),
                     owlnet.TRAIN)
    s = _shapes(net)
    assert s["inception_3a/output"] == (1, 256, 28, 28)
    assert s["inception_4a/output"] == (1, 512, 14, 14)
    assert s["inception_5b/output"] == (1, 1024, 7, 7)
    assert s["loss1/classifier"] == (1, 1000)
    assert s["loss2/classifier"] == (1, 1000)
    assert s["loss3/classifier"] == (1, 1000)
    weights = net.output_loss_weights
    assert weights["loss1/loss1"] == pytest.approx(0.3)
    assert weights["loss2/loss2"] == pytest.approx(0.3)
    assert weights["loss3/loss3"] == pytest.approx(1.0)


def test_cifar10_shapes(zoo):
    quick = owlnet.Net(str(zoo / "examples/cifar10/cifar10_quick.prototxt"), owlnet.TEST)
    assert quick.blobs["pool3"].shape == (1, 64, 4, 4)
    assert quick.blobs["ip2"].shape == (1, 10)
    full = owlnet.Net(str(zoo / "examples/cifar10/cifar10_full.prototxt"), owlnet.TEST)
    assert full.blobs["pool3"].shape == (1, 64, 4, 4)
    assert full.blobs["ip1"].shape == (1, 10)


def test_phase_and_stage_filtering(zoo):
    path = zoo / "examples/mnist/mnist_autoencoder.prototxt"
    param = swap_data_layers(path, 2)
    net = owlnet.Net(param, owlnet.TEST, stages=("test-on-train",))
    assert "data" in net.blobs
    with pytest.raises(owlnet.ConfigError, match="bottom blob 'data'"):
        owlnet.Net(param, owlnet.TEST)      # no stage: no data layer is included


RULES = [
    # (rule prototxt, state prototxt, met?)
    ("phase: TRAIN", "phase: TRAIN", True),
    ("phase: TRAIN", "phase: TEST", False),
    ("min_level: 2", "level: 1", False),
    ("min_level: 2", "level: 2", True),
    ("max_level: 2", "level: 3", False),
    ("stage: 'a' stage: 'b'", "stage: 'a'", False),
    ("stage: 'a' stage: 'b'", "stage: 'b' stage: 'a'", True),
    ("not_stage: 'a'", "stage: 'a'", False),
    ("not_stage: 'a'", "stage: 'c'", True),
]


@pytest.mark.parametrize("rule,state,met", RULES)
def test_state_meets_rule(rule, state, met):
    from google.protobuf import text_format
    r = text_format.Parse(rule, caffe_pb2.NetStateRule())
    s = text_format.Parse(state, caffe_pb2.NetState())
    assert config.state_meets_rule(s, r) is met


LENET_CURRENT = """
name: "LeNet"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 3 dim: 1 dim: 28 dim: 28 } shape { dim: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 4 kernel_size: 5 stride: 1
          weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""

LENET_V1 = """
name: "LeNet"
input: "data"
input_dim: 3 input_dim: 1 input_dim: 28 input_dim: 28
input: "label"
input_dim: 3 input_dim: 1 input_dim: 1 input_dim: 1
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
         blobs_lr: 1 blobs_lr: 2
         convolution_param { num_output: 4 kernel_size: 5 stride: 1
           weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
         pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool1" top: "ip1"
         blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
         inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip1" bottom: "label" top: "loss" }
"""


def test_v1_net_builds_the_same_net():
    owlnet.set_random_seed(5)
    new = owlnet.Net(LENET_CURRENT, owlnet.TRAIN)
    owlnet.set_random_seed(5)
    old = owlnet.Net(LENET_V1, owlnet.TRAIN)
    assert [l.type for l in old.layers] == [l.type for l in new.layers]
    assert old._layer_names[1:] == new._layer_names[1:]
    assert old.params_lr == new.params_lr == [1, 2, 1, 2]
    assert old.params_weight_decay == new.params_weight_decay == [1, 1, 1, 0]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1, 28, 28))
    labels = np.array([1, 4, 9])
    a = new.forward(data=x, label=labels)["loss"]
    b = old.forward(data=x, label=labels.reshape(3, 1, 1, 1))["loss"]
    assert float(a) == float(b)
    for name in new.params:
        for p, q in zip(new.params[name], old.params[name]):
            np.testing.assert_array_equal(p.data, q.data)


def test_v1_data_layer_transform_fields_move_to_transform_param():
    param, _ = config.read_net("""
layers { name: "d" type: DATA top: "data" top: "label"
         data_param { source: "x" batch_size: 4 scale: 0.5 crop_size: 3 mirror: true
                      mean_file: "m.binaryproto" } }""")
    layer = param.layer[0]
    assert layer.type == "Data"
    assert layer.transform_param.scale == 0.5
    assert layer.transform_param.crop_size == 3
    assert layer.transform_param.mirror
    assert layer.transform_param.mean_file == "m.binaryproto"
    assert not layer.data_param.HasField("scale")


SPLIT_NET = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "b" type: "InnerProduct" bottom: "x" top: "b"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }
layer { name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "a" top: "loss" }
"""


def test_split_sums_diffs_and_force_backward():
    net = owlnet.Net("force_backward: true\n" + SPLIT_NET, owlnet.TRAIN)
    assert "x_in_0_split" in net.layer_dict and "a_a_0_split" in net.layer_dict
    x = np.random.default_rng(0).standard_normal((2, 3))
    net.forward(x=x)
    diff = net.backward()["x"]
    # loss = |Wb x + bb|^2 / (2N) (a cancels); d/dx = Wb^T (Wb x + bb) / N
    wb, bb = net.params["b"][0].data, net.params["b"][1].data
    expected = (x @ wb.T + bb) @ wb / 2
    np.testing.assert_allclose(diff, expected, rtol=1e-5, atol=1e-6)


def test_no_backward_into_inputs_without_force_backward():
    net = owlnet.Net(SPLIT_NET, owlnet.TRAIN)
    assert net._bottom_need_backward[net._layer_names.index("a")] == [False]


def test_shared_params_accumulate_gradients():
    text = """
layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "p" type: "InnerProduct" bottom: "x" top: "px" param { name: "w" } param { name: "bias" }
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "q" type: "InnerProduct" bottom: "y" top: "qy" param { name: "w" } param { name: "bias" }
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "px" bottom: "qy" top: "loss" }
"""
    net = owlnet.Net(text, owlnet.TRAIN)
    assert len(net.learnable_params) == 2
    assert net.params["p"][0] is net.params["q"][0]
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    net.clear_param_diffs()
    net.forward(x=x, y=y)
    net.backward()
    # loss = |W (x - y)|^2 / 4  ->  dW = W (x - y)^T (x - y) / 2
    w = net.params["p"][0].data.astype(np.float64)
    d = x - y
    np.testing.assert_allclose(net.params["p"][0].diff, w @ d.T @ d / 2, rtol=1e-4, atol=1e-6)


def test_save_load_reproduces_outputs_bit_for_bit(tmp_path, zoo):
    owlnet.set_random_seed(3)
    net = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    x = np.random.default_rng(0).standard_normal(net.blobs["data"].shape)
    out = net.forward(data=x)["prob"].copy()
    path = tmp_path / "lenet.caffemodel"
    net.save(str(path))
    owlnet.set_random_seed(99)
    fresh = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), str(path), owlnet.TEST)
    np.testing.assert_array_equal(fresh.forward(data=x)["prob"], out)
    reread = caffe_pb2.NetParameter()
    reread.ParseFromString(path.read_bytes())
    conv1 = [l for l in reread.layer if l.name == "conv1"][0]
    assert list(conv1.blobs[0].shape.dim) == [20, 1, 5, 5]


def test_weights_in_legacy_4d_form_load(tmp_path, zoo):
    net = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    param = net.to_proto()
    for layer in param.layer:
        for blob in layer.blobs:
            dims = list(blob.shape.dim)
            blob.ClearField("shape")
            blob.num, blob.channels, blob.height, blob.width = [1] * (4 - len(dims)) + dims
    fresh = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    fresh.copy_from(param)
    for name in net.params:
        for p, q in zip(net.params[name], fresh.params[name]):
            np.testing.assert_array_equal(p.data, q.data)


def test_wrong_shaped_weights_are_a_clear_error(tmp_path, zoo):
    net = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    param = net.to_proto()
    ip2 = [l for l in param.layer if l.name == "ip2"][0]
    ip2.blobs[0].shape.dim[0] = 11
    del ip2.blobs[0].data[:]
    ip2.blobs[0].data.extend([0.0] * 11 * 500)
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(param.SerializeToString())
    with pytest.raises(owlnet.ShapeError, match=r"ip2.*\(11, 500\).*\(10, 500\)"):
        net.copy_from(str(path))
    assert net.copy_from(str(path), reinit_mismatched=True) == ["ip2"]


BAD_NETS = [
    ("layer { name: 'a' type: 'Input' top: 'x' input_param { shape { dim: 1 } }",
     owlnet.ConfigError, r"<string>:1:\d+"),
    ("layer { name: 'a' type: 'Input' top: 'x' colour: 3 }", owlnet.ConfigError, "colour"),
    ("layer { name: 'a' type: 'Pooling' pooling_param { pool: MEDIAN } }", owlnet.ConfigError,
     "MEDIAN"),
    ("layer { name: 'a' type: 'Input' top: 'x' input_param { shape { dim: 1 } } }\n"
     "layer { name: 'r' type: 'ReLU' bottom: 'y' top: 'z' }", owlnet.ConfigError,
     r"<string>:2: .*'r' needs bottom blob 'y'"),
    ("layer { name: 'a' type: 'Input' top: 'x' input_param { shape { dim: 1 } } }\n"
     "layer { name: 'r' type: 'ReLU' bottom: 'x' top: 'z' }\n"
     "layer { name: 's' type: 'ReLU' bottom: 'x' top: 'z' }", owlnet.ConfigError,
     r"<string>:3: .*top blob 'z'.*already"),
    ("layer { name: 'r' type: 'ReLU' bottom: 'z' top: 'x' }\n"
     "layer { name: 's' type: 'ReLU' bottom: 'x' top: 'z' }", owlnet.ConfigError,
     "needs bottom blob 'z'"),                                   # a cycle
    ("layer { name: 'a' type: 'Input' top: 'x' input_param { shape { dim: 1 } } }\n"
     "layer { name: 'c' type: 'Convolutoin' bottom: 'x' top: 'y' }", owlnet.ConfigError,
     "unknown layer type 'Convolutoin'; did you mean Convolution"),
    ("layer { name: 'a' type: 'Input' top: 'x' input_param { shape { dim: 2 dim: 3 } } }\n"
     "layer { name: 'c' type: 'Convolution' bottom: 'x' top: 'y' "
     "convolution_param { num_output: 2 kernel_size: 3 } }", owlnet.OwlnetError,
     r"<string>:2: .*'c'"),
]


@pytest.mark.parametrize("text,kind,pattern", BAD_NETS)
def test_bad_nets_give_typed_errors(text, kind, pattern):
    with pytest.raises(kind, match=pattern):
        owlnet.Net(text, owlnet.TRAIN)


def test_truncated_prototxt_names_the_file(tmp_path, zoo):
    text = (zoo / "examples/mnist/lenet.prototxt").read_text()
    path = tmp_path / "cut.prototxt"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(owlnet.ConfigError, match=r"cut\.prototxt:\d+:\d+"):
        owlnet.Net(str(path), owlnet.TEST)


def test_missing_file_and_missing_phase():
    with pytest.raises(owlnet.ConfigError, match="not found"):
        owlnet.Net("no/such/net.prototxt", owlnet.TEST)
    with pytest.raises(owlnet.ConfigError, match="phase"):
        owlnet.Net(LENET_CURRENT)


def test_pycaffe_api_surface(zoo):
    net = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert net.layer_dict["conv1"].type == "Convolution"
    assert net.top_names["conv1"] == ["conv1"] and net.bottom_names["conv1"] == ["data"]
    assert [b.shape for b in net.layers[1].blobs] == [(20, 1, 5, 5), (20,)]
    assert net.blobs["data"].count == 64 * 28 * 28
    net.blobs["data"].reshape(2, 1, 28, 28)
    net.reshape()
    assert net.blobs["prob"].shape == (2, 10)
    net.blobs["data"].data[...] = 1.0          # a write through .data is seen by forward
    first = net.forward()["prob"].copy()
    net.blobs["data"].data[...] = 0.0
    assert not np.array_equal(net.forward()["prob"], first)
    out = net.forward(end="ip1")
    assert list(out) == ["ip1"]
    with pytest.raises(owlnet.ShapeError, match="blob 'data' has shape"):
        net.forward(data=np.zeros((3, 1, 28, 28)))


def test_package_exports_pycaffe_names():
    for name in ("Net", "TRAIN", "TEST", "SGDSolver", "NesterovSolver", "AdaGradSolver",
                 "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "get_solver", "set_mode_cpu",
                 "set_mode_gpu", "set_device", "set_random_seed", "layer_type_list"):
        assert hasattr(owlnet, name), name
    assert "Convolution" in owlnet.layer_type_list()


# -- Caffe semantics found in review ---------------------------------------------------------
SHARED_IP = """
layer {{ name: "in" type: "Input" top: "x" top: "y" input_param {{ shape {{ dim: 2 dim: 3 }} }} }}
layer {{ name: "p" type: "InnerProduct" bottom: "x" top: "px" {p_spec}
        inner_product_param {{ num_output: 2 bias_term: false weight_filler {{ type: "gaussian" }} }} }}
layer {{ name: "q" type: "InnerProduct" bottom: "y" top: "qy" {q_spec}
        inner_product_param {{ num_output: 2 bias_term: false weight_filler {{ type: "gaussian" }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "px" bottom: "qy" top: "loss" }}
"""


def test_shared_param_takes_lr_and_decay_mult_the_owner_left_unset():
    # Caffe's AppendParam: a sharer's explicit lr_mult/decay_mult is adopted when the owner
    # gave none; each layer's param_propagate_down follows its own spec.
    net = owlnet.Net(SHARED_IP.format(p_spec='param { name: "w" }',
                                      q_spec='param { name: "w" lr_mult: 0 decay_mult: 3 }'),
                     owlnet.TRAIN)
    assert net.params_lr == [0.0] and net.params_weight_decay == [3.0]
    assert net.layer_dict["p"].param_propagate_down == [True]
    assert net.layer_dict["q"].param_propagate_down == [False]


def test_shared_param_with_conflicting_lr_mult_is_an_error():
    with pytest.raises(owlnet.ConfigError, match=r"<string>:5: .*'q'.*'w'.*lr_mult 2.*lr_mult 1"):
        owlnet.Net(SHARED_IP.format(p_spec='param { name: "w" lr_mult: 1 }',
                                    q_spec='param { name: "w" lr_mult: 2 }'), owlnet.TRAIN)
    with pytest.raises(owlnet.ConfigError, match="decay_mult"):
        owlnet.Net(SHARED_IP.format(p_spec='param { name: "w" decay_mult: 1 }',
                                    q_spec='param { name: "w" decay_mult: 0 }'), owlnet.TRAIN)


def test_more_param_specs_than_blobs_is_an_error():
    with pytest.raises(owlnet.ConfigError, match=r"<string>:3: .*'p'.*2 param.*1 param"):
        owlnet.Net(SHARED_IP.format(p_spec="param { lr_mult: 1 } param { lr_mult: 2 }",
                                    q_spec=""), owlnet.TRAIN)


def test_propagate_down_count_must_match_bottoms():
    with pytest.raises(owlnet.ConfigError, match=r"<string>:7: .*'loss'.*propagate_down"):
        owlnet.Net(SHARED_IP.format(p_spec="", q_spec="").replace(
            'top: "loss" }', 'top: "loss" propagate_down: true }'), owlnet.TRAIN)


PRUNE_NET = """
layer { name: "in" type: "Input" top: "x" top: "t" input_param { shape { dim: 2 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "t" top: "loss"
        propagate_down: false propagate_down: false }
"""


def test_layers_whose_tops_get_no_gradient_skip_backward():
    # Caffe's blobs_skip_backp: nothing flows into 'h', so neither ReLU nor ip runs backward.
    net = owlnet.Net(PRUNE_NET, owlnet.TRAIN)
    names = net._layer_names
    assert not net._layer_need_backward[names.index("ip")]
    assert not net._layer_need_backward[names.index("relu")]
    assert net._bottom_need_backward[names.index("loss")] == [False, False]


def test_explicit_propagate_down_true_reaches_an_input():
    # Caffe's AppendBottom: an explicit propagate_down sets the bottom's need outright.
    text = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h" propagate_down: true
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "h" top: "loss" }
"""
    net = owlnet.Net(text, owlnet.TRAIN)
    assert net._bottom_need_backward[net._layer_names.index("ip")] == [True]
    net.forward(x=np.random.default_rng(0).standard_normal((2, 3)))
    assert net.backward()["x"].shape == (2, 3)
    plain = owlnet.Net(text.replace("propagate_down: true", ""), owlnet.TRAIN)
    assert plain._bottom_need_backward[plain._layer_names.index("ip")] == [False]


def test_copy_from_accepts_a_legacy_caffemodel_with_bare_inputs(zoo):
    # Caffe's UpgradeNetInput: 'input' without dims (an old caffemodel) is simply dropped.
    net = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    param = net.to_proto()
    param.input.append("data")
    fresh = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    fresh.copy_from(param)
    np.testing.assert_array_equal(fresh.params["ip2"][0].data, net.params["ip2"][0].data)


def test_copy_from_a_layer_without_blobs_into_one_with_blobs_is_an_error(zoo):
    # Caffe's CopyTrainedLayersFrom checks the blob count of every layer of the same name.
    net = owlnet.Net(str(zoo / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    param = net.to_proto()
    [l for l in param.layer if l.name == "ip2"][0].ClearField("blobs")
    with pytest.raises(owlnet.SnapshotError, match=r"'ip2' has 0 blobs.*expects 2"):
        net.copy_from(param)


def test_v1_param_names_share_mode_rules_and_loss_weight_are_kept():
    param, _ = config.read_net("""
layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" param: "w" param: "b"
         blob_share_mode: PERMISSIVE blobs_lr: 1 blobs_lr: 2 weight_decay: 0
         include { phase: TRAIN stage: "s" } loss_weight: 0.5
         transform_param { scale: 0.25 } inner_product_param { num_output: 3 } }""")
    layer = param.layer[0]
    assert [(p.name, p.lr_mult, p.decay_mult) for p in layer.param] == [("w", 1, 0), ("b", 2, 1)]
    assert layer.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert not layer.param[1].HasField("share_mode") and not layer.param[1].HasField("decay_mult")
    assert layer.include[0].phase == owlnet.TRAIN and list(layer.include[0].stage) == ["s"]
    assert list(layer.loss_weight) == [0.5] and layer.transform_param.scale == 0.25
    assert layer.inner_product_param.num_output == 3
