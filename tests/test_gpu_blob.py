"""Blob's host/device synchronisation (Caffe's SyncedMemory, pycaffe's NumPy face), checked on
the CPU with tests/fakecupy.py standing in for CuPy and counting every transfer."""
from __future__ import annotations

import numpy as np
import pytest

import fakecupy
from owlnet import backend
from owlnet.blob import Blob


@pytest.fixture
def fake_gpu():
    """GPU mode on the fake device; CPU mode again afterwards."""
    with fakecupy.fake_gpu() as cupy:
        yield cupy


def test_host_writes_reach_the_device_once(fake_gpu):
    blob = Blob((2, 3), dtype=np.float32, name="b")
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    blob.data[...] = values                     # pycaffe's idiom: a host write
    assert type(blob.data) is np.ndarray
    assert fake_gpu.transfers["to_device"] == 0
    with backend.device_arrays():
        on_device = blob.data
        assert isinstance(on_device, fakecupy.DeviceArray)
        np.testing.assert_array_equal(on_device.get(), values)
        assert fake_gpu.transfers["to_device"] == 1
        blob.data                               # already there: no second copy
        assert fake_gpu.transfers["to_device"] == 1
        on_device *= 2                          # the engine writes on the device
    fake_gpu.transfers.clear()
    host = blob.data                            # pycaffe reads: one copy back
    assert type(host) is np.ndarray and fake_gpu.transfers["to_host"] == 1
    np.testing.assert_array_equal(host, values * 2)


def test_read_only_host_view_keeps_the_device_copy(fake_gpu):
    blob = Blob((4,), dtype=np.float32)
    with backend.device_arrays():
        blob.diff[...] = 5
    first, second = blob.read_diff(), blob.read_diff()
    assert fake_gpu.transfers["to_host"] == 1
    assert not first.flags.writeable and float(second[0]) == 5
    with pytest.raises(ValueError):
        first[0] = 1
    with backend.device_arrays():
        blob.diff                               # still valid on the device: no upload
    assert fake_gpu.transfers["to_device"] == 0


def test_cpu_mode_makes_no_copies():
    blob = Blob((3,), dtype=np.float32)
    outside = blob.data
    with backend.device_arrays():
        inside = blob.data
        assert backend.to_device(outside) is outside
    assert inside is outside and blob.device_data is outside and type(outside) is np.ndarray


def test_device_scope_is_per_thread(fake_gpu):
    import threading
    blob = Blob((2,), dtype=np.float32)
    seen = []
    with backend.device_arrays():
        worker = threading.Thread(target=lambda: seen.append(type(blob.data)))
        worker.start()
        worker.join()
        assert isinstance(blob.data, fakecupy.DeviceArray)
    assert seen == [np.ndarray]


def test_to_device_follows_the_scope(fake_gpu):
    """``blob.data[...] = backend.to_device(x)`` works in and out of the scope (CuPy refuses
    a host array written into a device array, and the fake does too)."""
    blob = Blob((2, 2), dtype=np.float32)
    x = np.ones((2, 2), np.float32)
    blob.data[...] = backend.to_device(x)
    with backend.device_arrays():
        blob.data[...] = backend.to_device(2 * x)
        with pytest.raises(TypeError, match="non-scalar numpy.ndarray"):
            blob.data[...] = 3 * x
    np.testing.assert_array_equal(blob.data, 2 * x)


def test_bind_to_a_flat_device_buffer(fake_gpu):
    """Parameters as views of one flat buffer: values kept, writes on either side seen."""
    a, b = Blob((2, 3), dtype=np.float32), Blob((4,), dtype=np.float32)
    a.data[...] = 1
    b.data[...] = 2
    flat = fake_gpu.zeros(10, dtype=np.float32)
    a.bind(data=flat[:6].reshape(2, 3), keep_values=True)
    b.bind(flat[6:], keep_values=True)
    np.testing.assert_array_equal(flat.get(), [1] * 6 + [2] * 4)
    flat *= 10                                  # a fused update on the whole buffer
    np.testing.assert_array_equal(a.data, np.full((2, 3), 10))
    b.data[...] = 7                             # a pycaffe write lands in the buffer
    with backend.device_arrays():
        b.data
    np.testing.assert_array_equal(flat.get()[6:], [7] * 4)
    with pytest.raises(Exception, match="needs 4 elements"):
        b.bind(data=flat[:3])
    with pytest.raises(Exception, match="C-contiguous"):
        b.bind(flat[:8].reshape(2, 4)[:, :2], flat[:4].reshape(2, 2))


def test_bind_gives_a_placeholder_blob_its_shape():
    """The arena binds PERMISSIVE sharers, created as Blob(()), to views of another shape."""
    blob = Blob((), dtype=np.float32)
    blob.bind(np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32))
    assert blob.shape == (3, 2) and blob.count == 6 and float(blob.data.sum()) == 6


def test_sharers_follow_a_bind():
    owner = Blob((2, 3), dtype=np.float32)
    sharer = Blob((2, 3), dtype=np.float32)
    sharer.share_data(owner)
    buffer = np.arange(6, dtype=np.float32)
    owner.bind(buffer.reshape(2, 3), np.zeros((2, 3), np.float32))      # the arena's call
    np.testing.assert_array_equal(sharer.data, buffer.reshape(2, 3))
    assert np.shares_memory(sharer.data, owner.data)


NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
"""


def _tiny_net(tmp_path):
    from owlnet.net import Net
    path = tmp_path / "tiny.prototxt"
    path.write_text(NET)
    backend.set_random_seed(3)
    return Net(str(path), phase=1)


def test_pycaffe_forward_returns_numpy_and_sees_host_writes(fake_gpu, tmp_path):
    """Defect 4: in GPU mode ``net.blobs[...].data[...] = x`` then ``net.forward()`` gives
    NumPy arrays equal to the CPU net's; the next host write is seen by the next forward."""
    net = _tiny_net(tmp_path)
    backend.set_mode_cpu()
    reference = _tiny_net(tmp_path)
    backend.set_mode_gpu()
    rng = np.random.default_rng(0)
    # Uploads: the input; from the second forward on also the output, which the caller got
    # for writing through ``.data`` (pycaffe's mutable_cpu_data semantics). One download.
    for uploads in (1, 2):
        x = rng.standard_normal((4, 5)).astype(np.float32)
        net.blobs["data"].data[...] = x
        fake_gpu.transfers.clear()
        out = net.forward()["ip"]
        assert fake_gpu.transfers == {"to_device": uploads, "to_host": 1}
        reference.blobs["data"].data[...] = x
        want = reference.forward()["ip"]
        assert type(out) is np.ndarray
        np.testing.assert_allclose(out, want, rtol=1e-6)
    params = net.params["ip"][0]
    assert isinstance(params.device_data, fakecupy.DeviceArray)


def test_blob_module_does_not_import_fileio():
    import owlnet.blob as blob_module
    source = open(blob_module.__file__).read()
    assert "fileio" not in source and "share_diff" not in source


def test_math_mode_sets_the_cublas_compute_type(fake_gpu):
    """Defect 5: the math mode reaches every CuPy matrix product (cuBLAS compute type for
    float32), set on entering GPU mode and on every change; strict fp32 is the default."""
    import fakecupy as fake
    assert backend.math_mode() == "fp32"
    assert fake.linalg.compute_types[np.dtype(np.float32)] == fake.linalg.COMPUTE_TYPE_FP32
    try:
        backend.set_math_mode("tf32")
        assert fake.linalg.compute_types[np.dtype(np.float32)] == fake.linalg.COMPUTE_TYPE_TF32
    finally:
        backend.set_math_mode("fp32")
    assert fake.linalg.compute_types[np.dtype(np.float32)] == fake.linalg.COMPUTE_TYPE_FP32


def test_cupy_has_the_compute_type_switch():
    """The CuPy we install exposes the switch backend uses (needs no device to look)."""
    pytest.importorskip("cupy")
    import importlib
    linalg = importlib.import_module("cupy._core._routines_linalg")
    assert callable(linalg.set_compute_type)
    assert linalg.COMPUTE_TYPE_TF32 != linalg.COMPUTE_TYPE_FP32


def test_lenet_steps_on_the_fake_device_match_cpu():
    """A whole training step on the GPU code path (every layer on device arrays, convolution
    by kernels.gpu's im2col with the real kernel bodies, no cuDNN) equals the CPU's; with the
    solver in the device scope the only transfer of a step() call is its loss, read at the end."""
    import inspect
    from owlnet.kernels import cpu as cpu_kernels
    if "group" not in inspect.signature(cpu_kernels.conv_forward).parameters:
        pytest.skip("the layers still call the old convolution contract (issue 12)")
    from google.protobuf import text_format
    from test_gpu import LENET_TRAIN
    from owlnet.proto import caffe_pb2
    from owlnet.solver import get_solver
    rng = np.random.default_rng(5)
    images = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.float32)

    def run(device):
        backend.set_random_seed(0)
        param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4,
                                          lr_policy="fixed", max_iter=3, display=0,
                                          snapshot_after_train=False, type="SGD")
        text_format.Parse(LENET_TRAIN, param.net_param)
        with backend.device_arrays():
            solver = get_solver(param)
            solver.net.blobs["data"].data[...] = backend.to_device(images)
            solver.net.blobs["label"].data[...] = backend.to_device(labels)
            losses, moved = [], []
            for _ in range(3):
                before = sum(fakecupy.transfers.values())
                solver.step(1)
                moved.append(sum(fakecupy.transfers.values()) - before)
                losses.append(float(solver.net.blobs["loss"].data))
        weights = [b.read_data().copy() for blobs in solver.net.params.values() for b in blobs]
        return losses, weights, moved

    cpu = run("cpu")
    with fakecupy.fake_gpu():
        device = run("gpu")
    np.testing.assert_allclose(device[0], cpu[0], rtol=1e-5)
    for got, want in zip(device[1], cpu[1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # one transfer per step() call: the iteration's loss read once at its end (LossCheck)
    assert device[2][1:] == [1, 1]


def test_direct_buffer_writes_after_device_current(fake_gpu):
    """An arena writes its flat buffers without the blobs: device_current() first uploads a
    pending host write and makes later host reads download the buffer's values."""
    from owlnet.blob import device_current
    a = Blob((2, 2), dtype=np.float32)
    flat = fake_gpu.zeros(8, dtype=np.float32)
    a.bind(flat[:4].reshape(2, 2), flat[4:].reshape(2, 2))
    a.data[...] = 3                       # pycaffe write, still on the host
    a.read_diff()                         # diff synced to the host
    device_current([a])
    flat[:4] += 1                         # "update": data = data + 1, on the buffer
    flat[4:] = 5                          # "reduction" writes the diff
    np.testing.assert_array_equal(a.data, np.full((2, 2), 4))
    np.testing.assert_array_equal(a.read_diff(), np.full((2, 2), 5))
