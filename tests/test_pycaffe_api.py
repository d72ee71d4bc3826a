"""pycaffe's API around the Net: the ``caffe`` package, Classifier and Detector, draw,
coord_map crops, forward_all / forward_backward_all, Solver.add_callback, NCCL."""
import importlib

import cv2
import numpy as np
import pytest

import caffe
import owlnet
from caffe import layers as L
from caffe import params as P
from owlnet.errors import OwlnetError

TINY = """
name: "tiny"
input: "data" input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture
def tiny(tmp_path):
    """A deploy prototxt and weights for it."""
    (tmp_path / "tiny.prototxt").write_text(TINY)
    owlnet.set_random_seed(0)
    owlnet.Net(TINY, caffe.TEST).save(str(tmp_path / "tiny.caffemodel"))
    return str(tmp_path / "tiny.prototxt"), str(tmp_path / "tiny.caffemodel")


def test_caffe_is_owlnet_under_caffes_names():
    import caffe.draw
    import caffe.io
    from caffe.coord_map import crop
    from caffe.proto import caffe_pb2
    assert caffe.io is owlnet.io and caffe.draw is importlib.import_module("owlnet.draw")
    assert caffe_pb2 is owlnet.proto.caffe_pb2 and crop is owlnet.coord_map.crop
    assert caffe.Net is owlnet.Net and caffe.Layer is owlnet.Layer
    assert caffe.layers is owlnet.layers and caffe.to_proto is owlnet.to_proto
    assert isinstance(caffe.__version__, str) and "Python" in caffe.layer_type_list()


def test_forward_all_batches_and_drops_the_padding(tiny):
    net = caffe.Net(tiny[0], tiny[1], caffe.TEST)
    images = np.random.default_rng(0).normal(size=(5, 3, 6, 6)).astype(np.float32)
    out = net.forward_all(data=images, blobs=["conv"])
    assert out["prob"].shape == (5, 5) and out["conv"].shape == (5, 4, 4, 4)
    for i in range(5):
        pair = np.stack([images[i], images[i]])
        np.testing.assert_allclose(out["prob"][i], net.forward(data=pair)["prob"][0], rtol=1e-6)
    outs, diffs = net.forward_backward_all(data=images, prob=np.ones((5, 5), np.float32))
    assert outs["prob"].shape == (5, 5) and diffs["data"].shape == (5, 3, 6, 6)
    net.forward(data=images[3:5])
    net.backward(prob=np.ones((2, 5), np.float32))
    np.testing.assert_allclose(diffs["data"][3:5], net.blobs["data"].diff, rtol=1e-5, atol=1e-7)


def test_net_names_and_share_with(tiny):
    net = caffe.Net(tiny[0], tiny[1], caffe.TEST)
    assert net._blob_names == ["data", "conv", "ip", "prob"]
    assert list(net._layer_names) == ["input", "conv", "ip", "prob"]   # legacy input upgraded
    assert net.bottom_names["ip"] == ["conv"] and net.top_names["conv"] == ["conv"]
    assert [len(layer.blobs) for layer in net.layers] == [0, 2, 2, 0]
    other = caffe.Net(tiny[0], caffe.TEST)
    other.share_with(net)
    net.params["ip"][0].data[...] = 3
    np.testing.assert_array_equal(other.params["ip"][0].data, 3)


def test_solver_callbacks_run_around_the_gradients(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text('input: "x" input_shape { dim: 2 dim: 3 } '
                   'input: "t" input_shape { dim: 2 dim: 1 }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                   'inner_product_param { num_output: 1 } }\n'
                   'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" '
                   'top: "loss" }')
    solver = caffe.get_solver(f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" display: 0')
    solver.net.blobs["x"].data[...] = np.random.default_rng(6).normal(size=(2, 3))
    solver.net.blobs["t"].data[...] = 1
    events, seen = [], []
    weights = solver.net.params["ip"][0]

    def on_gradients():
        events.append(("gradients", solver.iter))
        seen.append((weights.data.copy(), weights.diff.copy()))
    solver.add_callback(lambda: events.append(("start", solver.iter)), on_gradients)

    class Both:
        def on_start(self):
            events.append(("both-start", solver.iter))

        def on_gradients_ready(self):
            events.append(("both-gradients", solver.iter))
    solver.add_callback(Both())
    solver.step(2)
    assert events == [("start", 0), ("both-start", 0), ("gradients", 0), ("both-gradients", 0),
                      ("start", 1), ("both-start", 1), ("gradients", 1), ("both-gradients", 1)]
    (before, gradient), (after, _) = seen       # gradients ready, update not yet applied
    assert np.abs(gradient).max() > 0
    np.testing.assert_allclose(after, before - 0.1 * gradient, rtol=1e-6)


def test_nccl_is_real_or_reported_missing():
    if caffe.has_nccl():
        assert isinstance(caffe.NCCL.new_uid(), bytes)
    else:
        with pytest.raises(OwlnetError, match="NCCL is not available"):
            caffe.NCCL.new_uid()


def test_classifier_predicts_as_the_flow_by_hand(tiny):
    classifier = caffe.Classifier(*tiny, image_dims=(8, 8), raw_scale=255,
                                  mean=np.array([100.0, 110.0, 120.0]), channel_swap=(2, 1, 0))
    images = [np.random.default_rng(k).random((10, 12, 3)).astype(np.float32) for k in (1, 2)]
    net = caffe.Net(*tiny[:1], tiny[1], caffe.TEST)

    def by_hand(crop):
        blob = crop.transpose(2, 0, 1)[::-1] * 255 - np.array([100.0, 110.0, 120.0])[:, None, None]
        return net.forward(data=np.stack([blob, blob]))["prob"][0].copy()
    resized = [caffe.io.resize_image(im, (8, 8)) for im in images]
    centre = classifier.predict(images, oversample=False)
    for k in range(2):
        np.testing.assert_allclose(centre[k], by_hand(resized[k][1:7, 1:7]), rtol=1e-5)
    tens = classifier.predict(images)
    starts = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for k in range(2):
        crops = [resized[k][y:y + 6, x:x + 6] for y, x in starts]
        crops += [c[:, ::-1] for c in crops]
        np.testing.assert_allclose(tens[k], np.mean([by_hand(c) for c in crops], axis=0),
                                   rtol=1e-5)


def test_detector_windows_and_context(tiny, tmp_path):
    picture = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "im.png"), picture)
    image = picture[:, :, ::-1] / np.float32(255)
    windows = [(2, 3, 12, 15), (0, 0, 20, 24)]
    detector = caffe.Detector(*tiny, raw_scale=255, mean=np.array([90.0, 100.0, 110.0]))
    found = detector.detect_windows([(str(tmp_path / "im.png"), windows)])
    net = caffe.Net(*tiny[:1], tiny[1], caffe.TEST)
    for detection, (y0, x0, y1, x1) in zip(found, windows):
        crop = caffe.io.resize_image(image[y0:y1, x0:x1], (6, 6)).transpose(2, 0, 1) * 255
        blob = crop - np.array([90.0, 100.0, 110.0])[:, None, None]
        expected = net.forward(data=np.stack([blob, blob]))["prob"][0]
        assert detection["filename"] == str(tmp_path / "im.png")
        np.testing.assert_allclose(detection["prediction"], expected, rtol=1e-5)
    padded = caffe.Detector(*tiny, raw_scale=255, mean=np.array([90.0, 100.0, 110.0]),
                            context_pad=1)
    crop = padded.crop(image, np.array([0, 0, 12, 12]))
    assert crop.shape == (6, 6, 3)
    # the context above and left of the window lies off the image: mean / raw_scale there
    np.testing.assert_allclose(crop[0, 0], np.array([90.0, 100.0, 110.0]) / 255, rtol=1e-6)
    with pytest.raises(OwlnetError, match=r"window \(30, 30, 40, 40\).*\(20, 24\)"):
        padded.crop(image, np.array([30, 30, 40, 40]))       # wholly off the image


def test_draw_lenet(zoo, tmp_path):
    pydot = pytest.importorskip("pydot")
    from google.protobuf import text_format
    from caffe import draw
    net = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge((zoo / "examples/mnist/lenet_train_test.prototxt").read_text(), net)
    graph = draw.get_pydot_graph(net, "LR", phase=caffe.TRAIN)
    labels = {node.get_name().strip('"') for node in graph.get_nodes()}
    assert "conv1\\n(Convolution)\\nkernel size: 5\\nstride: 1\\npad: 0" in labels
    assert not any(label.startswith("accuracy") for label in labels)      # TEST only
    edges = {(e.get_source().strip('"'), e.get_label()) for e in graph.get_edges()}
    assert any(label == "Batch 64" for _, label in edges)
    assert isinstance(graph, pydot.Dot)
    try:
        draw.draw_net_to_file(net, str(tmp_path / "lenet.png"))
    except OwlnetError as exc:
        pytest.skip(str(exc))                               # no Graphviz 'dot' here
    assert (tmp_path / "lenet.png").read_bytes()[:4] == b"\x89PNG"


def test_coord_map_crop_aligns_a_padded_convolution():
    """A 1x1 convolution padded by 3 shifts coordinates by 3: crop() cuts offset 3, and the
    cropped identity convolution returns the input exactly."""
    from caffe.coord_map import crop
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 7, 9]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=1, pad=3, bias_term=False)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=1, stride=1)
    n.crop = crop(n.pool, n.data)
    proto = n.to_proto()
    assert list(proto.layer[-1].crop_param.offset) == [3]     # one offset for both axes
    net = caffe.Net(str(proto), caffe.TEST)
    net.params["conv"][0].data[...] = np.eye(2).reshape(2, 2, 1, 1)
    x = np.random.default_rng(5).normal(size=(1, 2, 7, 9))
    np.testing.assert_allclose(net.forward(data=x)["crop"], x, rtol=1e-6)


def test_nccl_hands_device_pointers_even_outside_the_solver(monkeypatch):
    """python/train.py calls ``nccl.bcast()`` from user code (not inside the solver's step),
    where ``blob.data`` is the host copy: NCCL must still get the device arrays' pointers,
    and the host copies must read what NCCL wrote. Checked on tests/fakecupy.py."""
    import sys
    import types

    import fakecupy
    from owlnet import backend, nccl
    from owlnet.blob import Blob
    calls = []

    class Communicator:
        def __init__(self, count, uid, rank):
            assert isinstance(uid, bytes) and len(uid) == 128      # CuPy 14's commId
            calls.append(("init", count, rank))

        def bcast(self, ptr, count, dtype, root, stream):
            calls.append(("bcast", ptr, count, root))

        def allReduce(self, send, recv, count, dtype, op, stream):   # noqa: N802 (CuPy's name)
            calls.append(("allReduce", send, recv, count))

    fake_nccl = types.SimpleNamespace(available=True, NcclCommunicator=Communicator,
                                      get_unique_id=lambda: bytes(range(128)), NCCL_FLOAT32=7,
                                      NCCL_SUM=0)
    monkeypatch.setitem(nccl._solvers, "count", 2)
    with fakecupy.fake_gpu() as cupy:
        monkeypatch.setitem(sys.modules, "cupy.cuda", types.SimpleNamespace(nccl=fake_nccl))
        blobs = [Blob((2, 3), dtype=np.float32, name="w"), Blob((4,), dtype=np.float32,
                                                                  name="b")]
        for k, blob in enumerate(blobs):
            blob.data[...] = k + 1                  # written on the host, as pycaffe does
        solver = types.SimpleNamespace(net=types.SimpleNamespace(learnable_params=blobs))
        comm = nccl.NCCL(solver, nccl.NCCL.new_uid())
        comm.bcast()
        with backend.device_arrays():
            pointers = [blob.data.data.ptr for blob in blobs]
            np.testing.assert_array_equal(blobs[1].data.get(), 2)   # uploaded before NCCL
            for blob in blobs:
                blob.diff[...] = cupy.asarray(np.full(blob.shape, 6, dtype=np.float32))
        assert [c for c in calls if c[0] == "bcast"] == [("bcast", p, b.count, 0)
                                                        for p, b in zip(pointers, blobs)]
        made = len(calls)
        comm(0)                                     # net.after_backward(nccl): nothing per layer
        assert len(calls) == made
        comm.on_gradients_ready()                   # also outside the step here
        assert [c[1] for c in calls if c[0] == "allReduce"] == [
            b.device_diff.data.ptr for b in blobs]
        for blob in blobs:
            np.testing.assert_array_equal(blob.diff, 3)   # summed by NCCL, divided by 2


def test_python_train_py_helpers_log_time_and_hook_layers(tmp_path):
    """Caffe's python/train.py: caffe.init_log(), caffe.log(...), caffe.Timer, and the net's
    before/after forward/backward callbacks (called with the layer index, for every layer, in
    Caffe's order); an NCCL may be given to after_backward (layer-wise reduce)."""
    import io as text_io
    import logging

    from owlnet import logging as owl_logging
    saved = list(owl_logging.logger.handlers), owl_logging.logger.level
    try:
        caffe.init_log(1)
        assert owl_logging.logger.level == logging.WARNING
        stream = text_io.StringIO()
        owl_logging.configure(stream=stream)
        caffe.log("Using devices [0]")
        assert "Using devices [0]" in stream.getvalue()
    finally:
        for handler in list(owl_logging.logger.handlers):
            owl_logging.logger.removeHandler(handler)
        for handler in saved[0]:
            owl_logging.logger.addHandler(handler)
        owl_logging.logger.setLevel(saved[1])
    timer = caffe.Timer()
    assert timer.ms == 0                            # never run
    timer.start()
    timer.stop()
    assert timer.ms >= 0

    net = caffe.Net(TINY, caffe.TRAIN)
    events = []
    net.before_forward(lambda i: events.append(("before_forward", i)))
    net.after_forward(lambda i: events.append(("after_forward", i)))
    net.before_backward(lambda i: events.append(("before_backward", i)))
    net.after_backward(lambda i: events.append(("after_backward", i)))
    net.forward()
    net.backward()
    layers = range(len(net.layers))
    assert events == ([(k, i) for i in layers for k in ("before_forward", "after_forward")]
                      + [(k, i) for i in reversed(layers)
                         for k in ("before_backward", "after_backward")])
