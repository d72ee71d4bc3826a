"""Caffe's Python example flows, written anew against owlnet through ``import caffe``:
the classification notebook (Transformer, forward, top-5), net surgery (fully connected
weights copied into convolutions), and NetSpec generation of LeNet and CaffeNet, checked
against Caffe's own prototxt files in the zoo.
"""
import cv2
import numpy as np
import pytest

import caffe
from caffe import layers as L
from caffe import params as P
from conftest import ZOO
from netutil import swap_data_layers, write_bar_lmdb


def randomize(net, seed):
    """Give every parameter random values (deploy prototxts have no fillers)."""
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        weights = blobs[0].data
        weights[...] = rng.random(weights.shape, dtype=np.float32) - np.float32(0.5)
        weights *= 3.5 / np.sqrt(weights[0].size)
        if len(blobs) > 1:
            blobs[1].data[...] = rng.uniform(-0.1, 0.1, blobs[1].data.shape)


def softmax(scores):
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def caffenet_deploy():
    """CaffeNet's deploy net with random weights (the real ones are not shipped here)."""
    if not ZOO.is_dir():
        pytest.skip(f"{ZOO} is not present")
    net = caffe.Net(str(ZOO / "models/bvlc_reference_caffenet/deploy.prototxt"), caffe.TEST)
    randomize(net, 0)
    return net


def test_classification_notebook_flow(zoo, caffenet_deploy, tmp_path):
    net = caffenet_deploy
    mu = np.load(zoo / "python/caffe/imagenet/ilsvrc_2012_mean.npy").mean(1).mean(1)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", mu)
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    net.blobs["data"].reshape(2, 3, 227, 227)
    picture = np.random.default_rng(1).integers(0, 256, (360, 480, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "cat.png"), picture)
    image = caffe.io.load_image(str(tmp_path / "cat.png"))
    transformed = transformer.preprocess("data", image)
    by_hand = (caffe.io.resize_image(picture[:, :, ::-1] / 255.0, (227, 227))
               .transpose(2, 0, 1)[::-1] * 255 - mu[:, None, None])
    np.testing.assert_allclose(transformed, by_hand, rtol=1e-4, atol=1e-3)
    net.blobs["data"].data[...] = transformed
    output_prob = net.forward()["prob"][0]
    expected = softmax(net.blobs["fc8"].data[0].astype(np.float64))
    np.testing.assert_allclose(output_prob, expected, rtol=1e-4, atol=1e-7)
    top5 = output_prob.argsort()[::-1][:5]
    np.testing.assert_array_equal(top5, np.argsort(-expected, kind="stable")[:5])
    assert output_prob.argmax() == top5[0]


def test_net_surgery_fc_to_conv(zoo, caffenet_deploy):
    """Copy CaffeNet's fc6/7/8 into the fully convolutional version: on a 227 x 227 input it
    computes what CaffeNet does; on the notebook's 451 x 451 input it gives an 8 x 8 map of
    classifications (equal to CaffeNet's on the crops only up to the padding of conv2-5,
    which sees image there instead of zeros)."""
    net = caffenet_deploy
    full = caffe.Net(str(zoo / "examples/net_surgery/bvlc_caffenet_full_conv.prototxt"),
                     caffe.TEST)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        for mine, theirs in zip(full.params[name], net.params[name]):
            mine.data[...] = theirs.data
    for fc, conv in (("fc6", "fc6-conv"), ("fc7", "fc7-conv"), ("fc8", "fc8-conv")):
        assert full.params[conv][0].data.size == net.params[fc][0].data.size
        full.params[conv][0].data.flat = net.params[fc][0].data.flat
        full.params[conv][1].data[...] = net.params[fc][1].data
    image = np.random.default_rng(3).normal(0, 50, (1, 3, 227, 227)).astype(np.float32)
    full.blobs["data"].reshape(1, 3, 227, 227)
    full.blobs["data"].data[...] = image
    full.forward()
    net.blobs["data"].reshape(1, 3, 227, 227)
    net.blobs["data"].data[...] = image
    net.forward()
    scores, fc8 = full.blobs["fc8-conv"].data[0, :, 0, 0], net.blobs["fc8"].data[0]
    np.testing.assert_allclose(scores, fc8, rtol=1e-4, atol=1e-4 * np.abs(fc8).max())
    full.blobs["data"].reshape(1, 3, 451, 451)
    full.blobs["data"].data[...] = np.pad(image, ((0, 0), (0, 0), (0, 224), (0, 224)))
    assert full.forward()["prob"].shape == (1, 1000, 8, 8)


def lenet(lmdb, batch_size):
    """LeNet as the MNIST tutorial writes it with NetSpec (names as in Caffe's prototxt)."""
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=0.00390625), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, stride=1,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, stride=1,
                            weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def assert_settings_within(mine, theirs, where):
    """Every field set in ``mine`` is set to the same value in ``theirs``."""
    for field, value in mine.ListFields():
        other = getattr(theirs, field.name)
        if field.message_type is not None and not field.is_repeated:
            assert_settings_within(value, other, f"{where}.{field.name}")
        elif not (field.is_repeated and not other and list(value) in ([0], [1])):
            assert value == other, f"{where}.{field.name}: {value} vs {other}"   # [0]/[1]: default


def test_netspec_lenet_is_caffes_lenet(zoo, tmp_path):
    theirs = caffe.proto.caffe_pb2.NetParameter()
    from google.protobuf import text_format
    text_format.Merge((zoo / "examples/mnist/lenet_train_test.prototxt").read_text(), theirs)
    train_layers = [lp for lp in theirs.layer
                    if not any(rule.phase == caffe.TEST for rule in lp.include)]
    mine = lenet("examples/mnist/mnist_train_lmdb", 64)
    assert len(mine.layer) == len(train_layers)
    for lp, other in zip(mine.layer, train_layers):
        assert (lp.type, list(lp.bottom), list(lp.top)) == \
            (other.type, list(other.bottom), list(other.top))
        lp.name = other.name                 # NetSpec names a layer after its first top
        assert_settings_within(lp, other, lp.name)
    write_bar_lmdb(tmp_path / "lmdb", 16, 0, size=28)
    (tmp_path / "lenet.prototxt").write_text(str(lenet(str(tmp_path / "lmdb"), 8)))
    solver = caffe.get_solver(f'net: "{tmp_path / "lenet.prototxt"}" base_lr: 0.01 '
                              'lr_policy: "fixed" max_iter: 2 display: 0')
    solver.step(2)
    assert solver.net.blobs["data"].data.shape == (8, 1, 28, 28)
    assert np.isfinite(solver.net.blobs["loss"].data).all()


def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1):
    conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                         group=group)
    return conv, L.ReLU(conv, in_place=True)


def fc_relu(bottom, nout):
    fc = L.InnerProduct(bottom, num_output=nout)
    return fc, L.ReLU(fc, in_place=True)


def caffenet(lmdb, batch_size=256):
    """CaffeNet from helper functions, as Caffe's examples/pycaffe/caffenet.py builds it."""
    data, label = L.Data(source=lmdb, backend=P.Data.LMDB, batch_size=batch_size, ntop=2,
                         transform_param=dict(crop_size=227, mean_value=[104, 117, 123],
                                              mirror=True))
    conv1, relu1 = conv_relu(data, 11, 96, stride=4)
    pool1 = L.Pooling(relu1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    norm1 = L.LRN(pool1, local_size=5, alpha=1e-4, beta=0.75)
    conv2, relu2 = conv_relu(norm1, 5, 256, pad=2, group=2)
    pool2 = L.Pooling(relu2, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    norm2 = L.LRN(pool2, local_size=5, alpha=1e-4, beta=0.75)
    conv3, relu3 = conv_relu(norm2, 3, 384, pad=1)
    conv4, relu4 = conv_relu(relu3, 3, 384, pad=1, group=2)
    conv5, relu5 = conv_relu(relu4, 3, 256, pad=1, group=2)
    pool5 = L.Pooling(relu5, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    fc6, relu6 = fc_relu(pool5, 4096)
    drop6 = L.Dropout(relu6, in_place=True)
    fc7, relu7 = fc_relu(drop6, 4096)
    drop7 = L.Dropout(relu7, in_place=True)
    fc8 = L.InnerProduct(drop7, num_output=1000)
    return caffe.to_proto(L.SoftmaxWithLoss(fc8, label))


def test_netspec_caffenet_matches_the_reference_caffenet(zoo):
    from google.protobuf import text_format
    theirs = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge((zoo / "models/bvlc_reference_caffenet/train_val.prototxt").read_text(),
                      theirs)
    reference = [lp for lp in theirs.layer if lp.type not in ("Data", "Accuracy")]
    mine = [lp for lp in caffenet("train_lmdb").layer if lp.type != "Data"]
    assert [lp.type for lp in mine] == [lp.type for lp in reference]
    assert mine[0].name == "Convolution1" and mine[0].top == mine[1].top   # auto names, in place
    for lp, other in zip(mine, reference):
        for field in ("convolution_param", "pooling_param", "lrn_param"):
            if lp.HasField(field):
                assert_settings_within(getattr(lp, field), getattr(other, field), other.name)
        if lp.type == "InnerProduct":
            assert lp.inner_product_param.num_output == other.inner_product_param.num_output
    net = caffe.Net(swap_data_layers(caffenet("train_lmdb", 2), 2, (3, 256, 256)), caffe.TRAIN)
    assert net.blobs["InnerProduct3"].data.shape == (2, 1000)
