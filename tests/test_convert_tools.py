"""convert_imageset and compute_image_mean: Caffe's keys, flags, skips and means."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from owlnet.data.datum import datum_to_array, encoded_datum, encode_image, parse_datum
from owlnet.data.db import LMDBReader, LMDBWriter
from owlnet.data.datum import array_to_datum
from owlnet.errors import DataError
from owlnet.fileio import read_mean_binaryproto
from owlnet.tools import convert, mean

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(9)


@pytest.fixture
def image_set(tmp_path):
    """Three PNGs (one a different size), one corrupt file, and a list naming all four."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = {}
    for name, size in (("a.png", (5, 4)), ("b.png", (5, 4)), ("c d.png", (3, 6))):
        image = RNG.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / name), image)
        images[name] = image
    (folder / "bad.png").write_bytes(b"this is not a png")
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 3\nbad.png 1\n\nc d.png 7\nb.png 2\n")
    return folder, listing, images


def records(path):
    with LMDBReader(path) as reader:
        return [(key.decode(), parse_datum(value, key)) for key, value in reader]


def test_raw_conversion_keys_and_skip(image_set, tmp_path, capsys):
    folder, listing, images = image_set
    assert convert.main([f"{folder}/", str(listing), str(tmp_path / "db")]) == 0
    out = capsys.readouterr()
    assert "Processed 3 files; skipped 1." in out.out
    assert "bad.png" in out.err and "list.txt:2" in out.err
    stored = records(tmp_path / "db")
    assert [key for key, _ in stored] == ["00000000_a.png", "00000002_c d.png", "00000003_b.png"]
    for (key, datum), (name, label) in zip(stored, [("a.png", 3), ("c d.png", 7), ("b.png", 2)]):
        assert not datum.encoded and datum.label == label
        assert np.array_equal(datum_to_array(datum, key), images[name].transpose(2, 0, 1))


def test_encoded_resize_and_gray(image_set, tmp_path):
    folder, listing, images = image_set
    assert convert.main([str(folder), str(listing), str(tmp_path / "enc"), "--encoded"]) == 0
    for key, datum in records(tmp_path / "enc"):
        name = key.split("_", 1)[1]
        assert datum.encoded and datum.data == (folder / name).read_bytes()
        assert np.array_equal(datum_to_array(datum, key), images[name].transpose(2, 0, 1))

    assert convert.main([str(folder), str(listing), str(tmp_path / "small"), "--gray",
                         "--resize_height=2", "--resize_width", "3", "--encode_type", "png"]) == 0
    for key, datum in records(tmp_path / "small"):
        name = key.split("_", 1)[1]
        gray = cv2.imread(str(folder / name), cv2.IMREAD_GRAYSCALE)
        expect = cv2.resize(gray, (3, 2), interpolation=cv2.INTER_LINEAR)
        assert datum.encoded and np.array_equal(datum_to_array(datum, key)[0], expect)

    assert convert.main([str(folder), str(listing), str(tmp_path / "raw"), "-gray=true",
                         "--resize_height=4", "--resize_width=4", "--check_size"]) == 0
    for key, datum in records(tmp_path / "raw"):
        assert (datum.channels, datum.height, datum.width) == (1, 4, 4)


def test_shuffle_is_a_permutation_with_positional_keys(image_set, tmp_path):
    folder, listing, _ = image_set
    assert convert.main([str(folder), str(listing), str(tmp_path / "db"), "--shuffle",
                         "--seed", "4"]) == 0
    stored = records(tmp_path / "db")
    assert sorted(key.split("_", 1)[1] for key, _ in stored) == ["a.png", "b.png", "c d.png"]
    assert all(key[:8].isdigit() and key[8] == "_" for key, _ in stored)


def test_conversion_errors(image_set, tmp_path, capsys):
    folder, listing, _ = image_set
    assert convert.main([str(folder), str(tmp_path / "nolist.txt"), str(tmp_path / "x")]) == 1
    assert "nolist.txt" in capsys.readouterr().err
    listing.write_text("a.png 0\nb.png\n")
    assert convert.main([str(folder), str(listing), str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert "list.txt:2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()
    listing.write_text("a.png 0\nc d.png 1\n")
    assert convert.main([str(folder), str(listing), str(tmp_path / "z"), "--check_size"]) == 1
    assert "list.txt:2" in capsys.readouterr().err
    assert convert.main([str(folder), str(listing), str(tmp_path / "w"), "--backend",
                         "leveldb"]) == 1
    assert "only lmdb" in capsys.readouterr().err
    assert convert.main([str(folder), str(listing), str(tmp_path / "z")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert convert.main([str(folder), str(listing), str(tmp_path / "v"), "--encode_type",
                         "nope"]) == 1
    assert "nope" in capsys.readouterr().err


def test_compute_image_mean_equals_numpy(tmp_path, capsys):
    images = RNG.integers(0, 256, size=(7, 3, 4, 5), dtype=np.uint8)
    with LMDBWriter(tmp_path / "db") as writer:
        for i, image in enumerate(images):
            writer.put(b"%08d" % i, array_to_datum(image, i).SerializeToString())
    out_file, npy = tmp_path / "mean.binaryproto", tmp_path / "mean.npy"
    assert mean.main([str(tmp_path / "db"), str(out_file), "--npy", str(npy),
                      "--threads", "2"]) == 0
    expect = images.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(read_mean_binaryproto(out_file), expect, rtol=1e-6)
    np.testing.assert_allclose(np.load(npy), expect, rtol=1e-6)
    printed = capsys.readouterr().out
    assert "Number of channels: 3" in printed
    for c in range(3):
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"mean_value channel [{c}]:"))
        assert abs(float(line.split(":")[1]) - expect[c].mean()) < 1e-9


def test_compute_image_mean_of_encoded_records_and_errors(tmp_path, capsys):
    images = RNG.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    with LMDBWriter(tmp_path / "enc") as writer:
        for i, image in enumerate(images):
            writer.put(b"%08d" % i, encoded_datum(encode_image(image, "png"), 0).SerializeToString())
    assert mean.main([str(tmp_path / "enc")]) == 0
    assert "mean_value channel [2]:" in capsys.readouterr().out
    computed = mean.compute_mean(str(tmp_path / "enc"))
    np.testing.assert_allclose(computed, images.astype(np.float64).mean(0).transpose(2, 0, 1))

    with LMDBWriter(tmp_path / "mixed") as writer:
        writer.put(b"k0", array_to_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString())
        writer.put(b"k1", array_to_datum(np.zeros((1, 3, 2), np.uint8)).SerializeToString())
        writer.put(b"k2", b"\xff\xff")
    assert mean.main([str(tmp_path / "mixed")]) == 1
    err = capsys.readouterr().err
    assert "k1" in err or "k2" in err
    assert mean.main([str(tmp_path / "absent")]) == 1
    assert "absent" in capsys.readouterr().err


def test_wrapper_scripts_run(image_set, tmp_path):
    folder, listing, _ = image_set
    db = tmp_path / "db"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_imageset.py"),
                           str(folder), str(listing), str(db)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "compute_image_mean.py"), str(db),
                           str(tmp_path / "m.binaryproto")], capture_output=True, text=True)
    assert done.returncode == 1 and "all records need one size" in done.stderr


def test_list_paths_stay_inside_the_root_folder(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "list.txt").write_text("a.png 0\n../secret.png 1\n")
    with pytest.raises(DataError, match=r"list\.txt:2: path '\.\./secret\.png' leads outside"):
        convert.convert(convert.build_parser().parse_args(
            [str(root), str(tmp_path / "list.txt"), str(tmp_path / "db")]))
