"""Bad input never crashes: mutated prototxt and corrupt binary files end in an OwlnetError.

Property tests (hypothesis, derandomized so CI sees the same cases every run) mutate the real
Caffe files under ../shared/caffe-zoo token by token and corrupt (truncate, flip bits in) the
binary files owlnet reads: .caffemodel, .solverstate, binaryproto means and Datum records.
Each case must either succeed or raise an ``owlnet.errors.OwlnetError`` with a message; any
other exception is a bug. Also here: untrusted files are data, not code (no pickle, size limits
checked before allocating, LMDB opened read-only, list paths confined to their root).
"""
import collections
import os
import re
import resource
import shutil
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import owlnet
from owlnet import config, fileio
from owlnet import logging as owl_logging
from owlnet.blob import Blob
from owlnet.data.datum import array_to_datum, datum_to_array, encode_image, encoded_datum, parse_datum
from owlnet.data.db import LMDBReader, LMDBWriter
from owlnet.errors import DataError, OwlnetError, ShapeError, SnapshotError
from owlnet.proto import caffe_pb2
from owlnet.solver import get_solver

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT.parent / "shared" / "caffe-zoo"
DATA_TYPES = {"Data", "ImageData", "WindowData", "HDF5Data", "MemoryData"}
IMAGE_SHAPES = {"mnist": (1, 28, 28), "siamese": (2, 28, 28), "cifar10": (3, 32, 32)}
# Small nets are mutated and built; the big ones are mutated and parsed (and filtered) only.
SMALL_NETS = ["examples/mnist/lenet_train_test.prototxt", "examples/mnist/lenet.prototxt",
              "examples/mnist/mnist_autoencoder.prototxt",
              "examples/cifar10/cifar10_quick_train_test.prototxt",
              "examples/cifar10/cifar10_full_train_test.prototxt",
              "examples/siamese/mnist_siamese_train_test.prototxt"]
BIG_NETS = ["models/bvlc_googlenet/train_val.prototxt", "models/bvlc_alexnet/train_val.prototxt",
            "models/bvlc_reference_caffenet/deploy.prototxt"]
SOLVERS = ["examples/mnist/lenet_solver.prototxt", "examples/cifar10/cifar10_full_solver.prototxt",
           "models/bvlc_googlenet/solver.prototxt"]
# Blobs are capped low while fuzzing so a mutated size is refused quickly and cheaply.
FUZZ_BLOB_LIMIT = 1 << 22
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASES = collections.Counter()       # property -> (cases run, cases refused with OwlnetError)

pytestmark = pytest.mark.skipif(not ZOO.is_dir(), reason=f"{ZOO} is not present")


@pytest.fixture(scope="module", autouse=True)
def low_blob_limit():
    old = os.environ.get("OWLNET_MAX_BLOB_ELEMENTS")
    os.environ["OWLNET_MAX_BLOB_ELEMENTS"] = str(FUZZ_BLOB_LIMIT)
    yield
    if old is None:
        del os.environ["OWLNET_MAX_BLOB_ELEMENTS"]
    else:
        os.environ["OWLNET_MAX_BLOB_ELEMENTS"] = old
    for name in sorted({k[0] for k in CASES}):
        print(f"\nfuzz {name}: {CASES[name, 'run']} cases, {CASES[name, 'refused']} refused "
              f"with an OwlnetError, the rest accepted")


def outcome(name, action):
    """Run ``action``; an OwlnetError (with a message) is a fine refusal, anything else fails."""
    CASES[name, "run"] += 1
    try:
        action()
    except OwlnetError as exc:
        CASES[name, "refused"] += 1
        assert str(exc).strip(), f"{type(exc).__name__} with an empty message"


# -- prototxt mutations ----------------------------------------------------------------------
TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*|[A-Za-z_][\w.]*|'
                   r'[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\S')
ODD_VALUES = ["0", "-1", "-7", "1", "3", "2147483648", "4294967296", "9223372036854775808",
              "99999999999999999999999", "1e308", "-1e308", "nan", "inf", "0.5", "-0.0",
              '"x"', '""', "TRUE", "LMDB", "MAX", "{", "}", ":", "layer", "top", '"data"']
MUTATIONS = ("delete", "duplicate", "swap", "odd_value", "blob_name", "delete_line", "insert")


def tokens_of(text):
    return [m for m in TOKEN.findall(text) if not m.startswith("#")]


def mutate(text, steps):
    """Apply token mutations to prototxt ``text``: each step is (kind, position, choice)."""
    tokens = tokens_of(text)
    names = sorted({t for t in tokens if t.startswith('"')}) or ['"data"']
    for kind, position, choice in steps:
        i = position % len(tokens)
        if kind == "delete":
            del tokens[i]
        elif kind == "duplicate":
            tokens.insert(i, tokens[i])
        elif kind == "swap":
            j = choice % len(tokens)
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == "odd_value":
            numbers = [k for k, t in enumerate(tokens) if t[0].isdigit() or t[0] in "-+."]
            tokens[numbers[i % len(numbers)] if numbers else i] = ODD_VALUES[choice % len(ODD_VALUES)]
        elif kind == "blob_name":        # missing blobs, cycles, a top produced twice
            strings = [k for k, t in enumerate(tokens) if t.startswith('"')]
            if strings:
                tokens[strings[i % len(strings)]] = (names + ['"nowhere"'])[choice % (len(names) + 1)]
        elif kind == "delete_line":
            k = i
            while k < len(tokens) and tokens[k] not in ("{", "}") and not tokens[k].endswith(":"):
                k += 1
            del tokens[i:k + 2]
        else:
            tokens.insert(i, ODD_VALUES[choice % len(ODD_VALUES)])
        if not tokens:
            tokens = ["}"]
    return " ".join(tokens)


steps_strategy = st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 1 << 20),
                                    st.integers(0, 1 << 20)), min_size=1, max_size=4)


def swap_data_layers(param, image_shape, batch=2):
    """Data layers replaced by Input layers of the shapes they would give (no LMDB needed)."""
    c, h, w = image_shape
    for layer in param.layer:
        if layer.type not in DATA_TYPES:
            continue
        crop = layer.transform_param.crop_size
        layer.type = "Input"
        for field in ("data_param", "image_data_param", "transform_param", "memory_data_param"):
            layer.ClearField(field)
        layer.input_param.shape.add().dim.extend((batch, c, crop or h, crop or w))
        for _ in layer.top[1:]:
            layer.input_param.shape.add().dim.append(batch)
    return param


_texts = {}


def zoo_text(name):
    if name not in _texts:
        _texts[name] = (ZOO / name).read_text()
    return _texts[name]


@settings(FUZZ, max_examples=300)
@given(name=st.sampled_from(SMALL_NETS), steps=steps_strategy,
       phase=st.sampled_from([owlnet.TRAIN, owlnet.TEST]))
def test_mutated_small_nets_build_or_raise_owlnet_errors(name, steps, phase):
    text = mutate(zoo_text(name), steps)
    image_shape = IMAGE_SHAPES[Path(name).parent.name]

    def build():
        param, _ = config.read_net(text)
        stages = ("test-on-test",) if "autoencoder" in name else ()
        owlnet.Net(swap_data_layers(param, image_shape), phase, stages=stages)
    outcome("prototxt build (lenet, cifar10, siamese, autoencoder)", build)


@settings(FUZZ, max_examples=200)
@given(name=st.sampled_from(BIG_NETS + SOLVERS), steps=steps_strategy)
def test_mutated_big_nets_and_solvers_parse_or_raise_owlnet_errors(name, steps):
    text = mutate(zoo_text(name), steps)

    def parse():
        if "solver" in name:
            config.read_solver(text)
            return
        param, source = config.read_net(text)
        for phase in (owlnet.TRAIN, owlnet.TEST):
            config.filter_net(param, config.make_state(param, phase), source)
    outcome("prototxt parse (googlenet, alexnet, caffenet, solvers)", parse)


def test_mutations_reach_every_kind_of_error():
    """The mutator makes parse errors, shape errors and missing blobs, not just one kind."""
    text = zoo_text("examples/mnist/lenet_train_test.prototxt")
    seen = set()
    for kind in MUTATIONS:
        for position in range(0, 400, 7):
            try:
                param, _ = config.read_net(mutate(text, [(kind, position, position // 7)]))
                owlnet.Net(swap_data_layers(param, (1, 28, 28)), owlnet.TRAIN)
            except OwlnetError as exc:
                seen.add(type(exc).__name__)
    assert {"ConfigError", "ShapeError"} <= seen


# -- corrupt binary files --------------------------------------------------------------------
def corrupt(payload: bytes, cut, flips):
    """``payload`` truncated to ``cut`` bytes (None: whole) with bits flipped at ``flips``."""
    data = bytearray(payload if cut is None else payload[:cut % (len(payload) + 1)])
    for position in flips:
        if data:
            data[(position >> 3) % len(data)] ^= 1 << (position & 7)
    return bytes(data)


corruption = st.tuples(st.one_of(st.none(), st.integers(0, 1 << 24)),
                       st.lists(st.integers(0, 1 << 27), max_size=6))

SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 2 dim: 6 dim: 5 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


class Files(dict):
    """The fixture's files (a short repr keeps hypothesis' failure reports readable)."""

    def __repr__(self):
        return "files"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real files to corrupt: caffemodels, a solverstate with history, a mean, Datums."""
    folder = tmp_path_factory.mktemp("fuzz")
    small = owlnet.Net(SMALL_NET, owlnet.TRAIN)
    small.save(folder / "small.caffemodel")
    lenet = owlnet.Net(str(ZOO / "examples/mnist/lenet.prototxt"), owlnet.TEST)
    lenet.save(folder / "lenet.caffemodel")
    train_net = SMALL_NET.replace(
        'type: "Input" top: "data" top: "label"\n  input_param { shape { dim: 2 dim: 2 dim: 6 '
        'dim: 5 } shape { dim: 2 } }',
        'type: "DummyData" top: "data" top: "label" dummy_data_param { shape { dim: 2 dim: 2 '
        'dim: 6 dim: 5 } shape { dim: 2 } data_filler { type: "constant" value: 1 } }')
    solver_text = (f'train_net_param {{ {train_net} }} base_lr: 0.01 lr_policy: "fixed" '
                   f'type: "Adam" max_iter: 2 snapshot_prefix: "{folder}/s" random_seed: 1')
    handlers = list(owl_logging.logger.handlers)
    solver = get_solver(solver_text)
    solver.step(1)
    _, state_path = solver.snapshot()
    for handler in list(owl_logging.logger.handlers):    # leave the log as later tests expect
        if handler not in handlers:
            owl_logging.logger.removeHandler(handler)
    fileio.write_mean_binaryproto(folder / "mean.binaryproto",
                              np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5))
    image = (np.arange(3 * 12 * 10) % 251).astype(np.uint8).reshape(12, 10, 3)
    datums = {
        "raw": array_to_datum(image.transpose(2, 0, 1), 3).SerializeToString(),
        "float": array_to_datum(image.transpose(2, 0, 1).astype(np.float32), 1).SerializeToString(),
        "png": encoded_datum(encode_image(image, "png"), 2).SerializeToString(),
        "jpg": encoded_datum(encode_image(image, "jpg"), 4).SerializeToString(),
    }
    return Files({"folder": folder, "small": small, "lenet": lenet, "solver": solver,
            "solverstate": Path(state_path).read_bytes(), "datums": datums,
            "small.caffemodel": (folder / "small.caffemodel").read_bytes(),
            "lenet.caffemodel": (folder / "lenet.caffemodel").read_bytes(),
            "mean": (folder / "mean.binaryproto").read_bytes()})


def write_case(files, name, payload):
    path = files["folder"] / name
    path.write_bytes(payload)
    return path


@FUZZ
@given(case=corruption)
def test_corrupt_small_caffemodel(files, case):
    path = write_case(files, "case.caffemodel", corrupt(files["small.caffemodel"], *case))
    outcome("caffemodel (small net)", lambda: files["small"].copy_from(path))


@settings(FUZZ, max_examples=40)
@given(case=corruption)
def test_corrupt_lenet_caffemodel(files, case):
    path = write_case(files, "case.caffemodel", corrupt(files["lenet.caffemodel"], *case))
    outcome("caffemodel (lenet)", lambda: files["lenet"].copy_from(path))


@FUZZ
@given(case=corruption)
def test_corrupt_solverstate(files, case):
    path = write_case(files, "case.solverstate", corrupt(files["solverstate"], *case))
    outcome("solverstate", lambda: files["solver"].restore(path))


@FUZZ
@given(case=corruption)
def test_corrupt_mean_binaryproto(files, case):
    path = write_case(files, "case.binaryproto", corrupt(files["mean"], *case))
    outcome("binaryproto mean", lambda: fileio.read_mean_binaryproto(path))


@settings(FUZZ, max_examples=300)
@given(kind=st.sampled_from(["raw", "float", "png", "jpg"]), case=corruption)
def test_corrupt_datum(files, kind, case):
    raw = corrupt(files["datums"][kind], *case)
    key = f"{kind}-{len(raw):06d}".encode()

    def decode():
        try:
            datum_to_array(parse_datum(raw, key), key)
        except DataError as exc:
            assert key.decode() in str(exc), str(exc)
            raise
    outcome("Datum", decode)


@pytest.mark.parametrize("resume", [
    b'{"rng": 1, "train_data": {}, "test_data": []}',
    b'{"rng": {"bit_generator": "PCG64"}, "train_data": [], "test_data": 5}',
    b'{"rng": {"bit_generator": "PCG64"}, "train_data": {"data": 3}, "test_data": []}',
    b'[1, 2]', b'\xff\xfe', b'{"learned_net_bytes": "many"}'])
def test_hostile_resume_state(files, tmp_path, resume):
    state = caffe_pb2.SolverState()
    state.ParseFromString(files["solverstate"])
    state.owlnet_resume = resume
    path = tmp_path / "hostile.solverstate"
    path.write_bytes(state.SerializeToString())
    with pytest.raises(SnapshotError, match="hostile.solverstate"):
        files["solver"].restore(path)


# -- untrusted files are data, not code --------------------------------------------------------
def test_no_pickle_in_the_package():
    offenders = []
    for path in sorted((ROOT / "owlnet").rglob("*.py")):
        if "proto" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bpickle\b|allow_pickle\s*=\s*True|\bmarshal\b|\bshelve\b", code) \
                    and "allow_pickle=False" not in code:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
            if re.search(r"\b(eval|exec)\(", code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_declared_blob_in_caffemodel_is_refused_before_allocating(tmp_path, files):
    param = caffe_pb2.NetParameter()
    layer = param.layer.add(name="ip", type="InnerProduct")
    layer.blobs.add().shape.dim.extend([10 ** 6, 10 ** 6])         # 10^12 elements, no data
    layer.blobs.add().shape.dim.extend([4])
    path = tmp_path / "huge.caffemodel"
    path.write_bytes(param.SerializeToString())
    before = peak_rss_mib()
    with pytest.raises(SnapshotError, match=r"1000000000000 elements, over the limit"):
        files["small"].copy_from(path)
    assert peak_rss_mib() - before < 64


@pytest.mark.parametrize("layer", [
    'type: "Input" top: "x" input_param { shape { dim: 100000 dim: 100000 dim: 100000 } }',
    'type: "DummyData" top: "x" dummy_data_param { shape { dim: 1000000 dim: 3 dim: 1000 '
    'dim: 1000 } }',
    'type: "Input" top: "x" input_param { shape { dim: 1 dim: 8 } } } layer { name: "ip" '
    'type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 4000000000 }'])
def test_net_refuses_blobs_over_the_limit_before_allocating(layer):
    before = peak_rss_mib()
    with pytest.raises(ShapeError, match="over the limit"):
        owlnet.Net(f'layer {{ name: "l" {layer} }}', owlnet.TEST)
    assert peak_rss_mib() - before < 64


def test_blob_limit_follows_the_environment(monkeypatch):
    monkeypatch.setenv("OWLNET_MAX_BLOB_ELEMENTS", "100")
    Blob((10, 10))
    with pytest.raises(ShapeError, match="over the limit of 100"):
        Blob((10, 11))
    monkeypatch.setenv("OWLNET_MAX_BLOB_ELEMENTS", "lots")
    with pytest.raises(OwlnetError, match="not an integer"):
        Blob((2,))
    monkeypatch.delenv("OWLNET_MAX_BLOB_ELEMENTS")
    assert fileio.max_blob_elements() == fileio.MAX_BLOB_ELEMENTS == 2 ** 31


def test_lmdb_reader_opens_a_read_only_copy_without_locks(tmp_path):
    source = tmp_path / "db"
    with LMDBWriter(str(source)) as db:
        for i in range(5):
            db.put(f"{i:03d}".encode(), array_to_datum(np.full((1, 2, 2), i, np.uint8)).SerializeToString())
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(source / "data.mdb", copy / "data.mdb")          # no lock.mdb beside it
    before = (copy / "data.mdb").read_bytes()
    os.chmod(copy / "data.mdb", 0o444)
    os.chmod(copy, 0o555)
    try:
        with LMDBReader(str(copy)) as reader:
            flags = reader._env.flags()
            assert flags["readonly"] and not flags["lock"]
            assert [datum_to_array(parse_datum(v, k))[0, 0, 0] for k, v in reader] == list(range(5))
            with pytest.raises(lmdb.Error):          # the environment itself refuses writes
                with reader._env.begin(write=True) as txn:
                    txn.put(b"x", b"y")
        assert sorted(p.name for p in copy.iterdir()) == ["data.mdb"]
        assert (copy / "data.mdb").read_bytes() == before
    finally:
        os.chmod(copy, 0o755)


def test_list_file_paths_stay_inside_root_folder(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    image = np.full((4, 4, 3), 7, np.uint8)
    cv2.imwrite(str(root / "sub" / "ok.png"), image)
    cv2.imwrite(str(tmp_path / "secret.png"), image)

    def layer_for(lines, root_folder):
        (tmp_path / "list.txt").write_text(lines)
        root_field = f'root_folder: "{root_folder}/"' if root_folder else ""
        return owlnet.Net(f'layer {{ name: "d" type: "ImageData" top: "x" top: "y" '
                          f'image_data_param {{ source: "{tmp_path}/list.txt" {root_field} '
                          f'batch_size: 1 }} }}', owlnet.TEST)
    for bad in ("../secret.png 0", "sub/../../secret.png 0", f"{tmp_path}/secret.png 0"):
        with pytest.raises(DataError, match=r"list\.txt:2.*outside root folder"):
            layer_for(f"sub/ok.png 1\n{bad}\n", root)
    net = layer_for("sub/ok.png 1\nsub/./ok.png 2\n", root)
    assert net.forward()["y"].tolist() == [1.0]
    # Without a root_folder the list names files itself, as in Caffe ("unless asked otherwise").
    net = layer_for(f"{tmp_path}/secret.png 5\n", None)
    assert net.forward()["y"].tolist() == [5.0]
