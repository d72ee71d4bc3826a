#!/usr/bin/env python3
"""Write the CIFAR-10 ResNets of He et al. (2016, section 4.2) at depths 20, 32, 56 and 110.

    scripts/make_resnet.py            # (re)write models/resnet{20,32,56,110}/ and their solvers
    scripts/make_resnet.py --check    # exit 1 if a committed file differs from what it would write

A ResNet of depth 6n+2: a 3x3 convolution with 16 filters, three stages of n basic blocks
(two 3x3 convolutions each) with 16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps, global
average pooling and a 10-way fully connected layer. Every convolution is followed by
BatchNorm + Scale (+ ReLU, except the block's second one, where the ReLU comes after the sum).
The first block of stages 2 and 3 halves the maps with stride 2 and its shortcut is a
projection: a 1x1 convolution with stride 2 + BatchNorm + Scale (the paper's option B for the
two places where the shape changes; other shortcuts are identities). The projections are the
only weighted layers beyond the 6n+2.

The solver is the neon model zoo's 180-epoch schedule: batch 128 over 50,000 images is 391
iterations an epoch; lr 0.1, divided by 10 after epochs 90 and 135; momentum 0.9, weight
decay 1e-4 (on convolution and fully connected weights only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = (20, 32, 56, 110)
WIDTHS = (16, 32, 64)
ITERS_PER_EPOCH = 391          # ceil(50,000 / 128)
EPOCHS, DROP_EPOCHS = 180, (90, 135)


class Text:
    def __init__(self, header):
        self.lines = [f"# {line}" if line else "#" for line in header]

    def add(self, *lines):
        self.lines.extend(lines)

    def layer(self, name, kind, bottoms, top, *body):
        self.add("layer {", f'  name: "{name}"  type: "{kind}"')
        if bottoms:
            self.add("  " + "  ".join(f'bottom: "{b}"' for b in bottoms))
        self.add(f'  top: "{top}"')
        self.add(*(f"  {line}" for line in body))
        self.add("}")

    def render(self):
        return "\n".join(self.lines) + "\n"


def conv_bn(t, name, bottom, filters, kernel, stride, relu):
    """Convolution (no bias) -> BatchNorm -> Scale (-> ReLU), all in place after the conv."""
    pad = kernel // 2
    stride_text = f" stride: {stride}" if stride != 1 else ""
    t.layer(name, "Convolution", [bottom], name,
            "param { lr_mult: 1 decay_mult: 1 }",
            "convolution_param {",
            f"  num_output: {filters} kernel_size: {kernel}"
            + (f" pad: {pad}" if pad else "") + stride_text + " bias_term: false",
            '  weight_filler { type: "msra" }',
            "}")
    t.layer(f"{name}_bn", "BatchNorm", [name], name,
            "param { lr_mult: 0 }", "param { lr_mult: 0 }", "param { lr_mult: 0 }")
    t.layer(f"{name}_scale", "Scale", [name], name,
            "param { lr_mult: 1 decay_mult: 0 }", "param { lr_mult: 1 decay_mult: 0 }",
            "scale_param { bias_term: true }")
    if relu:
        t.layer(f"{name}_relu", "ReLU", [name], name)
    return name


def block(t, prefix, bottom, filters, stride):
    """A basic block: two 3x3 conv-BN-Scale, the shortcut added, then ReLU."""
    a = conv_bn(t, f"{prefix}_conv1", bottom, filters, 3, stride, relu=True)
    b = conv_bn(t, f"{prefix}_conv2", a, filters, 3, 1, relu=False)
    shortcut = bottom
    if stride != 1:
        shortcut = conv_bn(t, f"{prefix}_proj", bottom, filters, 1, stride, relu=False)
    t.layer(f"{prefix}_sum", "Eltwise", [b, shortcut], f"{prefix}_sum",
            "eltwise_param { operation: SUM }")
    t.layer(f"{prefix}_relu", "ReLU", [f"{prefix}_sum"], f"{prefix}_sum")
    return f"{prefix}_sum"


def data_layers(t):
    for phase, source, mirror in (("TRAIN", "cifar10_train_lmdb", "true"),
                                  ("TEST", "cifar10_test_lmdb", "false")):
        batch = 128 if phase == "TRAIN" else 100
        t.add("layer {", '  name: "cifar"  type: "Data"', '  top: "data"  top: "label"',
              f"  include {{ phase: {phase} }}",
              f'  transform_param {{ mirror: {mirror} mean_file: "data/cifar10/mean.binaryproto" }}',
              f'  data_param {{ source: "data/cifar10/{source}" batch_size: {batch} '
              "backend: LMDB }", "}")


def net_text(depth: int, deploy: bool) -> str:
    n = (depth - 2) // 6
    if deploy:
        header = [f"ResNet-{depth} for CIFAR-10, deploy: 32x32 BGR images minus the training mean;",
                  "output 'prob' holds the 10 class probabilities.",
                  "Written by scripts/make_resnet.py; edit the script, not this file."]
    else:
        header = [f"ResNet-{depth} for CIFAR-10 (He et al. 2016, section 4.2): 3 stages of {n} basic "
                  f"blocks, {6 * n + 2} weighted layers",
                  "on the main path (+2 projection shortcuts). Inputs: 32x32 BGR LMDBs minus the "
                  "mean image, mirrored",
                  "in TRAIN (the paper's 4-pixel pad + random crop has no transform_param "
                  "equivalent).",
                  "Written by scripts/make_resnet.py; edit the script, not this file."]
    t = Text(header)
    t.add(f'name: "ResNet-{depth}"')
    if deploy:
        t.add("layer {", '  name: "data"  type: "Input"', '  top: "data"',
              "  input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } }", "}")
    else:
        data_layers(t)
    blob = conv_bn(t, "conv1", "data", WIDTHS[0], 3, 1, relu=True)
    for stage, filters in enumerate(WIDTHS, 1):
        for b in range(1, n + 1):
            stride = 2 if stage > 1 and b == 1 else 1
            blob = block(t, f"stage{stage}_block{b}", blob, filters, stride)
    t.layer("pool", "Pooling", [blob], "pool", "pooling_param { pool: AVE global_pooling: true }")
    t.layer("fc10", "InnerProduct", ["pool"], "fc10",
            "param { lr_mult: 1 decay_mult: 1 }", "param { lr_mult: 1 decay_mult: 0 }",
            "inner_product_param {", "  num_output: 10",
            '  weight_filler { type: "msra" }', '  bias_filler { type: "constant" value: 0 }',
            "}")
    if deploy:
        t.layer("prob", "Softmax", ["fc10"], "prob")
    else:
        t.layer("accuracy", "Accuracy", ["fc10", "label"], "accuracy",
                "include { phase: TEST }")
        t.layer("loss", "SoftmaxWithLoss", ["fc10", "label"], "loss")
    return t.render()


def solver_text(depth: int) -> str:
    steps = [e * ITERS_PER_EPOCH for e in DROP_EPOCHS]
    fields = [
        (f'net: "models/resnet{depth}/train_val.prototxt"', ""),
        ("test_iter: 100", "100 x 100 = the 10,000 test images"),
        (f"test_interval: {ITERS_PER_EPOCH}", "every epoch"),
        ("base_lr: 0.1", ""),
        ('lr_policy: "multistep"', ""),
        ("gamma: 0.1", ""),
        *((f"stepvalue: {s}", f"epoch {e}") for s, e in zip(steps, DROP_EPOCHS)),
        (f"max_iter: {EPOCHS * ITERS_PER_EPOCH}", f"epoch {EPOCHS}"),
        ("momentum: 0.9", ""),
        ("weight_decay: 0.0001", ""),
        ("display: 100", ""),
        (f"snapshot: {10 * ITERS_PER_EPOCH}", "every 10 epochs"),
        (f'snapshot_prefix: "snapshots/resnet{depth}/resnet{depth}"', ""),
        ("random_seed: 1701", ""),
    ]
    lines = [
        f"# ResNet-{depth} on CIFAR-10, the neon model zoo's schedule: {EPOCHS} epochs of "
        f"{ITERS_PER_EPOCH} iterations",
        f"# (batch 128 over 50,000 images), lr 0.1 divided by 10 after epochs "
        f"{DROP_EPOCHS[0]} and {DROP_EPOCHS[1]}.",
        "# Written by scripts/make_resnet.py; edit the script, not this file.",
    ]
    lines += [f"{field:<24}# {note}" if note else field for field, note in fields]
    return "\n".join(lines) + "\n"


def files() -> dict[str, str]:
    """Path relative to the project root -> text, for every file this script writes."""
    out = {}
    for depth in DEPTHS:
        out[f"models/resnet{depth}/train_val.prototxt"] = net_text(depth, deploy=False)
        out[f"models/resnet{depth}/deploy.prototxt"] = net_text(depth, deploy=True)
        out[f"solvers/resnet{depth}_solver.prototxt"] = solver_text(depth)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare with the files on disk; exit 1 if any differs")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in files().items():
        path = ROOT / rel
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print("out of date (run scripts/make_resnet.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
