"""Top-1 and top-5 accuracy of a solver's test net, single or 10-view (`owlnet test`); or
Caffe's ``caffe test`` of a net file.

    net_tester.py SOLVER [--snapshot N | --weights W] [--multiview] [--softmax BLOB]
                  [--accuracy LAYER] [--iters K] [--gpu IDX]
    owlnet test -model M -weights W [-iterations N] [-gpu IDX] [-stage A,B] [-level N]

Caffe's form (``--model``, a net prototxt, not a solver) builds the net in the TEST phase
with the stages and level given, loads the weights, runs N batches (default 50) and logs
Caffe's lines: ``Batch i, NAME = value`` for every value of every output blob, then
``Loss: L`` (the mean over batches of the weighted loss) and ``NAME = mean`` for each output
value, with ``(* weight = weighted loss)`` for loss outputs.

The solver form:

Runs the solver's TEST net (its first test net) over ``test_iter`` batches (or K) and prints
top-1 and top-5 accuracy per batch and over all images: an image counts as a top-k hit when
fewer than k classes score at least as high as its label (Caffe's Accuracy rule, ties count
against the label).

Single view scores the batches the data layer makes (the centre crop at TEST). ``--multiview``
reads each batch's records uncropped from the data layer's source, cuts the 10 views of
Krizhevsky et al. (four corners and the centre, each also mirrored; see owlnet.views),
applies the data layer's mean and scale to each view at its own offsets, runs the net once
per view and averages the softmax over the 10 views of each image.

The probabilities are the blob ``--softmax`` names (a blob, or a layer whose first top it
is), by default the top of the first Softmax layer, or else the softmax of the first
SoftmaxWithLoss layer's scores. ``--snapshot N`` loads the weights of the N-th snapshot
(iteration N x ``snapshot``) under the solver's ``snapshot_prefix``.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from .. import backend
from .. import logging as owl_logging
from ..errors import ConfigError, DataError, ShapeError
from ..net import TEST, Net
from ..numerics import softmax
from ..views import VIEWS, ten_views
from . import device, run_command
from ._testnet import add_test_net_arguments, find_blob, open_test_net
from .flags import FlagParser

TOP_K = 5


def build_parser() -> FlagParser:
    p = FlagParser(prog="net_tester.py", description=__doc__.splitlines()[0])
    p.add_argument("solver", nargs="?", help="solver prototxt (its first test net is scored)")
    p.add_argument("--model", metavar="NET",
                   help="Caffe's form: a net prototxt to score (instead of a solver)")
    p.add_argument("--stage", metavar="A[,B...]", help="with --model: net stages")
    p.add_argument("--level", type=int, default=0, metavar="N", help="with --model: net level")
    add_test_net_arguments(p, "score")
    p.add_argument("--multiview", action="store_true",
                   help="average the softmax over 10 views (corners, centre, mirrored)")
    p.add_argument("--softmax", metavar="BLOB",
                   help="blob holding the class probabilities (default: the first Softmax "
                        "layer's top, else the softmax of the SoftmaxWithLoss input)")
    p.add_argument("--accuracy", metavar="LAYER",
                   help="also report this Accuracy layer's value (single view)")
    return p


def probability_source(net, name: str | None) -> tuple[str, bool]:
    """``(blob, apply_softmax)``: where the class probabilities come from (see the module)."""
    if name:
        return find_blob(net, name), False
    for kind, apply in (("Softmax", False), ("SoftmaxWithLoss", True)):
        for layer_name, layer in net.layer_dict.items():
            if layer.type == kind:
                names = net.top_names if kind == "Softmax" else net.bottom_names
                return names[layer_name][0], apply
    raise ConfigError(f"net '{net.name}' has no Softmax or SoftmaxWithLoss layer; name the "
                      f"blob of class probabilities with --softmax (blobs: "
                      f"{', '.join(net.blobs)})")


def probabilities(net, source: tuple[str, bool]):
    """The class probabilities of the last forward as an N x classes array on the device."""
    name, apply_softmax = source
    data = net.blobs[name].data
    if data.ndim < 2 or data[0].size != data.shape[1]:
        raise ShapeError(f"blob '{name}' of shape {data.shape} is not N x classes (x 1 x 1); "
                         "name the blob of class probabilities with --softmax")
    scores = data.reshape(data.shape[0], data.shape[1])
    return softmax(scores, 1) if apply_softmax else scores


def top_k_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image, whether fewer than ``k`` classes score at least as high as the label."""
    true_scores = probs[np.arange(len(labels)), labels]
    return (probs >= true_scores[:, None]).sum(axis=1) - 1 < k


def integer_labels(values, classes: int, batch: int) -> np.ndarray:
    """Labels as class indices; a DataError naming the batch for a label that is not an
    integer in [0, classes)."""
    labels = np.asarray(values, dtype=np.float64).reshape(-1)
    as_int = labels.astype(np.int64)
    bad = (as_int != labels) | (as_int < 0) | (as_int >= classes)
    if bad.any():
        raise DataError(f"batch {batch}: label {labels[bad][0]:g} is not a class index in "
                        f"[0, {classes})")
    return as_int


# -- the data layer ---------------------------------------------------------------------------
class DataSource(NamedTuple):
    """The data layer a scored net reads from."""
    index: int          # position of the data layer in net.layers
    layer: object
    data: str           # blob names of its tops
    label: str | None


def data_source(net) -> DataSource:
    """The net's first data layer (Data, ImageData, ...), with its data and label blobs."""
    for index, (name, layer) in enumerate(net.layer_dict.items()):
        if getattr(layer, "is_data", False):
            tops = net.top_names[name]
            return DataSource(index, layer, tops[0], tops[1] if len(tops) > 1 else None)
    raise ConfigError(f"net '{net.name}' has no data layer")


# -- scoring ----------------------------------------------------------------------------------
class ScoreResult(NamedTuple):
    """What ``score_net`` measured."""
    images: int
    top1: float
    top5: float
    accuracy: float | None                   # mean of the --accuracy layer over batches
    batches: list                            # per batch: (top-1, top-5, accuracy or None)


def score_net(net, iters: int, multiview: bool = False, softmax_blob: str | None = None,
             accuracy_layer: str | None = None, out=None) -> ScoreResult:
    """Score ``iters`` batches of ``net`` (see the module); prints a line per batch to ``out``."""
    if iters <= 0:
        raise ConfigError(f"the number of batches must be positive, got {iters}")
    if multiview and accuracy_layer:
        raise ConfigError("--accuracy reports the Accuracy layer of the single-view run; it "
                          "cannot be combined with --multiview")
    source = data_source(net)
    if source.label is None:
        raise ConfigError(f"data layer '{list(net.layer_dict)[source.index]}' has no label "
                          "top; accuracy needs labels")
    probs_source = probability_source(net, softmax_blob)
    accuracy_top = _accuracy_top(net, accuracy_layer) if accuracy_layer else None
    score = _MultiView(net, source) if multiview else None
    hits1 = hits5 = images = 0
    per_batch = []
    for batch in range(iters):
        if score is None:
            net.forward()
            probs = backend.to_host(probabilities(net, probs_source))
        else:
            probs = backend.to_host(score(batch, probs_source))
        labels = integer_labels(backend.to_host(net.blobs[source.label].data),
                                probs.shape[1], batch)
        top1 = top_k_hits(probs, labels, 1)
        top5 = top_k_hits(probs, labels, TOP_K)
        accuracy = (float(backend.to_host(net.blobs[accuracy_top].data).reshape(-1)[0])
                    if accuracy_top else None)
        per_batch.append((float(top1.mean()), float(top5.mean()), accuracy))
        hits1 += int(top1.sum())
        hits5 += int(top5.sum())
        images += len(labels)
        if out is not None:
            extra = f", {accuracy_layer} = {accuracy:.4f}" if accuracy_top else ""
            print(f"Batch {batch}: top-1 = {top1.mean():.4f}, top-5 = {top5.mean():.4f}{extra}",
                  file=out)
    mean_accuracy = (float(np.mean([b[2] for b in per_batch])) if accuracy_top else None)
    return ScoreResult(images, hits1 / images, hits5 / images, mean_accuracy, per_batch)


def _accuracy_top(net, name: str) -> str:
    layer = net.layer_dict.get(name)
    if layer is None or layer.type != "Accuracy":
        known = [n for n, lay in net.layer_dict.items() if lay.type == "Accuracy"]
        raise ConfigError(f"net '{net.name}' has no Accuracy layer '{name}' (Accuracy layers: "
                          f"{', '.join(known) or 'none'})")
    return net.top_names[name][0]


class _MultiView:
    """Runs a batch's 10 views through the net, one forward per view; averages the softmax."""

    def __init__(self, net, source: DataSource):
        layer = source.layer
        if not hasattr(layer, "read_records"):
            raise ConfigError(f"--multiview reads records from a Data or ImageData layer; "
                              f"layer '{list(net.layer_dict)[source.index]}' is "
                              f"{layer.type}")
        self.crop = layer.transformer.crop_size
        if not self.crop:
            raise ConfigError(f"--multiview needs crop_size in the transform_param of data "
                              f"layer '{layer.name}'")
        self.net, self.source = net, source

    def __call__(self, batch: int, probs_source):
        net, layer = self.net, self.source.layer
        records = layer.read_records(layer.stream_positions(batch))
        views, windows, labels = [], [], []
        for record in records:
            example, label, key = layer.decode(record)
            layer.transformer.check_example(example.shape, key)
            crops, image_windows = ten_views(example, self.crop, self.crop)
            views.append(crops)
            windows.append(image_windows)
            labels.append(label)
        views = np.stack(views, axis=1)                       # 10 x N x C x crop x crop
        windows = np.array(windows, dtype=np.int64)           # N x 10 x (h, w, mirrored)
        data = net.blobs[self.source.data]
        label_blob = net.blobs[self.source.label]
        label_blob.data[...] = backend.to_device(np.asarray(labels, dtype=label_blob.data.dtype))
        last = len(net.layers) - 1
        total = None
        for v in range(VIEWS):
            layer.transformer.normalize(backend.to_device(views[v]), windows[:, v, 0],
                                        windows[:, v, 1], windows[:, v, 2].astype(bool),
                                        data.data)
            net.forward_range(self.source.index + 1, last)
            probs = probabilities(net, probs_source)
            total = probs.copy() if total is None else total + probs
        return total / VIEWS


# -- Caffe's `caffe test` ---------------------------------------------------------------------
CAFFE_ITERATIONS = 50


def caffe_test(net, iterations: int) -> tuple[float, dict]:
    """Caffe's ``caffe test`` loop over ``net`` (see the module); logs its lines and returns
    the mean loss and each output blob's mean values."""
    if iterations <= 0:
        raise ConfigError(f"the number of iterations must be positive, got {iterations}")
    owl_logging.info(f"Running for {iterations} iterations.")
    last = len(net.layers) - 1
    loss = 0.0
    sums = {}
    for i in range(iterations):
        loss += float(net.forward_range(0, last))
        for name in net.outputs:
            values = backend.to_host(net.blobs[name].data).astype(np.float64).ravel()
            for value in values:
                owl_logging.info(f"Batch {i}, {name} = {owl_logging.num(value)}")
            sums[name] = sums[name] + values if name in sums else values
    loss /= iterations
    owl_logging.info(f"Loss: {owl_logging.num(loss)}")
    means = {name: total / iterations for name, total in sums.items()}
    weights = net.output_loss_weights
    for name, values in means.items():
        for value in values:
            weighted = (f" (* {owl_logging.num(weights[name])} = "
                        f"{owl_logging.num(weights[name] * value)} loss)"
                        if weights[name] else "")
            owl_logging.info(f"{name} = {owl_logging.num(value)}{weighted}")
    return loss, means


def run_caffe_test(args):
    """``owlnet test -model M -weights W``: Caffe's test of a net file."""
    if args.solver:
        raise ConfigError("give a solver (owl.net's form) or --model (Caffe's), not both")
    for flag, given in (("--snapshot", args.snapshot is not None),
                        ("--multiview", args.multiview), ("--softmax", args.softmax),
                        ("--accuracy", args.accuracy)):
        if given:
            raise ConfigError(f"{flag} scores a solver's test net; with --model Caffe's test "
                              "reports the net's outputs")
    if not args.weights:
        raise ConfigError("need model weights to score: --weights W.caffemodel")
    owl_logging.ensure_configured()
    device.setup_from_args(args, log_cpu=True)
    stages = tuple(s for s in (args.stage or "").split(",") if s)
    net = Net(args.model, phase=TEST, level=args.level, stages=stages)
    for path in args.weights.split(","):
        net.copy_from(path)
    return caffe_test(net, args.iters if args.iters is not None else CAFFE_ITERATIONS)


# -- command line -----------------------------------------------------------------------------
def run(args, out=None) -> ScoreResult:
    """Score the parsed command line's net; prints the totals to ``out``."""
    if args.model:
        return run_caffe_test(args)
    out = out or sys.stdout
    net, iters = open_test_net(args)
    result = score_net(net, iters, args.multiview, args.softmax, args.accuracy, out)
    mode = "10 views" if args.multiview else "single view"
    print(f"Tested {result.images} images in {iters} batches ({mode})", file=out)
    print(f"top-1 accuracy = {result.top1:.4f}", file=out)
    print(f"top-5 accuracy = {result.top5:.4f}", file=out)
    if result.accuracy is not None:
        print(f"{args.accuracy} = {result.accuracy:.4f} (mean over batches)", file=out)
    return result


def main(argv=None) -> int:
    return run_command("net_tester", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
