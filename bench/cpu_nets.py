"""The nets of the CPU benchmarks, and what the two CPU benchmark scripts share: Caffe zoo / project nets by path, and three families written
here as deploy prototxt (MobileNet v1-style depthwise-separable, MobileNet v2-style inverted
residual depthwise, SqueezeNet v1.1-style fire modules).

``deploy_text(name, batch)`` gives a deploy net (an Input "data", output "prob");
``train_text(name, batch)`` the same net with a "label" input and SoftmaxWithLoss in place of
the final Softmax, as the training benchmarks use it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from google.protobuf import text_format

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT.parent / "shared" / "caffe-zoo"


def _zoo(relative, fallback):
    """A zoo file from ../shared/caffe-zoo, else the project's copy under models/."""
    path = ZOO / relative
    return path if path.exists() else ROOT / fallback


FILES = {
    "alexnet": lambda: _zoo("models/bvlc_alexnet/deploy.prototxt", "models/alexnet/deploy.prototxt"),
    "googlenet": lambda: _zoo("models/bvlc_googlenet/deploy.prototxt",
                              "models/googlenet/deploy.prototxt"),
    "cifar10_full": lambda: ZOO / "examples/cifar10/cifar10_full.prototxt",
    "cifar10_quick": lambda: ROOT / "models/cifar10_quick/deploy.prototxt",
    "lenet": lambda: ROOT / "models/lenet/deploy.prototxt",
    "resnet20": lambda: ROOT / "models/resnet20/deploy.prototxt",
    "resnet56": lambda: ROOT / "models/resnet56/deploy.prototxt",
}


# -- a small prototxt writer ------------------------------------------------------------------
class _Writer:
    def __init__(self, name, shape):
        dims = " ".join(f"dim: {d}" for d in shape)
        self.lines = [f'name: "{name}"',
                      f'layer {{ name: "data" type: "Input" top: "data" '
                      f'input_param {{ shape {{ {dims} }} }} }}']

    def layer(self, name, kind, bottoms, top, body=""):
        bottoms = " ".join(f'bottom: "{b}"' for b in bottoms)
        self.lines.append(f'layer {{ name: "{name}" type: "{kind}" {bottoms} top: "{top}" {body} }}')
        return top

    def conv(self, name, bottom, out, kernel, stride=1, group=1, bias=False):
        pad = kernel // 2
        grouping = f" group: {group}" if group > 1 else ""
        return self.layer(name, "Convolution", [bottom], name,
                          f"convolution_param {{ num_output: {out} kernel_size: {kernel} "
                          f"stride: {stride} pad: {pad}{grouping} bias_term: {str(bias).lower()} "
                          f'weight_filler {{ type: "msra" }} }}')

    def bn_scale(self, name, blob, relu=True):
        """BatchNorm + Scale (+ ReLU), all in place, as Caffe's MobileNets and ResNets."""
        self.layer(f"{name}_bn", "BatchNorm", [blob], blob)
        self.layer(f"{name}_scale", "Scale", [blob], blob, "scale_param { bias_term: true }")
        if relu:
            self.layer(f"{name}_relu", "ReLU", [blob], blob)
        return blob

    def conv_bn(self, name, bottom, out, kernel, stride=1, group=1, relu=True):
        return self.bn_scale(name, self.conv(name, bottom, out, kernel, stride, group), relu)

    def relu(self, name, blob):
        return self.layer(name, "ReLU", [blob], blob)

    def classifier(self, bottom, classes):
        pooled = self.layer("pool_global", "Pooling", [bottom], "pool_global",
                            "pooling_param { pool: AVE global_pooling: true }")
        fc = self.layer("fc", "InnerProduct", [pooled], "fc",
                        f'inner_product_param {{ num_output: {classes} '
                        f'weight_filler {{ type: "xavier" }} }}')
        return self.layer("prob", "Softmax", [fc], "prob")

    def text(self):
        return "\n".join(self.lines) + "\n"


def mobilenet_v1(batch, size=224, classes=1000):
    """Depthwise-separable: 3x3 conv, then 13 x (3x3 depthwise + 1x1 pointwise), BN+Scale+ReLU."""
    net = _Writer("MobileNetV1", (batch, 3, size, size))
    x = net.conv_bn("conv1", "data", 32, 3, stride=2)
    channels = 32
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + \
        [(1024, 2), (1024, 1)]
    for i, (out, stride) in enumerate(plan, start=2):
        x = net.conv_bn(f"conv{i}_dw", x, channels, 3, stride=stride, group=channels)
        x = net.conv_bn(f"conv{i}_pw", x, out, 1)
        channels = out
    net.classifier(x, classes)
    return net.text()


def mobilenet_v2(batch, size=224, classes=1000):
    """Inverted residuals: 1x1 expand (x6), 3x3 depthwise, 1x1 linear project, Eltwise SUM
    where shapes allow; BN+Scale after every convolution."""
    net = _Writer("MobileNetV2", (batch, 3, size, size))
    x = net.conv_bn("conv1", "data", 32, 3, stride=2)
    channels = 32
    plan = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1)]
    block = 0
    for expand, out, repeats, first_stride in plan:
        for r in range(repeats):
            block += 1
            stride = first_stride if r == 0 else 1
            name = f"block{block}"
            hidden = channels * expand
            y = x
            if expand != 1:
                y = net.conv_bn(f"{name}_expand", y, hidden, 1)
            y = net.conv_bn(f"{name}_dw", y, hidden, 3, stride=stride, group=hidden)
            y = net.conv_bn(f"{name}_project", y, out, 1, relu=False)
            if stride == 1 and channels == out:
                y = net.layer(f"{name}_sum", "Eltwise", [x, y], f"{name}_sum")
            x, channels = y, out
    x = net.conv_bn("conv_last", x, 1280, 1)
    net.classifier(x, classes)
    return net.text()


def squeezenet(batch, size=227, classes=1000):
    """SqueezeNet v1.1 layout: fire modules (1x1 squeeze, 1x1 + 3x3 expand, Concat)."""
    net = _Writer("SqueezeNet", (batch, 3, size, size))

    def conv_relu(name, bottom, out, kernel, stride=1, pad=None):
        top = net.layer(name, "Convolution", [bottom], name,
                        f"convolution_param {{ num_output: {out} kernel_size: {kernel} "
                        f"stride: {stride} pad: {kernel // 2 if pad is None else pad} "
                        f'weight_filler {{ type: "xavier" }} }}')
        return net.relu(f"{name}_relu", top)

    def pool(name, bottom):
        return net.layer(name, "Pooling", [bottom], name,
                         "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")

    def fire(name, bottom, squeeze, expand):
        s = conv_relu(f"{name}_squeeze", bottom, squeeze, 1)
        a = conv_relu(f"{name}_expand1x1", s, expand, 1)
        b = conv_relu(f"{name}_expand3x3", s, expand, 3)
        return net.layer(f"{name}_concat", "Concat", [a, b], f"{name}_concat")

    x = pool("pool1", conv_relu("conv1", "data", 64, 3, stride=2, pad=0))
    x = fire("fire2", x, 16, 64)
    x = pool("pool3", fire("fire3", x, 16, 64))
    x = fire("fire4", x, 32, 128)
    x = pool("pool5", fire("fire5", x, 32, 128))
    for i, (s, e) in enumerate([(48, 192), (48, 192), (64, 256), (64, 256)], start=6):
        x = fire(f"fire{i}", x, s, e)
    x = conv_relu("conv10", x, classes, 1)
    x = net.layer("pool10", "Pooling", [x], "pool10",
                  "pooling_param { pool: AVE global_pooling: true }")
    net.layer("prob", "Softmax", [x], "prob")
    return net.text()


GENERATED = {"mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2,
             "squeezenet": squeezenet}


def deploy_text(name, batch):
    """Deploy prototxt text of net ``name`` with its input's batch set to ``batch``."""
    if name in GENERATED:
        return GENERATED[name](batch)
    from owlnet.proto import caffe_pb2  # noqa: PLC0415  (after the caller set sys.path)
    net = text_format.Parse(FILES[name]().read_text(), caffe_pb2.NetParameter())
    if net.input_shape:
        net.input_shape[0].dim[0] = batch
    elif net.input_dim:
        net.input_dim[0] = batch
    else:
        net.layer[0].input_param.shape[0].dim[0] = batch
    return text_format.MessageToString(net)


def train_text(name, batch, drop_dropout=False):
    """``deploy_text`` made trainable: a "label" input of shape (batch,), the final Softmax
    replaced by SoftmaxWithLoss; with ``drop_dropout`` the Dropout layers are removed (their
    masks cannot match between engines)."""
    from owlnet.proto import caffe_pb2  # noqa: PLC0415
    net = text_format.Parse(deploy_text(name, batch), caffe_pb2.NetParameter())
    if net.input_shape or net.input_dim:
        raise ValueError(f"{name}: legacy input fields are not handled")
    first = net.layer[0]
    first.top.append("label")
    first.input_param.shape.add().dim.append(batch)
    last = net.layer[-1]
    if last.type != "Softmax":
        raise ValueError(f"{name}: the last layer is {last.type}, not Softmax")
    last.type = "SoftmaxWithLoss"
    last.bottom.append("label")
    last.top[0] = "loss"
    if drop_dropout:
        kept = [lp for lp in net.layer if lp.type != "Dropout"]
        if any(lp.top[0] != lp.bottom[0] for lp in net.layer if lp.type == "Dropout"):
            raise ValueError(f"{name}: a Dropout layer is not in place")
        del net.layer[:]
        net.layer.extend(kept)
    return text_format.MessageToString(net)


# -- shared by bench/cpu_vs_opencv.py and bench/cpu_vs_torch.py -------------------------------
def randomize(net, rng):
    """Random weights for every layer of an owlnet Net (He-scaled Gaussians, small biases,
    Scale factors around 1, BatchNorm statistics with unit-ish variance), so that zoo deploy
    files without fillers give non-trivial outputs."""
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type == "BatchNorm":
            blobs[0].data[...] = rng.normal(0, 0.1, blobs[0].shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].shape)
            blobs[2].data[...] = 1
            continue
        for i, blob in enumerate(blobs):
            if layer.type == "Scale" and i == 0:
                blob.data[...] = rng.uniform(0.5, 1.5, blob.shape)
            elif blob.data.ndim > 1:
                fan_in = blob.count // blob.shape[0]
                blob.data[...] = rng.normal(0, (2.0 / fan_in) ** 0.5, blob.shape)
            else:
                blob.data[...] = rng.normal(0, 0.01, blob.shape)


def run_worker(script, engine, folder, threads, owlnet_root, *extra):
    """Run ``script --worker engine`` in a fresh process limited to ``threads`` threads, with
    ``owlnet_root``'s owlnet first on the path; its last stdout line, parsed as JSON."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(owlnet_root), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(script), "--worker", engine, "--net-dir", str(folder),
               "--threads", str(threads), *map(str, extra)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{engine} on {Path(folder).name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of_rounds(script, engines, folders, rounds, threads, owlnet_root, *extra,
                   baseline_root=None):
    """Time every net with every engine, each run in a fresh worker process, ``rounds``
    times, alternating the order of the engines; ``(best, versions)``: the best ms per
    ``(net, engine)`` and each engine's version string. With ``baseline_root``, the owlnet
    worker of that checkout runs in the same rounds as engine "baseline" (before/after
    figures taken side by side, not minutes apart on a noisy machine)."""
    runs = [(engine, engine, owlnet_root) for engine in engines]
    if baseline_root:
        runs.append(("baseline", "owlnet", baseline_root))
    best, versions = {}, {}
    for r in range(rounds):
        for i, name in enumerate(folders):
            order = runs if (r + i) % 2 == 0 else runs[::-1]
            for label, engine, root in order:
                result = run_worker(script, engine, folders[name], threads, root, *extra)
                versions[label] = result["version"]
                best[(name, label)] = min(best.get((name, label), float("inf")), result["ms"])
        print(f"round {r + 1} done", flush=True)
    return best, versions


def ratio_table(nets, best, peer, versions, notes, note_title):
    """The printed table: per net owlnet's and the peer's best ms and their ratio, a note
    column (``notes[net]``, titled ``note_title``), and with a baseline its ms and
    owlnet / baseline; then the median and worst ratio (and the median owlnet / baseline)."""
    baseline = "baseline" in versions
    head = f"{'net':<14} {note_title:>12} {'owlnet ms':>10} {peer + ' ms':>10} {'ratio':>7}"
    if baseline:
        head += f" {'before ms':>10} {'after/before':>13}"
    lines = [f"baseline (before) from {versions['baseline']}" if baseline else "", head]
    ratios, changes = [], []
    for name in nets:
        owl, ref = best[(name, "owlnet")], best[(name, peer)]
        ratios.append(owl / ref)
        line = f"{name:<14} {notes[name]:>12} {owl:>10.2f} {ref:>10.2f} {owl / ref:>6.2f}x"
        if baseline:
            before = best[(name, "baseline")]
            changes.append(owl / before)
            line += f" {before:>10.2f} {owl / before:>12.2f}x"
        lines.append(line)
    tail = f"{'median ratio':<14} {'':>12} {'':>10} {'':>10} {statistics.median(ratios):>6.2f}x" \
        f"  (worst {max(ratios):.2f}x)"
    if baseline:
        tail += f"; median after/before {statistics.median(changes):.2f}x"
    lines.append(tail)
    return "\n" + "\n".join(line for line in lines if line)
