"""owlnet.io (pycaffe's caffe.io): image loading and resizing on pycaffe's conventions, the
Transformer, oversampling, BlobProto and Datum conversions.

Expected values are computed here independently (by hand, or by scikit-image where it is
installed, which is what pycaffe itself calls).
"""
import cv2
import numpy as np
import pytest

from owlnet import io
from owlnet.errors import OwlnetError
from owlnet.proto import caffe_pb2


# -- load_image -------------------------------------------------------------------------------
def test_load_image_is_rgb_float_in_unit_range(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "im.png"), rgb[:, :, ::-1])          # OpenCV writes BGR
    image = io.load_image(tmp_path / "im.png")
    assert image.dtype == np.float32 and image.shape == (5, 7, 3)
    np.testing.assert_array_equal(image, (rgb / 255.0).astype(np.float32))
    grey = io.load_image(tmp_path / "im.png", color=False)
    assert grey.shape == (5, 7, 1)
    expected = (rgb / 255.0) @ np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_allclose(grey[:, :, 0], expected, rtol=1e-6)


def test_load_image_grey_alpha_and_16_bit(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    image = io.load_image(tmp_path / "g.png")
    assert image.shape == (4, 6, 3)
    np.testing.assert_array_equal(image[:, :, 1], grey / np.float32(255))
    bgra = rng.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    np.testing.assert_array_equal(io.load_image(tmp_path / "a.png"),
                                  (bgra[:, :, 2::-1] / 255.0).astype(np.float32))
    rgb = bgra[:, :, 2::-1] / 255.0
    alpha = bgra[:, :, 3:] / 255.0
    over_white = (rgb * alpha + 1 - alpha) @ np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_allclose(io.load_image(tmp_path / "a.png", color=False)[:, :, 0],
                               over_white, rtol=1e-6)
    deep = rng.integers(0, 65536, (3, 3, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    np.testing.assert_allclose(io.load_image(tmp_path / "d.png"), deep[:, :, ::-1] / 65535.0,
                               rtol=1e-6)


def test_load_image_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(Exception, match="nothere.jpg"):
        io.load_image(tmp_path / "nothere.jpg")


# -- resize_image -----------------------------------------------------------------------------
def test_resize_up_by_hand():
    """2x bilinear up-sampling: output pixel i samples (i + 0.5) / 2 - 0.5, zero beyond the
    border, on the image stretched to [0, 1] by its min and max."""
    im = np.array([[0.0, 4.0], [8.0, 12.0]])[:, :, np.newaxis] + 10      # values 10..22
    out = io.resize_image(im, (4, 4))[:, :, 0]
    unit = (im[:, :, 0] - 10) / 12
    weights = np.array([[0.75, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 0.75]])  # row i: w0, w1
    expected = weights @ unit @ weights.T * 12 + 10
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out[0, 0] < im.min() + 12 * 0.75 * 0.75 + 1e-6       # the border leans to the min


def test_resize_of_a_constant_image_and_of_many_channels():
    np.testing.assert_array_equal(io.resize_image(np.full((3, 5, 3), 7.0), (6, 2)),
                                  np.full((6, 2, 3), 7.0, dtype=np.float32))
    im = np.random.default_rng(2).random((3, 4, 5))
    out = io.resize_image(im, (5, 7))                        # corners map to corners
    assert out.shape == (5, 7, 5)
    for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        np.testing.assert_allclose(out[y, x], im[y, x], rtol=1e-6)
    np.testing.assert_allclose(out[1, 0], (im[0, 0] + im[1, 0]) / 2, rtol=1e-6)   # row 0.5
    np.testing.assert_allclose(out[2, 0], im[1, 0], rtol=1e-6)                     # row 1


@pytest.mark.parametrize("shape, dims", [((37, 53, 3), (227, 227)), ((360, 480, 3), (227, 227)),
                                         ((20, 30, 1), (7, 50)), ((100, 80, 3), (31, 29))])
def test_resize_matches_scikit_image_as_pycaffe_calls_it(shape, dims):
    transform = pytest.importorskip("skimage.transform")
    im = np.random.default_rng(3).random(shape).astype(np.float32) * 255
    low, high = im.min(), im.max()
    expected = transform.resize((im - low) / (high - low), dims, order=1,
                                mode="constant") * (high - low) + low
    np.testing.assert_allclose(io.resize_image(im, dims), expected, atol=1e-3)   # 1/255 level


def test_resize_other_orders_are_refused():
    with pytest.raises(ValueError, match="interp_order"):
        io.resize_image(np.zeros((4, 4, 3)), (2, 2), interp_order=3)


# -- Transformer and oversample ---------------------------------------------------------------
def make_transformer():
    t = io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    return t


def test_transformer_preprocess_in_pycaffe_order_and_back():
    image = np.random.default_rng(4).random((4, 5, 3)).astype(np.float32)
    t = make_transformer()
    out = t.preprocess("data", image)
    expected = (image.transpose(2, 0, 1)[[2, 1, 0]] * 255
                - np.array([10.0, 20.0, 30.0])[:, None, None]) * 0.5
    assert out.shape == (3, 4, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(t.deprocess("data", out[np.newaxis]), image, rtol=1e-5, atol=1e-6)
    image_copy = image.copy()
    t.preprocess("data", image)
    np.testing.assert_array_equal(image, image_copy)          # the input is left alone


def test_transformer_resizes_to_the_blob():
    t = io.Transformer({"data": (1, 3, 6, 6)})
    t.set_transpose("data", (2, 0, 1))
    image = np.random.default_rng(5).random((3, 3, 3))
    np.testing.assert_allclose(t.preprocess("data", image),
                               io.resize_image(image.astype(np.float32), (6, 6)).transpose(2, 0, 1))


def test_transformer_rejects_wrong_settings():
    t = io.Transformer({"data": (1, 3, 4, 5)})
    for call, args in [(t.set_mean, (np.zeros(4),)), (t.set_mean, (np.zeros((3, 4, 4)),)),
                       (t.set_transpose, ((1, 0),)), (t.set_channel_swap, ((1, 0),))]:
        with pytest.raises(ValueError):
            call("data", *args)
    with pytest.raises(ValueError, match="not one of the net inputs"):
        t.preprocess("label", np.zeros((4, 5, 3)))
    t.set_mean("data", np.ones((3, 4, 5)))             # a whole mean image fits


def test_oversample_corners_centre_and_mirrors():
    image = np.arange(6 * 8 * 2, dtype=np.float32).reshape(6, 8, 2)
    crops = io.oversample([image, image + 1000], (4, 4))
    assert crops.shape == (20, 4, 4, 2)
    starts = [(0, 0), (0, 4), (2, 0), (2, 4), (1, 2)]
    for k, (y, x) in enumerate(starts):
        np.testing.assert_array_equal(crops[k], image[y:y + 4, x:x + 4])
        np.testing.assert_array_equal(crops[5 + k], image[y:y + 4, x:x + 4][:, ::-1])
        np.testing.assert_array_equal(crops[10 + k], image[y:y + 4, x:x + 4] + 1000)


# -- records ----------------------------------------------------------------------------------
def test_blobproto_shapes_as_pycaffe():
    blob = caffe_pb2.BlobProto()
    blob.data.extend(range(6))
    with pytest.raises(ValueError):
        io.blobproto_to_array(blob)                    # no shape, several values
    blob.shape.dim.extend([2, 3])
    np.testing.assert_array_equal(io.blobproto_to_array(blob), np.arange(6).reshape(2, 3))
    scalar = caffe_pb2.BlobProto()
    scalar.data.append(123)
    assert io.blobproto_to_array(scalar) == 123 and io.blobproto_to_array(scalar).shape == ()
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3)
    legacy.data.extend(range(6))
    legacy.diff.extend(range(6, 12))
    assert io.blobproto_to_array(legacy).shape == (1, 1, 2, 3)
    np.testing.assert_array_equal(io.blobproto_to_array(legacy, return_diff=True).ravel(),
                                  range(6, 12))


def test_blobproto_and_vector_round_trips():
    arrays = [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.ones(5, dtype=np.float32)]
    proto = io.array_to_blobproto(arrays[0], diff=arrays[0] * 2)
    np.testing.assert_array_equal(io.blobproto_to_array(proto), arrays[0])
    np.testing.assert_array_equal(io.blobproto_to_array(proto, return_diff=True), arrays[0] * 2)
    back = io.blobprotovector_str_to_arraylist(io.arraylist_to_blobprotovector_str(arrays))
    for mine, theirs in zip(back, arrays):
        np.testing.assert_array_equal(mine, theirs)


def test_datum_round_trips_and_optional_label():
    image = np.random.default_rng(6).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    labelled = io.array_to_datum(image, label=7)
    unlabelled = io.array_to_datum(image)
    assert labelled.label == 7 and not unlabelled.HasField("label")
    assert len(unlabelled.SerializeToString()) < len(labelled.SerializeToString())
    np.testing.assert_array_equal(io.datum_to_array(labelled), image)
    floats = image.astype(np.float32) / 3
    np.testing.assert_array_equal(io.datum_to_array(io.array_to_datum(floats)), floats)


def test_array_to_datum_refuses_other_than_3d_as_pycaffe_does():
    # pycaffe raises ValueError('Incorrect array shape.'); scripts catch ValueError
    with pytest.raises(ValueError, match=r"\(4, 5\)") as raised:
        io.array_to_datum(np.zeros((4, 5), dtype=np.uint8))
    assert isinstance(raised.value, OwlnetError)


def test_resize_order_refusal_is_an_owlnet_error():
    with pytest.raises(OwlnetError, match="interp_order"):
        io.resize_image(np.zeros((4, 4, 3)), (2, 2), interp_order=0)
