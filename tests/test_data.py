"""Datum records, LMDB access, Caffe's DataTransformer, prefetch, and the data layers."""
import threading
import time

import cv2
import numpy as np
import pytest
from gradcheck import TEST, TRAIN, make_layer

from owlnet import backend
from owlnet.blob import Blob
from owlnet.data.datum import array_to_datum, datum_to_array, encode_image, encoded_datum, parse_datum
from owlnet.data.db import LMDBReader, LMDBWriter
from owlnet.data.prefetch import Prefetcher
from owlnet.errors import ConfigError, DataError, SnapshotError
from owlnet.fileio import write_mean_binaryproto
from owlnet.layer_types import create_layer
from owlnet.layer_types import data as data_layers  # noqa: F401  (registers the layers)
from owlnet.proto import caffe_pb2

RNG = np.random.default_rng(5)


# -- helpers -------------------------------------------------------------------------------
def write_lmdb(path, values):
    """An LMDB whose record i has key b'%08d' % i and the given serialized value."""
    with LMDBWriter(path) as writer:
        for i, value in enumerate(values):
            writer.put(b"%08d" % i, value)
    return str(path)


def image_lmdb(tmp_path, n=5, shape=(3, 7, 9), name="db"):
    images = RNG.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = np.arange(n) * 10 + 1
    src = write_lmdb(tmp_path / name, [array_to_datum(im, lb).SerializeToString()
                                       for im, lb in zip(images, labels)])
    return src, images, labels


def data_layer(source, batch, extra="", phase=TRAIN, seed=1, tops=2, transform=""):
    text = (f'name: "data" type: "Data" '
            f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB {extra} }} '
            f'transform_param {{ {transform} }}')
    layer, _, top = make_layer(text, [], n_tops=tops, phase=phase, seed=seed)
    return layer, top


def run_forward(layer, top):
    with backend.dtype_scope(np.float64):
        layer.forward([], top)
    return [t.data.copy() for t in top]


def caffe_transform(image, h_off, w_off, mirrored, crop, mean=None, mean_values=None, scale=1.0):
    """Caffe's per-element loop: y[c,i,j'] = (x[c,h0+i,w0+j] - mean[c,h0+i,w0+j]) * scale."""
    c_n, h_n, w_n = image.shape
    out_h, out_w = (crop, crop) if crop else (h_n, w_n)
    out = np.zeros((c_n, out_h, out_w))
    for c in range(c_n):
        for i in range(out_h):
            for j in range(out_w):
                x = float(image[c, h_off + i, w_off + j])
                if mean is not None:
                    x -= mean[c, h_off + i, w_off + j]
                elif mean_values is not None:
                    x -= mean_values[c if len(mean_values) > 1 else 0]
                out[c, i, out_w - 1 - j if mirrored else j] = x * scale
    return out


# -- Datum ---------------------------------------------------------------------------------
def test_datum_round_trip_raw_and_float():
    raw = RNG.integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    datum = parse_datum(array_to_datum(raw, 7).SerializeToString(), b"k")
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 4, 5, 7)
    assert datum.data == raw.tobytes() and not datum.float_data
    back = datum_to_array(datum)
    assert back.dtype == np.uint8 and np.array_equal(back, raw)

    flt = RNG.standard_normal((2, 3, 1)).astype(np.float32)
    datum = array_to_datum(flt, -3)
    assert not datum.data and datum.label == -3
    back = datum_to_array(datum)
    assert back.dtype == np.float32 and np.array_equal(back, flt)


def test_datum_round_trip_encoded_png_and_jpeg():
    bgr = RNG.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    datum = encoded_datum(encode_image(bgr, "png"), 2)
    chw = datum_to_array(datum)
    assert np.array_equal(chw, bgr.transpose(2, 0, 1))
    gray = datum_to_array(datum, force_gray=True)
    # the PNG decoder's own colour-to-gray conversion rounds slightly differently
    assert np.abs(gray[0].astype(int) - cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)).max() <= 1

    flat = np.full((8, 8, 3), (10, 120, 240), dtype=np.uint8)
    jpeg = datum_to_array(encoded_datum(encode_image(flat, "jpg"), 0))
    assert jpeg.shape == (3, 8, 8)
    assert np.abs(jpeg.astype(int) - flat.transpose(2, 0, 1)).max() <= 3

    one = RNG.integers(0, 256, size=(4, 4), dtype=np.uint8)
    native = datum_to_array(encoded_datum(encode_image(one, "png"), 0))
    assert native.shape == (1, 4, 4) and np.array_equal(native[0], one)
    color = datum_to_array(encoded_datum(encode_image(one, "png"), 0), force_color=True)
    assert color.shape == (3, 4, 4) and all(np.array_equal(color[c], one) for c in range(3))


def test_corrupt_datums_name_the_key():
    with pytest.raises(DataError, match="bad-key"):
        parse_datum(b"\xff\xff\xff\xff", b"bad-key")
    short = array_to_datum(np.zeros((3, 4, 4), np.uint8))
    short.data = b"\0" * 10
    with pytest.raises(DataError, match="short-key.*48 bytes, holds 10"):
        datum_to_array(short, b"short-key")
    with pytest.raises(DataError, match="img-key.*cannot be decoded"):
        datum_to_array(encoded_datum(b"not an image", 0), b"img-key")


# -- LMDB ----------------------------------------------------------------------------------
def test_reader_wraps_and_seeks(tmp_path):
    src = write_lmdb(tmp_path / "db", [b"v%d" % i for i in range(4)])
    with LMDBReader(src) as reader:
        assert len(reader) == 4
        assert [reader.get(i)[1] for i in (0, 1, 3, 4, 6, 1)] == [b"v0", b"v1", b"v3", b"v0",
                                                                  b"v2", b"v1"]
        assert [k for k, _ in reader] == [b"%08d" % i for i in range(4)]
        second = LMDBReader(src)      # shares the process's one environment for the path
    assert second.get(2)[1] == b"v2"
    second.close()


def test_reader_steps_back_and_forth(tmp_path):
    src = write_lmdb(tmp_path / "db", [b"v%d" % i for i in range(9)])
    order = [5, 4, 2, 7, 1, 8, 0, 6, 6, 3, 10]
    with LMDBReader(src) as reader:
        assert [reader.get(i) for i in order] == [(b"%08d" % (i % 9), b"v%d" % (i % 9))
                                                   for i in order]


def test_writer_grows_map(tmp_path):
    big = b"x" * 50_000
    with LMDBWriter(tmp_path / "db", map_size=1 << 16) as writer:
        for i in range(30):
            writer.put(b"%04d" % i, big)
    with LMDBReader(tmp_path / "db") as reader:
        assert len(reader) == 30 and reader.get(29)[1] == big


def test_missing_empty_and_existing_lmdb(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        LMDBReader(tmp_path / "nowhere")
    empty = write_lmdb(tmp_path / "empty", [])
    with pytest.raises(DataError, match="empty.*no records"):
        LMDBReader(empty)
    with pytest.raises(DataError, match="already exists"):
        LMDBWriter(empty)
    with pytest.raises(DataError, match="nowhere"):
        data_layer(tmp_path / "nowhere", 2)


# -- Data layer ----------------------------------------------------------------------------
def test_data_layer_order_wraparound_and_labels(tmp_path):
    src, images, labels = image_lmdb(tmp_path)
    layer, top = data_layer(src, 3)
    assert layer.is_data and top[0].shape == (3, 3, 7, 9) and top[1].shape == (3,)
    for expect in ([0, 1, 2], [3, 4, 0], [1, 2, 3]):
        data, label = run_forward(layer, top)
        assert np.array_equal(data, images[expect])
        assert np.array_equal(label, labels[expect])
    layer.close()


def test_data_layer_rand_skip(tmp_path):
    src, images, _ = image_lmdb(tmp_path)
    skips = set()
    for seed in range(6):
        layer, top = data_layer(src, 4, "rand_skip: 5", seed=seed)
        assert 0 <= layer.skip < 5
        skips.add(layer.skip)
        data, _ = run_forward(layer, top)
        assert np.array_equal(data, images[[(layer.skip + i) % 5 for i in range(4)]])
        layer.close()
    assert len(skips) > 1


@pytest.mark.parametrize("phase,crop,mirror", [(TRAIN, 5, "true"), (TEST, 5, "true"),
                                               (TRAIN, 0, "true"), (TEST, 0, "false")])
def test_data_layer_transform_mean_file(tmp_path, phase, crop, mirror):
    src, images, _ = image_lmdb(tmp_path)
    mean = RNG.uniform(0, 255, size=(3, 7, 9)).astype(np.float32)
    write_mean_binaryproto(tmp_path / "mean.binaryproto", mean)
    layer, top = data_layer(src, 5, phase=phase, transform=(
        f'crop_size: {crop} mirror: {mirror} scale: 0.5 '
        f'mean_file: "{tmp_path / "mean.binaryproto"}"'))
    assert top[0].shape == ((5, 3, 5, 5) if crop else (5, 3, 7, 9))
    prepared = layer.make_batch(0)
    if phase == TEST and crop:
        assert set(prepared.h_offs) == {1} and set(prepared.w_offs) == {2}
    (data, _) = run_forward(layer, top)
    for k in range(5):
        expect = caffe_transform(images[k], prepared.h_offs[k], prepared.w_offs[k],
                                 prepared.mirrored[k], crop, mean=mean, scale=0.5)
        np.testing.assert_allclose(data[k], expect, rtol=1e-6, atol=1e-5)
    layer.close()


def test_random_crops_cover_every_offset_and_mirror(tmp_path):
    src, images, _ = image_lmdb(tmp_path, n=2, shape=(1, 4, 5))
    layer, top = data_layer(src, 50, transform="crop_size: 3 mirror: true")
    batches = [layer.make_batch(b) for b in range(4)]
    h_offs = np.concatenate([b.h_offs for b in batches])
    w_offs = np.concatenate([b.w_offs for b in batches])
    mirrored = np.concatenate([b.mirrored for b in batches])
    assert set(h_offs) == {0, 1} and set(w_offs) == {0, 1, 2}
    assert 0.3 < mirrored.mean() < 0.7
    for b, prepared in enumerate(batches):
        for k in range(50):
            expect = caffe_transform(images[k % 2], prepared.h_offs[k], prepared.w_offs[k],
                                     prepared.mirrored[k], 3)
            assert np.array_equal(prepared.data[k], expect)
    layer.close()


def test_test_phase_without_mirror_is_centred_and_fixed(tmp_path):
    src, images, _ = image_lmdb(tmp_path, n=3, shape=(2, 6, 7))
    layer, top = data_layer(src, 3, phase=TEST, transform="crop_size: 3")
    data, _ = run_forward(layer, top)
    for k in range(3):
        assert np.array_equal(data[k], images[k][:, 1:4, 2:5])
    layer.close()


@pytest.mark.parametrize("values", [[100.0], [10.0, 20.0, 30.0]])
def test_mean_value_and_scale(tmp_path, values):
    src, images, _ = image_lmdb(tmp_path)
    text = " ".join(f"mean_value: {v}" for v in values)
    layer, top = data_layer(src, 5, phase=TEST, transform=f"{text} scale: 0.25")
    data, _ = run_forward(layer, top)
    for k in range(5):
        expect = caffe_transform(images[k], 0, 0, False, 0, mean_values=values, scale=0.25)
        np.testing.assert_allclose(data[k], expect, rtol=1e-12)
    layer.close()


def test_float_datums(tmp_path):
    values = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
    src = write_lmdb(tmp_path / "db", [array_to_datum(v, 0).SerializeToString() for v in values])
    layer, top = data_layer(src, 4, transform="scale: 2.0 mean_value: 1.0")
    data, _ = run_forward(layer, top)
    np.testing.assert_allclose(data, (values.astype(np.float64) - 1.0) * 2.0, rtol=1e-6)
    layer.close()


def test_encoded_lmdb_matches_raw(tmp_path):
    images = RNG.integers(0, 256, size=(3, 3, 6, 5), dtype=np.uint8)
    src = write_lmdb(tmp_path / "db", [
        encoded_datum(encode_image(im.transpose(1, 2, 0), "png"), i).SerializeToString()
        for i, im in enumerate(images)])
    layer, top = data_layer(src, 3, tops=1)
    assert top[0].shape == (3, 3, 6, 5)
    (data,) = run_forward(layer, top)
    assert np.array_equal(data, images)
    layer.close()


def test_bad_transform_settings(tmp_path):
    src, _, _ = image_lmdb(tmp_path)
    write_mean_binaryproto(tmp_path / "m.binaryproto", np.zeros((3, 5, 5)))
    with pytest.raises(ConfigError, match="mean_file or mean_value"):
        data_layer(src, 2, transform=f'mean_file: "{tmp_path / "m.binaryproto"}" mean_value: 1')
    with pytest.raises(DataError, match=r"m\.binaryproto.*\(3, 5, 5\).*\(3, 7, 9\)"):
        data_layer(src, 2, transform=f'mean_file: "{tmp_path / "m.binaryproto"}"')
    with pytest.raises(DataError, match="missing.binaryproto"):
        data_layer(src, 2, transform=f'mean_file: "{tmp_path / "missing.binaryproto"}"')
    with pytest.raises(ConfigError, match="2 mean_value"):
        data_layer(src, 2, transform="mean_value: 1 mean_value: 2")
    with pytest.raises(DataError, match="smaller than crop_size 8"):
        data_layer(src, 2, transform="crop_size: 8")
    with pytest.raises(ConfigError, match="only the LMDB backend"):
        make_layer(f'name: "d" type: "Data" data_param {{ source: "{src}" batch_size: 2 '
                   f'backend: LEVELDB }}', [], n_tops=2)


def test_corrupt_record_raises_in_consumer_with_key(tmp_path):
    good = array_to_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString()
    src = write_lmdb(tmp_path / "db", [good, good, b"\x08\x96\x01\x22", good])
    layer, top = data_layer(src, 2)
    run_forward(layer, top)
    with pytest.raises(DataError, match="00000002"):
        run_forward(layer, top)
    layer.close()


def test_forward_after_a_bad_record_raises_the_data_error_again(tmp_path):
    """A caught DataError leaves the layer usable: the next forward retries the same batch
    (and fails the same way), instead of reaching a closed prefetcher."""
    good = array_to_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString()
    src = write_lmdb(tmp_path / "db", [good, b"\x08\x96\x01\x22", good, good])
    layer, top = data_layer(src, 1)
    run_forward(layer, top)
    for _ in range(2):
        with pytest.raises(DataError, match="00000001"):
            run_forward(layer, top)
    assert layer.batches_consumed == 1
    layer.close()


def test_same_seed_same_batches_and_resume(tmp_path):
    src, _, _ = image_lmdb(tmp_path, n=7)
    crop = "crop_size: 4 mirror: true"
    first, top_a = data_layer(src, 3, transform=crop, seed=11)
    again, top_b = data_layer(src, 3, transform=crop, seed=11)
    run_a = [run_forward(first, top_a)[0] for _ in range(5)]
    run_b = [run_forward(again, top_b)[0] for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(run_a, run_b))
    assert first.state() == {"batches": 5, "seed": first.seed}

    resumed, top_c = data_layer(src, 3, transform=crop, seed=99)
    run_forward(resumed, top_c)   # its own prefetch has run ahead; restore must discard it
    resumed.restore_state(first.state())
    follow = run_forward(first, top_a)[0]
    assert np.array_equal(run_forward(resumed, top_c)[0], follow)
    for layer in (first, again, resumed):
        layer.close()
    with pytest.raises(SnapshotError, match="batches"):
        resumed.restore_state({"seed": 1})


def test_shards_partition_the_global_batch(tmp_path):
    src, _, _ = image_lmdb(tmp_path, n=5)
    crop = "crop_size: 5 mirror: true"
    whole, top_w = data_layer(src, 4, transform=crop, seed=3)
    shards = []
    for rank in range(2):
        layer, top = data_layer(src, 4, transform=crop, seed=3)
        layer.shard(rank, 2)                     # reads half of each global batch of 4
        assert layer.batch_size == 2
        shards.append((layer, top))
    for _ in range(3):
        expect = run_forward(whole, top_w)[0]
        part0, part1 = (run_forward(layer, top)[0] for layer, top in shards)
        assert np.array_equal(expect[0::2], part0) and np.array_equal(expect[1::2], part1)
    with pytest.raises(ConfigError, match="shard index 2"):
        whole.shard(2, 2)
    with pytest.raises(ConfigError, match="batch_size 4 is not divisible by the 3 slices"):
        whole.shard(0, 3)
    whole.close()
    for layer, _ in shards:
        layer.close()


# -- prefetch ------------------------------------------------------------------------------
def test_prefetch_is_bounded_and_closes():
    produced = []

    def produce(index, parallel_map):
        produced.append(index)
        return parallel_map(lambda x: x * index, [1, 2])

    prefetcher = Prefetcher(produce, start=3, depth=2, workers=2)
    time.sleep(0.3)
    assert len(produced) <= 3          # two waiting in the queue, one blocked on put
    assert prefetcher.next() == [3, 6] and prefetcher.next() == [4, 8]
    prefetcher.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetch_reraises_the_original_error():
    error = DataError("record 'x' is broken")

    def produce(index, parallel_map):
        if index == 1:
            raise error
        return index

    prefetcher = Prefetcher(produce)
    assert prefetcher.next() == 0
    with pytest.raises(DataError) as caught:
        prefetcher.next()
    assert caught.value is error


# -- ImageData -----------------------------------------------------------------------------
def image_folder(tmp_path, n=5, size=(6, 8)):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    images, lines = [], []
    for i in range(n):
        image = RNG.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "sub" / f"im{i}.png"), image)
        images.append(image)
        lines.append(f"sub/im{i}.png {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return root, images


def image_layer(tmp_path, root, batch, extra="", phase=TRAIN, seed=1, transform=""):
    text = (f'name: "img" type: "ImageData" image_data_param {{ source: "{tmp_path / "list.txt"}" '
            f'root_folder: "{root}" batch_size: {batch} {extra} }} transform_param {{ {transform} }}')
    layer, _, top = make_layer(text, [], n_tops=2, phase=phase, seed=seed)
    return layer, top


def test_image_data_in_order(tmp_path):
    root, images = image_folder(tmp_path)
    layer, top = image_layer(tmp_path, root, 3)
    assert top[0].shape == (3, 3, 6, 8)
    data, label = run_forward(layer, top)
    assert np.array_equal(data, np.stack([im.transpose(2, 0, 1) for im in images[:3]]))
    assert list(label) == [0, 1, 2]
    _, label = run_forward(layer, top)
    assert list(label) == [3, 4, 0]
    layer.close()


def test_image_data_shuffle_each_epoch_and_resize(tmp_path):
    root, images = image_folder(tmp_path)
    layer, top = image_layer(tmp_path, root, 5, "shuffle: true new_height: 4 new_width: 3 "
                                                "is_color: false")
    assert top[0].shape == (5, 1, 4, 3)
    epochs = []
    for _ in range(4):
        data, label = run_forward(layer, top)
        assert sorted(label) == [0, 1, 2, 3, 4]
        for k, lb in enumerate(label.astype(int)):
            gray = cv2.imread(str(root / "sub" / f"im{lb}.png"), cv2.IMREAD_GRAYSCALE)
            assert np.array_equal(data[k, 0], cv2.resize(gray, (3, 4)))
        epochs.append(tuple(label))
    assert len(set(epochs)) > 1
    same, top_s = image_layer(tmp_path, root, 5, "shuffle: true new_height: 4 new_width: 3 "
                                                 "is_color: false")
    assert [tuple(run_forward(same, top_s)[1]) for _ in range(4)] == epochs
    state = layer.state()
    layer.restore_state({"batches": 1, "seed": state["seed"]})
    assert tuple(run_forward(layer, top)[1]) == epochs[1]
    layer.close()
    same.close()


def test_image_data_bad_inputs(tmp_path):
    root, _ = image_folder(tmp_path)
    (tmp_path / "list.txt").write_text("sub/im0.png 0\nsub/im1.png one\n")
    with pytest.raises(DataError, match=r"list\.txt:2"):
        image_layer(tmp_path, root, 2)
    (tmp_path / "list.txt").write_text("sub/im0.png 0\n../../escape.png 1\n")
    with pytest.raises(DataError, match=r"list\.txt:2.*outside root folder"):
        image_layer(tmp_path, root, 2)
    (tmp_path / "list.txt").write_text("sub/im0.png 0\nsub/missing.png 1\n")
    layer, top = image_layer(tmp_path, root, 2)
    with pytest.raises(DataError, match="missing.png"):
        run_forward(layer, top)
    layer.close()
    with pytest.raises(ConfigError, match="together"):
        image_layer(tmp_path, root, 2, "new_height: 4")


# -- MemoryData ----------------------------------------------------------------------------
def test_memory_data_cycles_through_arrays():
    layer, _, top = make_layer('name: "m" type: "MemoryData" memory_data_param { batch_size: 2 '
                               'channels: 1 height: 2 width: 3 }', [], n_tops=2)
    values = RNG.standard_normal((4, 1, 2, 3))
    with pytest.raises(DataError, match="set_input_arrays"):
        layer.forward([], top)
    layer.set_input_arrays(values, np.arange(4.0))
    for start in (0, 2, 0):
        layer.forward([], top)
        assert np.array_equal(top[0].data, values[start:start + 2])
        assert list(top[1].data) == [start, start + 1]
    with pytest.raises(Exception, match="multiple of batch_size"):
        layer.set_input_arrays(values[:3], np.arange(3.0))


def test_data_layer_released_with_its_threads(tmp_path):
    src, _, _ = image_lmdb(tmp_path)
    layer = create_layer(data_layers_param(src), TRAIN)
    top = [Blob((), name="data")]
    layer.setup([], top)
    layer.forward([], top)
    prefetcher = layer._resources["prefetcher"]
    time.sleep(0.2)   # let the producer finish the batches it is building
    del layer
    import gc
    gc.collect()
    assert prefetcher._stop.is_set()


def data_layers_param(source):
    param = caffe_pb2.LayerParameter(name="d", type="Data")
    param.data_param.source = source
    param.data_param.batch_size = 2
    param.data_param.backend = caffe_pb2.DataParameter.LMDB
    return param
