"""WindowData on a tiny synthetic window file and images: file parsing, fg/bg sampling,
warp and square crops with context_pad (hand-worked geometry), mirror, mean, resume."""
import cv2
import numpy as np
import pytest

import owlnet.layer_types  # noqa: F401  (registers the layer types)
from gradcheck import forward, make_layer
from owlnet.errors import DataError
from owlnet.layer_types.window_data import read_window_file

rs = np.random.default_rng(23)


@pytest.fixture
def window_setup(tmp_path):
    images = [rs.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(2)]
    for i, img in enumerate(images):
        cv2.imwrite(str(tmp_path / f"im{i}.png"), img)
    text = ("# 0\nim0.png\n3\n20\n24\n3\n"
            "2 0.9 5 5 14 14\n"        # foreground, class 2
            "7 0.1 0 0 9 9\n"          # background (class forced to 0)
            "3 0.4 1 1 4 4\n"          # between thresholds: unused
            "# 1\nim1.png\n3\n20\n24\n1\n"
            "1 0.8 2 6 11 9\n")        # foreground, class 1, 10 wide x 4 high
    (tmp_path / "windows.txt").write_text(text)
    return tmp_path, images


def layer_text(root, extra="", transform="crop_size: 10"):
    return (f'name: "w" type: "WindowData" top: "data" top: "label" '
            f'window_data_param {{ source: "{root}/windows.txt" root_folder: "{root}/" '
            f'batch_size: 4 fg_threshold: 0.5 bg_threshold: 0.3 fg_fraction: 0.5 {extra} }} '
            f'transform_param {{ {transform} }}')


def chw(patch):
    return patch.transpose(2, 0, 1).astype(np.float64)


def test_read_window_file(window_setup):
    root, _ = window_setup
    images = read_window_file(root / "windows.txt", "R/")
    assert [i[0] for i in images] == ["R/im0.png", "R/im1.png"]
    assert images[0][1] == (3, 20, 24)
    assert images[1][2] == [(1, 0.8, 2, 6, 11, 9)]
    (root / "bad.txt").write_text("# 0\nim0.png\n3\n20\n24\n1\n2 0.9 5 5 14\n")
    with pytest.raises(DataError, match=r"bad.txt:7"):
        read_window_file(root / "bad.txt")


def test_sampling_and_warp(window_setup):
    root, images = window_setup
    layer, _, top = make_layer(layer_text(root), [], n_tops=2)
    assert top[0].shape == (4, 3, 10, 10)
    seen_fg = set()
    for _ in range(6):
        data, labels = forward(layer, [], top)
        assert list(labels[:2]) == [0, 0]          # background first
        assert set(labels[2:]) <= {1, 2}
        for k in range(2):                         # the only background window, warped as is
            np.testing.assert_array_equal(data[k], chw(images[0][0:10, 0:10]))
        for k in range(2, 4):
            if labels[k] == 2:                     # 10 x 10 window: no resampling
                np.testing.assert_array_equal(data[k], chw(images[0][5:15, 5:15]))
            else:                                  # 10 x 4 window warped to 10 x 10
                expect = cv2.resize(images[1][6:10, 2:12], (10, 10),
                                    interpolation=cv2.INTER_LINEAR)
                np.testing.assert_array_equal(data[k], chw(expect))
            seen_fg.add(labels[k])
    assert seen_fg == {1, 2}


def test_context_pad_clipping_mirror_and_mean(window_setup):
    root, images = window_setup
    layer, _, top = make_layer(layer_text(root, "context_pad: 2",
                                          "crop_size: 10 mirror: true mean_value: 100 "
                                          "mean_value: 50 mean_value: 0 scale: 0.5"),
                               [], n_tops=2)
    mean = np.array([100.0, 50.0, 0.0]).reshape(3, 1, 1)
    mirrored = set()
    for _ in range(8):
        data, labels = forward(layer, [], top)
        # background window (0,0)-(9,9), scale 10/6: expanded to -3..13, clipped to 0..13
        # (14 px of 17) -> warped to round(14*10/17) = 8 px, offset round(3*10/17) = 2
        patch = chw(cv2.resize(images[0][0:14, 0:14], (8, 8), interpolation=cv2.INTER_LINEAR))
        plain = np.zeros((3, 10, 10))
        plain[:, 2:, 2:] = (patch - mean) * 0.5
        flipped = np.zeros((3, 10, 10))            # mirrored: the padding moves to the right
        flipped[:, 2:, :8] = (patch[:, :, ::-1] - mean) * 0.5
        for k in range(2):
            if np.array_equal(data[k], plain):
                mirrored.add(False)
            else:
                np.testing.assert_array_equal(data[k], flipped)
                mirrored.add(True)
        for k in range(2, 4):
            if labels[k] == 2:                     # (5,5)-(14,14): 2..18, inside the image
                patch = chw(cv2.resize(images[0][2:19, 2:19], (10, 10),
                                       interpolation=cv2.INTER_LINEAR))
                assert (np.array_equal(data[k], (patch - mean) * 0.5)
                        or np.array_equal(data[k], (patch[:, :, ::-1] - mean) * 0.5))
    assert mirrored == {False, True}


def test_square_mode_and_resume(window_setup):
    root, images = window_setup
    text = layer_text(root, 'crop_mode: "square"')
    layer, _, top = make_layer(text, [], n_tops=2)
    for _ in range(6):
        data, labels = forward(layer, [], top)
        for k in range(2, 4):
            if labels[k] == 1:
                # 10 x 4 window (2,6)-(11,9): square half size 5 around (7, 8): x 2..12,
                # y 3..13 (11 x 11, inside) -> warped to 10 x 10
                expect = cv2.resize(images[1][3:14, 2:13], (10, 10),
                                    interpolation=cv2.INTER_LINEAR)
                np.testing.assert_array_equal(data[k], chw(expect))
    state = layer.state()
    following = forward(layer, [], top)
    again, _, top2 = make_layer(text, [], n_tops=2, seed=99)
    again.restore_state(state)
    for a, b in zip(following, forward(again, [], top2)):
        np.testing.assert_array_equal(a, b)
