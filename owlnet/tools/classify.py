"""Top-k classes of images with a deploy net and its weights (`owlnet classify`).

    owlnet classify DEPLOY WEIGHTS IMAGE... [--mean FILE | --mean-value B,G,R] [--scale S]
        [--raw-scale R] [--channel-swap 2,1,0] [--labels FILE] [--multiview] [--top K]
        [--image-dims H,W] [--gpu IDX]

Prints the top-k classes with their probabilities for each image, preparing images as
pycaffe's ``Classifier`` does: an image is loaded as RGB floats in [0, 1] (grey when the net
has one input channel), resized bilinearly to ``--image-dims`` and cut to the net's input
size: the centre window, or with ``--multiview`` the 10 views of owlnet.views (pycaffe's
``oversample``). Without ``--image-dims`` a single view resizes to the input size itself
(pycaffe's default) and ``--multiview`` resizes to 256 x 256 (pycaffe's classify.py default).
Each input then becomes, channel by channel,

    x' = (swap(x) * raw_scale - mean) * scale

where ``swap`` reorders the channels (``--channel-swap``, default 2,1,0: RGB -> BGR, for
3-channel nets) and ``mean`` is per-channel (``--mean-value``) or a mean image
(``--mean``: a binaryproto or .npy file of C x H x W; an image of another size than the
input is reduced to its per-channel means). The probabilities are the first Softmax layer's
top (or the softmax of the net's first output when it has none), averaged over the views.
"""
from __future__ import annotations

import argparse
import sys

import cv2
import numpy as np

from .. import backend
from .. import logging as owl_logging
from ..data.datum import load_image
from . import add_python_layers_flag, device, run_command
from .flags import FlagParser
from ..errors import ConfigError, DataError
from ..fileio import read_mean_binaryproto
from ..net import TEST, Net
from ..views import VIEWS, centre_view, ten_views
from .test import probabilities

DEFAULT_IMAGE_DIMS = (256, 256)


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def build_parser() -> FlagParser:
    p = FlagParser(prog="owlnet classify", description=__doc__.splitlines()[0])
    p.add_argument("deploy", help="deploy prototxt (an Input layer feeds the images)")
    p.add_argument("weights", help="trained .caffemodel")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    mean = p.add_mutually_exclusive_group()
    mean.add_argument("--mean", metavar="FILE", help="mean image (.binaryproto or .npy)")
    mean.add_argument("--mean-value", type=float_list, metavar="B,G,R",
                      help="per-channel mean, in the net's channel order")
    p.add_argument("--scale", type=float, default=1.0, metavar="S",
                   help="input scale, applied after the mean (default 1)")
    p.add_argument("--raw-scale", type=float, default=255.0, metavar="R",
                   help="scale of the [0, 1] pixels, before the mean (default 255)")
    p.add_argument("--channel-swap", type=int_list, metavar="2,1,0",
                   help="channel order of the net's input from RGB (default 2,1,0 for "
                        "3-channel nets)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line")
    p.add_argument("--multiview", action="store_true",
                   help="average over 10 views (corners, centre, mirrored)")
    p.add_argument("--image-dims", type=int_list, metavar="H,W",
                   help="size images are resized to before cropping (default: the net's input "
                        "size; 256,256 with --multiview)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="classes to show (default 5)")
    device.add_device_flags(p)
    add_python_layers_flag(p)
    return p


class Preprocessor:
    """Turns H x W x C RGB images in [0, 1] into the net's C x h x w inputs (see the module)."""

    def __init__(self, input_shape, raw_scale=255.0, scale=1.0, channel_swap=None,
                 mean=None):
        self.channels, self.height, self.width = input_shape
        self.raw_scale, self.scale = float(raw_scale), float(scale)
        if channel_swap is None:
            channel_swap = [2, 1, 0] if self.channels == 3 else list(range(self.channels))
        if sorted(channel_swap) != list(range(self.channels)):
            raise ConfigError(f"--channel-swap {','.join(map(str, channel_swap))} is not an "
                              f"order of the net's {self.channels} input channels")
        self.channel_swap = list(channel_swap)
        self.mean = self._shape_mean(mean)

    def _shape_mean(self, mean):
        if mean is None:
            return None
        mean = np.asarray(mean, dtype=np.float32)
        if mean.ndim == 1:
            if len(mean) not in (1, self.channels):
                raise ConfigError(f"{len(mean)} mean values for a net with {self.channels} "
                                  f"input channels")
            return mean.reshape(-1, 1, 1)
        if mean.ndim == 4 and mean.shape[0] == 1:
            mean = mean[0]
        if mean.ndim != 3 or mean.shape[0] != self.channels:
            raise ConfigError(f"the mean of shape {mean.shape} does not have the net's "
                              f"{self.channels} input channels (C x H x W)")
        if mean.shape[1:] != (self.height, self.width):
            return mean.mean(axis=(1, 2)).reshape(-1, 1, 1)
        return mean

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """``crops``: n x C x h x w RGB in [0, 1]; the n net inputs."""
        out = crops[:, self.channel_swap] * np.float32(self.raw_scale)
        if self.mean is not None:
            out -= self.mean
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out


def read_mean(path: str) -> np.ndarray:
    """A mean image from a .npy file or a binaryproto."""
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"mean file '{path}' cannot be read as .npy: {exc}") from None
    return read_mean_binaryproto(path)


def read_labels(path: str, classes: int) -> list[str]:
    """Class names, one a line; DataError unless there are at least ``classes``."""
    try:
        with open(path, encoding="utf-8") as fh:
            labels = [line.strip() for line in fh.read().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"labels file '{path}' cannot be read: {exc}") from None
    while labels and not labels[-1]:
        labels.pop()
    if len(labels) < classes:
        raise DataError(f"labels file '{path}' names {len(labels)} classes; the net has "
                        f"{classes}")
    return labels


def load_rgb(path: str, color: bool) -> np.ndarray:
    """An image file as H x W x C float32 in [0, 1]: RGB, or one grey channel."""
    image = load_image(path, is_color=color)
    if color:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    else:
        image = image[:, :, np.newaxis]
    return image.astype(np.float32) / np.float32(255)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an H x W x C float image to ``height x width`` (C x H x W out)."""
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        image = image.reshape(height, width, -1)
    return image.transpose(2, 0, 1)


class Classifier:
    """A deploy net and its weights, classifying images as pycaffe's ``Classifier``."""

    def __init__(self, deploy, weights, raw_scale=255.0, scale=1.0, channel_swap=None,
                 mean=None, image_dims=None):
        self.net = Net(deploy, weights=weights, phase=TEST)
        if not self.net.inputs:
            raise ConfigError(f"net '{self.net.name}' has no Input layer to feed images to")
        self.input = self.net.inputs[0]
        shape = self.net.blobs[self.input].shape
        if len(shape) != 4:
            raise ConfigError(f"input blob '{self.input}' has shape {shape}; classify needs "
                              "N x C x H x W")
        self.batch = max(shape[0], 1)
        self.preprocess = Preprocessor(shape[1:], raw_scale, scale, channel_swap, mean)
        image_dims = image_dims or shape[2:]       # pycaffe: the input size by default
        self.image_dims = (max(image_dims[0], shape[2]), max(image_dims[1], shape[3]))
        self.probs_source = _probability_source(self.net)

    def predict(self, paths, multiview: bool = False) -> np.ndarray:
        """Class probabilities of each image file, len(paths) x classes."""
        views = VIEWS if multiview else 1
        results = []
        for start in range(0, len(paths), self.batch):
            inputs = np.concatenate([self._inputs(path, multiview)
                                     for path in paths[start:start + self.batch]])
            blob = self.net.blobs[self.input]
            blob.reshape(inputs.shape)
            self.net.reshape()
            blob.data[...] = backend.to_device(inputs)
            self.net.forward()
            probs = backend.to_host(probabilities(self.net, self.probs_source))
            results.append(probs.reshape(-1, views, probs.shape[1]).mean(axis=1))
        return np.concatenate(results)

    def _inputs(self, path: str, multiview: bool) -> np.ndarray:
        color = self.preprocess.channels != 1
        image = load_rgb(path, color)
        if image.shape[2] != self.preprocess.channels:
            raise DataError(f"image '{path}' has {image.shape[2]} channels, the net's input "
                            f"{self.preprocess.channels}")
        height, width = self.preprocess.height, self.preprocess.width
        resized = resize(image, *self.image_dims)
        if multiview:
            crops, _ = ten_views(resized, height, width)
        else:
            crops = centre_view(resized, height, width)[np.newaxis]
        return self.preprocess(crops)


def _probability_source(net) -> tuple[str, bool]:
    """``(blob, apply_softmax)``: the first Softmax top, else the softmax of the first output."""
    for name, layer in net.layer_dict.items():
        if layer.type == "Softmax":
            return net.top_names[name][0], False
    if not net.outputs:
        raise ConfigError(f"net '{net.name}' has no output blob")
    return net.outputs[0], True


def top_classes(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most probable classes, most probable first (ties: lower index first)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(c), float(probs[c])) for c in order]


def run(args, out=None) -> list:
    """Classify the parsed command line's images; per image, its top classes."""
    out = out or sys.stdout
    owl_logging.ensure_configured()
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    image_dims = args.image_dims or (DEFAULT_IMAGE_DIMS if args.multiview else None)
    if image_dims is not None and (len(image_dims) != 2 or min(image_dims) <= 0):
        raise ConfigError(f"--image-dims takes H,W, got {args.image_dims}")
    device.setup_from_args(args)
    mean = read_mean(args.mean) if args.mean else args.mean_value
    classifier = Classifier(args.deploy, args.weights, args.raw_scale, args.scale,
                            args.channel_swap, mean, image_dims)
    probs = classifier.predict(args.images, args.multiview)
    labels = read_labels(args.labels, probs.shape[1]) if args.labels else None
    results = []
    for path, image_probs in zip(args.images, probs):
        best = top_classes(image_probs, args.top)
        results.append(best)
        print(path, file=out)
        for index, prob in best:
            name = f"  {labels[index]}" if labels else ""
            print(f"  {prob:.4f}  {index}{name}", file=out)
    return results


def main(argv=None) -> int:
    return run_command("classify", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
