"""Fillers against their definitions, and BlobProto/binaryproto files."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from owlnet import backend, fillers, fileio
from owlnet.errors import ConfigError, SnapshotError
from owlnet.proto import caffe_pb2


def filler(text):
    return text_format.Parse(text, caffe_pb2.FillerParameter())


def draw(text, shape, seed=0):
    backend.set_random_seed(seed)
    return fillers.fill(filler(text), shape, np.float64)


def test_constant_uniform_gaussian():
    assert np.all(draw("type: 'constant' value: 2.5", (3, 4)) == 2.5)
    u = draw("type: 'uniform' min: -2 max: 3", (200, 100))
    assert u.min() >= -2 and u.max() <= 3 and abs(u.mean() - 0.5) < 0.05
    g = draw("type: 'gaussian' mean: 1 std: 0.5", (200, 100))
    assert abs(g.mean() - 1) < 0.02 and abs(g.std() - 0.5) < 0.02


def test_sparse_gaussian_keeps_sparse_over_num_outputs():
    g = draw("type: 'gaussian' std: 1 sparse: 5", (20, 2000))
    kept = np.count_nonzero(g) / g.size
    assert abs(kept - 5 / 20) < 0.01


def test_positive_unitball_rows_sum_to_one():
    p = draw("type: 'positive_unitball'", (6, 3, 4))
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.reshape(6, -1).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("norm,n", [("FAN_IN", 3 * 5 * 5), ("FAN_OUT", 64 * 5 * 5),
                                    ("AVERAGE", (3 * 25 + 64 * 25) / 2)])
def test_xavier_and_msra_scale_with_variance_norm(norm, n):
    shape = (64, 3, 5, 5)
    x = draw(f"type: 'xavier' variance_norm: {norm}", shape)
    bound = math.sqrt(3 / n)
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
    m = draw(f"type: 'msra' variance_norm: {norm}", shape)
    assert abs(m.std() - math.sqrt(2 / n)) < 0.05 * math.sqrt(2 / n)


def test_bilinear_is_the_upsampling_kernel():
    w = draw("type: 'bilinear'", (2, 1, 4, 4))
    ramp = np.array([0.25, 0.75, 0.75, 0.25])          # factor-2 upsampling weights
    np.testing.assert_allclose(w[1, 0], np.outer(ramp, ramp))
    w3 = draw("type: 'bilinear'", (1, 1, 3, 3))         # f = 2, c = 0.5: x/f = 0, 0.5, 1
    np.testing.assert_allclose(w3[0, 0], np.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))
    with pytest.raises(ConfigError, match="square"):
        draw("type: 'bilinear'", (1, 1, 3, 4))


def test_seeded_and_unknown_type():
    a = draw("type: 'gaussian'", (5,), seed=3)
    b = draw("type: 'gaussian'", (5,), seed=3)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="unknown filler type 'gausian'"):
        draw("type: 'gausian'", (5,))


def test_mean_binaryproto_round_trip(tmp_path):
    mean = np.random.default_rng(0).uniform(0, 255, (3, 5, 4)).astype(np.float32)
    path = tmp_path / "mean.binaryproto"
    fileio.write_mean_binaryproto(path, mean)
    proto = caffe_pb2.BlobProto()
    proto.ParseFromString(path.read_bytes())
    assert (proto.num, proto.channels, proto.height, proto.width) == (1, 3, 5, 4)
    np.testing.assert_array_equal(fileio.read_mean_binaryproto(path), mean)


def test_ilsvrc_mean_written_as_binaryproto_reads_back(tmp_path, zoo):
    mean = np.load(zoo / "python/caffe/imagenet/ilsvrc_2012_mean.npy", allow_pickle=False)
    path = tmp_path / "ilsvrc.binaryproto"
    fileio.write_mean_binaryproto(path, mean)
    back = fileio.read_mean_binaryproto(path)
    assert back.shape == (3, 256, 256)
    np.testing.assert_allclose(back.mean(axis=(1, 2)), [104.007, 116.669, 122.679], atol=1e-3)


def test_blob_limits_and_bad_files(tmp_path):
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([10 ** 6, 10 ** 6])
    with pytest.raises(SnapshotError, match="over the limit"):
        fileio.blobproto_to_array(proto, where="huge")
    proto = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=2)
    proto.data.extend([1, 2, 3])
    with pytest.raises(SnapshotError, match="needs 4 values, the file holds 3"):
        fileio.blobproto_to_array(proto)
    proto.data.append(4)
    assert fileio.blobproto_to_array(proto).shape == (1, 2, 1, 2)
    bad = tmp_path / "garbage.binaryproto"
    bad.write_bytes(b"\xff\xff\xff\xff not a proto")
    with pytest.raises(SnapshotError, match="garbage.binaryproto"):
        fileio.read_mean_binaryproto(bad)
    with pytest.raises(SnapshotError, match="cannot read"):
        fileio.read_mean_binaryproto(tmp_path / "missing.binaryproto")


def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "x.bin"
    fileio.atomic_write(path, b"one")
    fileio.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
