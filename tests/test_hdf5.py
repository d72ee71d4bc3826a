"""HDF5: the HDF5Data and HDF5Output layers, Net.save_hdf5/load_hdf5, snapshot_format HDF5."""
import gc
import os

import numpy as np
import pytest
from gradcheck import make_layer

h5py = pytest.importorskip("h5py")

import owlnet  # noqa: E402
from owlnet import backend  # noqa: E402
from owlnet import snapshot as snap  # noqa: E402
from owlnet.errors import ConfigError, DataError, ShapeError, SnapshotError  # noqa: E402
from owlnet.solver import get_solver  # noqa: E402
import test_solver_loop as loop  # noqa: E402
from test_solver_loop import log  # noqa: E402,F401  (its log fixture)

TEST_DATA = "src/caffe/test/test_data"


# -- Caffe's sample files, made by the recipe of its generate_sample_data.py -------------------
@pytest.fixture
def caffe_sample_data(tmp_path, monkeypatch):
    """sample_data.h5 (float32 data, label, label2), sample_data_2_gzip.h5 (data + 2400,
    gzip level 1; label and label2 as gzip uint8) and sample_data_list.txt naming both
    relative to Caffe's root, which becomes the current directory."""
    folder = tmp_path / TEST_DATA
    folder.mkdir(parents=True)
    rows, cols, height, width = 10, 8, 6, 5
    total = rows * cols * height * width
    data = np.arange(total).reshape(rows, cols, height, width).astype(np.float32)
    label = (1 + np.arange(rows)[:, None]).astype(np.float32)
    with h5py.File(folder / "sample_data.h5", "w") as f:
        f["data"], f["label"], f["label2"] = data, label, label + 1
    with h5py.File(folder / "sample_data_2_gzip.h5", "w") as f:
        f.create_dataset("data", data=data + total, compression="gzip", compression_opts=1)
        for name, values in (("label", label), ("label2", label + 1)):
            f.create_dataset(name, data=values, compression="gzip", compression_opts=1,
                             dtype="uint8")
    with h5py.File(folder / "sample_data_2_gzip.h5", "r") as f:
        assert f["data"].compression == "gzip" and f["label2"].dtype == np.uint8
    (folder / "sample_data_list.txt").write_text(
        f"{TEST_DATA}/sample_data.h5\n{TEST_DATA}/sample_data_2_gzip.h5\n")
    monkeypatch.chdir(tmp_path)
    return f"{TEST_DATA}/sample_data_list.txt"


def hdf5_data_layer(source, batch, tops=("data", "label", "label2"), extra="", seed=1):
    text = (f'name: "h5" type: "HDF5Data" {" ".join(f"top: {t!r}" for t in tops)} '
            f'hdf5_data_param {{ source: "{source}" batch_size: {batch} {extra} }}')
    layer, _, top = make_layer(text.replace("'", '"'), [], n_tops=len(tops), seed=seed)
    return layer, top


def forward(layer, top):
    with backend.dtype_scope(np.float64):
        layer.forward([], top)
    return [t.data.copy() for t in top]


def test_hdf5_data_reads_caffe_sample_files_as_caffes_test_expects(caffe_sample_data):
    batch, cols, height, width = 5, 8, 6, 5
    layer, top = hdf5_data_layer(caffe_sample_data, batch)
    assert layer.is_data
    assert top[0].shape == (batch, cols, height, width)
    assert top[1].shape == (batch, 1) and top[2].shape == (batch, 1)
    size = cols * height * width
    for iteration in range(10):        # two passes over both files
        data, label, label2 = forward(layer, top)
        label_offset = 1 + (0 if iteration % 2 == 0 else batch)
        data_offset = 0 if iteration % 2 == 0 else batch * size
        file_offset = 0 if iteration % 4 < 2 else 2400
        np.testing.assert_array_equal(label.ravel(), label_offset + np.arange(batch))
        np.testing.assert_array_equal(label2.ravel(), label_offset + 1 + np.arange(batch))
        expected = file_offset + data_offset + np.arange(batch * size)
        np.testing.assert_array_equal(data.ravel(), expected)


def test_hdf5_data_batches_span_files_and_wrap(caffe_sample_data):
    layer, top = hdf5_data_layer(caffe_sample_data, 7, tops=("label2", "data"))
    seen = np.concatenate([forward(layer, top)[1][:, 0, 0, 0] for _ in range(4)])
    rows = np.arange(28) % 20                      # stream rows: file 0 rows 0-9, file 1 ...
    np.testing.assert_array_equal(seen, (rows % 10) * 240 + (rows >= 10) * 2400)


def stream(layer, top, batches):
    return np.concatenate([forward(layer, top)[1][:, 0, 0, 0] for _ in range(batches)])


def test_hdf5_data_shuffle_visits_every_row_once_per_pass(caffe_sample_data):
    layer, top = hdf5_data_layer(caffe_sample_data, 5, tops=("label", "data"),
                                 extra="shuffle: true")
    first = stream(layer, top, 8)                  # two passes of 20 rows
    for part in (first[:20], first[20:]):
        assert sorted(part) == sorted(np.arange(20) % 10 * 240 + (np.arange(20) >= 10) * 2400)
        files = part // 2400                        # a file's rows stay together within a pass
        assert np.count_nonzero(np.diff(files)) == 1
    assert not np.array_equal(first[:20], first[20:])
    plain = stream(*hdf5_data_layer(caffe_sample_data, 5, tops=("label", "data")), 4)
    assert not np.array_equal(first[:20], plain)

    state = layer.state()
    ahead = stream(layer, top, 3)
    again, again_top = hdf5_data_layer(caffe_sample_data, 5, tops=("label", "data"),
                                       extra="shuffle: true", seed=99)
    again.restore_state(state)
    np.testing.assert_array_equal(stream(again, again_top, 3), ahead)


def test_hdf5_data_shards_together_make_the_whole_batch(caffe_sample_data):
    whole_layer, whole_top = hdf5_data_layer(caffe_sample_data, 6, tops=("data",),
                                             extra="shuffle: true")
    shards = []
    for rank in range(3):
        layer, top = hdf5_data_layer(caffe_sample_data, 6, tops=("data",), extra="shuffle: true")
        layer.shard(rank, 3)
        layer.reshape([], top)
        shards.append((layer, top))
    for _ in range(5):
        whole = forward(whole_layer, whole_top)[0]
        parts = [forward(layer, top)[0] for layer, top in shards]
        for rank, part in enumerate(parts):
            np.testing.assert_array_equal(part, whole[rank::3])
    with pytest.raises(ConfigError, match="shard index 3"):
        shards[0][0].shard(3, 3)
    with pytest.raises(ConfigError, match="not divisible by the 4 slices"):
        shards[0][0].shard(0, 4)


def test_hdf5_data_converts_integer_and_double_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = np.arange(12).reshape(4, 3)
    with h5py.File("a.h5", "w") as f:
        f["x"] = values.astype(np.float64) + 0.25
        f["y"] = values.astype(np.int16) - 5
        f["z"] = values.astype(np.uint8)
    (tmp_path / "list.txt").write_text("a.h5\n")
    layer, top = hdf5_data_layer("list.txt", 4, tops=("x", "y", "z"))
    x, y, z = forward(layer, top)
    np.testing.assert_array_equal(x, np.float32(values + 0.25))
    np.testing.assert_array_equal(y, values - 5)
    np.testing.assert_array_equal(z, values)


@pytest.fixture
def bad_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with h5py.File("good.h5", "w") as f:
        f["data"] = np.zeros((4, 2), np.float32)
        f["label"] = np.zeros(4, np.float32)
    with h5py.File("short.h5", "w") as f:
        f["data"] = np.zeros((4, 2), np.float32)
        f["label"] = np.zeros(3, np.float32)
    with h5py.File("wide.h5", "w") as f:
        f["data"] = np.zeros((4, 5), np.float32)
        f["label"] = np.zeros(4, np.float32)
    with h5py.File("words.h5", "w") as f:
        f["data"] = np.array([b"a", b"b"])
        f["label"] = np.zeros(2, np.float32)
    return tmp_path


@pytest.mark.parametrize("listing, error, words", [
    ("good.h5\n\ngone.h5\n", DataError, r"list.txt:3: HDF5 file 'gone.h5' not found"),
    ("good.h5 short.h5\n", DataError, r"list.txt:1: .*'label' has 3 rows, dataset 'data' 4"),
    ("good.h5\nwide.h5\n", DataError, r"list.txt:2: dataset 'data' of wide.h5 .*\(5,\).*\(2,\)"),
    ("words.h5\n", DataError, r"list.txt:1: dataset 'data' of 'words.h5' has type"),
    ("\n", DataError, "names no files"),
])
def test_hdf5_data_errors_name_the_list_line(bad_files, listing, error, words):
    (bad_files / "list.txt").write_text(listing)
    with pytest.raises(error, match=words):
        hdf5_data_layer("list.txt", 2, tops=("data", "label"))


def test_hdf5_data_setting_errors(bad_files):
    (bad_files / "list.txt").write_text("good.h5\n")
    with pytest.raises(DataError, match=r"list.txt:1: .*no dataset 'other' for top 'other' "
                                        r"\(datasets: data, label\)"):
        hdf5_data_layer("list.txt", 2, tops=("data", "other"))
    with pytest.raises(DataError, match="absent.txt"):
        hdf5_data_layer("absent.txt", 2)
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        hdf5_data_layer("list.txt", 0, tops=("data",))
    with pytest.raises(ConfigError, match="does not transform data"):
        make_layer('name: "h" type: "HDF5Data" top: "data" transform_param { scale: 2 } '
                   'hdf5_data_param { source: "list.txt" batch_size: 2 }', [])


# -- HDF5Output ---------------------------------------------------------------------------------
OUTPUT_NET = """
name: "out"
layer { name: "in" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 3 dim: 2 dim: 4 } shape { dim: 3 } } }
layer { name: "save" type: "HDF5Output" bottom: "data" bottom: "label"
  hdf5_output_param { file_name: "%s" } }
"""


def test_hdf5_output_appends_and_publishes_on_close(tmp_path):
    path = tmp_path / "out.h5"
    net = owlnet.Net(OUTPUT_NET % path, owlnet.TEST)
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(3, 2, 4)), rng.integers(0, 9, size=3)) for _ in range(3)]
    for data, label in batches:
        net.forward(data=data, label=label)
    assert not path.exists()                       # written whole at close, as Caffe at exit
    net.close()
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["data", "label"]
        assert f["data"].dtype == np.float32 and f["data"].shape == (9, 2, 4, 1)
        assert f["label"].shape == (9, 1, 1, 1)
        np.testing.assert_array_equal(f["data"][:, :, :, 0],
                                      np.float32(np.concatenate([d for d, _ in batches])))
        np.testing.assert_array_equal(f["label"][:, 0, 0, 0],
                                      np.concatenate([lb for _, lb in batches]))
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]     # no temporary file left
    with pytest.raises(DataError, match="after close"):
        net.forward(data=batches[0][0], label=batches[0][1])


def test_hdf5_output_file_is_read_back_by_hdf5_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = np.arange(24.0).reshape(6, 4)
    layer, bottom, _ = make_layer('name: "o" type: "HDF5Output" bottom: "d" bottom: "l" '
                                  'hdf5_output_param { file_name: "o.h5" }',
                                  [data, np.arange(6.0)], n_tops=0)
    layer.forward(bottom, [])
    del layer, bottom
    gc.collect()                                   # the file is published when the layer goes
    (tmp_path / "list.txt").write_text("o.h5\n")
    reader, top = hdf5_data_layer("list.txt", 6, tops=("data", "label"))
    read, label = forward(reader, top)
    np.testing.assert_array_equal(read.reshape(6, 4), data)
    np.testing.assert_array_equal(label.ravel(), np.arange(6.0))


def test_hdf5_output_errors(tmp_path):
    with pytest.raises(ConfigError, match="file_name is not set"):
        make_layer('name: "o" type: "HDF5Output" bottom: "d" bottom: "l"', [np.zeros(2)] * 2,
                   n_tops=0)
    with pytest.raises(DataError, match="cannot write HDF5 output file"):
        make_layer('name: "o" type: "HDF5Output" bottom: "d" bottom: "l" '
                   f'hdf5_output_param {{ file_name: "{tmp_path}/no/such/o.h5" }}',
                   [np.zeros(2)] * 2, n_tops=0)
    with pytest.raises(ShapeError, match="same batch size"):
        make_layer('name: "o" type: "HDF5Output" bottom: "d" bottom: "l" '
                   f'hdf5_output_param {{ file_name: "{tmp_path}/o.h5" }}',
                   [np.zeros((2, 3)), np.zeros(3)], n_tops=0)


# -- weights: Net.save_hdf5 / load_hdf5 ------------------------------------------------------
WEIGHTS_NET = """
name: "shared"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
  param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b"
  param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "c" type: "InnerProduct" bottom: "b" top: "c"
  inner_product_param { num_output: 3 bias_term: false
                        weight_filler { type: "gaussian" std: 0.5 } } }
"""


def build_weights_net(seed):
    backend.set_random_seed(seed)
    return owlnet.Net(WEIGHTS_NET, owlnet.TEST)


def test_save_hdf5_layout_is_caffes(tmp_path):
    net = build_weights_net(1)
    for blob in net.learnable_params:
        blob.diff[...] = np.arange(blob.count).reshape(blob.shape)
    net.save_hdf5(tmp_path / "w.h5")
    net.save_hdf5(tmp_path / "wd.h5", write_diff=True)
    with h5py.File(tmp_path / "w.h5", "r") as f:
        assert list(f) == ["data"]
        assert sorted(f["data"]) == ["a", "b", "c", "in", "relu"]     # every layer has a group
        assert sorted(f["data/a"]) == ["0", "1"] and len(f["data/b"]) == 0   # b shares a's
        assert sorted(f["data/c"]) == ["0"]
        weight = f["data/a/0"]
        assert weight.dtype == np.float32 and weight.shape == (5, 5)
        np.testing.assert_array_equal(weight[()], net.params["a"][0].data)
    with h5py.File(tmp_path / "wd.h5", "r") as f:
        assert sorted(f) == ["data", "diff"]
        assert sorted(f["diff/b"]) == ["0", "1"]                 # diffs of shared params too
        np.testing.assert_array_equal(f["diff/c/0"][()], np.arange(15.0).reshape(3, 5))


def test_save_load_hdf5_reproduces_outputs_bit_for_bit(tmp_path):
    net = build_weights_net(1)
    x = np.random.default_rng(0).normal(size=(2, 5))
    expected = net.forward(x=x)["c"].copy()
    net.save_hdf5(tmp_path / "w.caffemodel.h5")
    other = build_weights_net(2)
    assert not np.array_equal(other.forward(x=x)["c"], expected)
    assert other.load_hdf5(tmp_path / "w.caffemodel.h5") == []
    np.testing.assert_array_equal(other.forward(x=x)["c"], expected)
    third = build_weights_net(3)
    third.copy_from(str(tmp_path / "w.caffemodel.h5"))          # HDF5 found by its contents
    np.testing.assert_array_equal(third.forward(x=x)["c"], expected)
    assert snap.is_hdf5(tmp_path / "w.caffemodel.h5")
    net.save(tmp_path / "w.caffemodel")
    assert not snap.is_hdf5(tmp_path / "w.caffemodel")


def test_hdf5_weights_of_layers_named_with_slashes(tmp_path):
    text = ('name: "slashes" layer { name: "in" type: "Input" top: "x" '
            'input_param { shape { dim: 1 dim: 3 } } }')
    for name, bottom in (("ip/a", "x"), ("ip", "ip/a"), ("ip/b", "ip")):
        text += (f' layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" '
                 f'top: "{name}" inner_product_param {{ num_output: 3 '
                 'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }')
    backend.set_random_seed(1)
    net = owlnet.Net(text, owlnet.TEST)
    net.save_hdf5(tmp_path / "w.h5")
    backend.set_random_seed(2)
    other = owlnet.Net(text, owlnet.TEST)
    other.load_hdf5(tmp_path / "w.h5")
    for name in ("ip/a", "ip", "ip/b"):
        for mine, theirs in zip(other.params[name], net.params[name]):
            np.testing.assert_array_equal(mine.data, theirs.data)


def test_load_hdf5_errors(tmp_path):
    net = build_weights_net(1)
    path = tmp_path / "w.h5"
    net.save_hdf5(path)
    with h5py.File(path, "a") as f:
        del f["data/c/0"]
        f["data/c"].create_dataset("0", data=np.zeros((3, 4), np.float32))
    with pytest.raises(ShapeError, match=r"param 0 of layer 'c': shape \(3, 4\) in the file, "
                                         r"\(3, 5\) in the net"):
        build_weights_net(2).load_hdf5(path)
    assert build_weights_net(2).load_hdf5(path, reinit_mismatched=True) == ["c"]
    net.save_hdf5(path)
    with h5py.File(path, "a") as f:
        del f["data/a/1"]
    with pytest.raises(SnapshotError, match=r"layer 'a' lacks blob 1 \(dataset data/a/1\)"):
        build_weights_net(2).load_hdf5(path)
    net.save_hdf5(path)
    with h5py.File(path, "a") as f:
        f["data/c"].create_dataset("1", data=np.zeros(3, np.float32))
    with pytest.raises(SnapshotError, match="layer 'c' has 2 blobs in the file"):
        build_weights_net(2).copy_from(str(path))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["weights"] = np.zeros(3)
    with pytest.raises(SnapshotError, match="no group 'data'"):
        build_weights_net(2).load_hdf5(tmp_path / "other.h5")
    whole = (tmp_path / "other.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SnapshotError, match="cut.h5"):
        build_weights_net(2).copy_from(str(tmp_path / "cut.h5"))


# -- snapshot_format: HDF5 --------------------------------------------------------------------
SOLVER_NET = """
name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "%s" batch_size: 4 shuffle: true } }
""" + loop.NET[loop.NET.index('layer { name: "ip1"'):]      # test_solver_loop's net after its data layer


@pytest.fixture
def hdf5_net_file(tmp_path):
    """SOLVER_NET reading two small HDF5 files (7 and 5 rows, uint8 labels), shuffled."""
    rng = np.random.default_rng(11)
    for name, rows in (("a.h5", 7), ("b.h5", 5)):
        with h5py.File(tmp_path / name, "w") as f:
            f["data"] = rng.normal(size=(rows, 6)).astype(np.float32)
            f["label"] = rng.integers(0, 3, size=rows).astype(np.uint8)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n{tmp_path / 'b.h5'}\n")
    path = tmp_path / "net.prototxt"
    path.write_text(SOLVER_NET % (tmp_path / "list.txt"))
    return path


@pytest.fixture
def solver_text(hdf5_net_file, tmp_path):
    """test_solver_loop's solver text for SOLVER_NET, snapshot_format HDF5, lr steps."""
    def text(**settings):
        fields = {"snapshot_format": "HDF5", "lr_policy": '"step"', "gamma": 0.5, "stepsize": 2}
        return loop.solver_text(hdf5_net_file, tmp_path, **dict(fields, **settings))
    return text


def test_hdf5_snapshot_files_as_caffe_writes_them(log, solver_text, tmp_path):
    solver = get_solver(solver_text(type='"Adam"'))
    solver.step(3)
    model, state = solver.snapshot()
    assert (model, state) == (str(tmp_path / "snap_iter_3.caffemodel.h5"),
                              str(tmp_path / "snap_iter_3.solverstate.h5"))
    assert f"Snapshotting to HDF5 file {model}" in log.getvalue()
    assert f"Snapshotting solver state to HDF5 file {state}" in log.getvalue()
    with h5py.File(state, "r") as f:
        assert sorted(f) == ["current_step", "history", "iter", "learned_net", "owlnet_resume"]
        for name, value in (("iter", 3), ("current_step", 1)):
            assert f[name].shape == () and f[name].dtype == np.int32 and f[name][()] == value
        string_type = f["learned_net"].id.get_type()
        assert string_type.get_size() == len(model) + 1       # strlen + 1, as H5LT writes it
        assert string_type.get_strpad() == h5py.h5t.STR_NULLTERM
        assert f["learned_net"][()] == model.encode()
        assert sorted(f["history"], key=int) == [str(i) for i in range(8)]   # Adam: m and v
        for i, array in enumerate(solver.rule.history):
            np.testing.assert_array_equal(f["history"][str(i)][()], array)
    with h5py.File(model, "r") as f:
        np.testing.assert_array_equal(f["data/ip2/0"][()], solver.net.params["ip2"][0].data)
    assert snap.find_snapshot(str(tmp_path / "snap"), 1, 3) == state


@pytest.mark.parametrize("settings", [{"type": '"SGD"'},
                                      {"type": '"Adam"', "base_lr": 0.01, "momentum2": 0.99},
                                      {"type": '"Nesterov"', "iter_size": 2,
                                       "snapshot_diff": "true"}])
def test_hdf5_resume_is_bitwise_identical(log, hdf5_net_file, tmp_path, settings):
    """test_solver_loop's resume test (train and test nets, Dropout) on HDF5Data, in HDF5."""
    loop.test_resume_is_bitwise_identical(log, hdf5_net_file, tmp_path,
                                     dict(settings, snapshot_format="HDF5"))
    assert {p.name for p in tmp_path.glob("snap_*")} == {"snap_iter_3.caffemodel.h5",
                                                          "snap_iter_3.solverstate.h5"}


def test_caffe_written_hdf5_state_restores_and_binary_resumes_hdf5_weights(log, solver_text):
    text = solver_text()
    solver = get_solver(text)
    solver.step(2)
    model, state = solver.snapshot()
    with h5py.File(state, "a") as f:                # as Caffe writes it: no owlnet extras
        del f["owlnet_resume"]
    resumed = get_solver(text)
    resumed.restore(state)
    assert resumed.iter == 2
    for a, b in zip(solver.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
    solver.snapshot()
    with h5py.File(state, "a") as f:
        del f["history/1"]
    with pytest.raises(SnapshotError, match="history holds 3 entries but no dataset '1'"):
        get_solver(text).restore(state)
    solver.snapshot()
    os.remove(model)
    with pytest.raises(SnapshotError, match="weights file .*caffemodel.h5 is missing"):
        get_solver(text).restore(state)
    with h5py.File(state, "w") as f:
        f["history/0"] = np.zeros(1)
    with pytest.raises(SnapshotError, match="no dataset 'iter'"):
        get_solver(text).restore(state)
    with open(state, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(SnapshotError, match="cannot read the HDF5 solver state"):
        get_solver(text).restore(state)


def test_hdf5_solve_resume_file(log, solver_text):
    text = solver_text(snapshot=2, max_iter=4)
    straight = get_solver(text.replace("snapshot: 2", "snapshot: 0"))
    straight.step(4)
    stopped = get_solver(text.replace("max_iter: 4", "max_iter: 2"))
    stopped.solve()
    path = snap.find_snapshot(stopped.snapshot_prefix, 1, 2)
    assert path.endswith("_iter_2.solverstate.h5")
    resumed = get_solver(text)
    resumed.solve(resume_file=path)
    for a, b in zip(straight.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)


def test_hdf5_snapshot_format_needs_h5py(log, solver_text, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ConfigError, match=r"needs the h5py package"):
        get_solver(solver_text())


def test_hdf5_data_trains_in_data_parallel_slices(log, solver_text, tmp_path):
    from owlnet import parallel
    net = tmp_path / "net.prototxt"
    net.write_text(net.read_text().replace("dropout_ratio: 0.3", "dropout_ratio: 0"))
    text = solver_text(type='"SGD"').replace('"step"', '"fixed"')
    single = get_solver(text)
    single.step(4)
    split = get_solver(text)
    split.parallel = parallel.DataParallel(split, [None] * 2)
    try:
        split.parallel.synchronize()
        split.step(4)
    finally:
        split.parallel.close()
    for a, b in zip(single.net.learnable_params, split.net.learnable_params):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6)
