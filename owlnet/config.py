"""Prototxt and binary messages in, Caffe's NetState filtering and format upgrades.

* ``read_net(source)``: a NetParameter from a path, prototxt text or message, with parse
  errors raised as ``ConfigError`` naming ``file:line:col``;
* ``upgrade_net(param)``: V1 ``layers { type: CONVOLUTION }`` nets to current ``layer`` ones,
  deprecated transformation fields of data layers moved to ``transform_param``, and the
  deploy ``input``/``input_dim``/``input_shape`` fields to an ``Input`` layer;
* ``filter_net(param, state)``: the layers whose include/exclude rules the NetState meets;
* ``read_solver(source)``: a SolverParameter, its legacy ``solver_type`` enum upgraded to the
  ``type`` string (``upgrade_solver_type``).

A rule is met when every condition it sets holds: its phase equals the state's, the state's
level lies within [min_level, max_level], every ``stage`` is among the state's stages and no
``not_stage`` is. A layer without include rules is kept unless an exclude rule is met; a layer
with include rules is kept only when one of them is met.
"""
from __future__ import annotations

import os
import re

from google.protobuf import text_format

from .errors import ConfigError
from .proto import caffe_pb2

_LAYER_BLOCK = re.compile(r"\b(layers?)\s*\{")


class Source:
    """Where a message came from: its file name and text, for messages that point at a line."""

    def __init__(self, name: str, text: str | None = None):
        self.name = name
        self.text = text
        self._layer_lines = None

    def layer_line(self, index: int) -> str:
        """``file:line`` of the index-th top-level layer block (or just the file name)."""
        if self.text is None:
            return self.name
        if self._layer_lines is None:
            self._layer_lines = _top_level_layer_lines(self.text)
        if 0 <= index < len(self._layer_lines):
            return f"{self.name}:{self._layer_lines[index]}"
        return self.name


def _top_level_layer_lines(text: str) -> list[int]:
    """Line numbers of ``layer {`` / ``layers {`` blocks at brace depth 0 (comments skipped)."""
    lines, depth = [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        code = _strip_comment(line)
        pos = 0
        while pos < len(code):
            ch = code[pos]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif depth == 0:
                m = _LAYER_BLOCK.match(code, pos)
                if m:
                    lines.append(lineno)
                    pos = m.end() - 1
                    continue
            pos += 1
    return lines


def _strip_comment(line: str) -> str:
    in_str = None
    for i, ch in enumerate(line):
        if in_str:
            if ch == in_str:
                in_str = None
        elif ch in "\"'":
            in_str = ch
        elif ch == "#":
            return line[:i]
    return line


def parse_text(text: str, message, name: str = "<string>"):
    """Parse prototxt ``text`` into ``message``; a syntax error names ``name:line:col``."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        detail = str(exc)
        detail = re.sub(r"^\d+:\d+ : ", "", detail)
        where = f"{name}:{line}:{col}" if line else name
        raise ConfigError(f"{where}: {detail}") from None
    return message


def _is_text(source) -> bool:
    """Prototxt text rather than a path: it has braces, newlines or starts with ``field:``."""
    return isinstance(source, str) and (
        "{" in source or "\n" in source or re.match(r"\s*\w+\s*:", source) is not None)


def _read_text_or_path(source, message_type, kind: str):
    if _is_text(source):
        return parse_text(source, message_type(), "<string>"), Source("<string>", source)
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {kind} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {kind}: {exc}") from None
    return parse_text(text, message_type(), path), Source(path, text)


def read_net(source):
    """A NetParameter and its Source from a path, prototxt text or NetParameter (upgraded)."""
    if isinstance(source, caffe_pb2.NetParameter):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(source)
        src = Source("<NetParameter>")
    else:
        param, src = _read_text_or_path(source, caffe_pb2.NetParameter, "net prototxt")
    return upgrade_net(param, src), src


def read_solver(source):
    """A SolverParameter and its Source from a path, prototxt text or SolverParameter (a copy,
    upgraded)."""
    if isinstance(source, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(source)
        src = Source("<SolverParameter>")
    else:
        param, src = _read_text_or_path(source, caffe_pb2.SolverParameter, "solver prototxt")
    upgrade_solver_type(param, src.name)
    return param, src


# -- upgrades ------------------------------------------------------------------------------

#: V1 LayerType enum name -> current type string.
V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# V1 fields handled by hand (with blob_share_mode, blobs_lr, weight_decay and the V0 layer,
# which LayerParameter lacks); every other V1 field has a LayerParameter field of the same
# name and type and is copied as it is.
_V1_SPECIAL = {"type", "param"}


def upgrade_v1_layer(v1, where: str):
    """A LayerParameter equivalent to V1LayerParameter ``v1``."""
    if v1.HasField("layer"):
        raise ConfigError(f"{where}: V0 layer definitions (layers {{ layer {{ ... }} }}) are "
                          "not supported; upgrade the net with Caffe's upgrade_net_proto_text")
    layer = caffe_pb2.LayerParameter()
    names = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for field, value in v1.ListFields():
        if field.name in _V1_SPECIAL or field.name not in names:
            continue
        target = getattr(layer, field.name)
        if field.message_type is not None and not field.is_repeated:
            target.CopyFrom(value)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(layer, field.name, value)
    if v1.HasField("type"):
        enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
        if enum_name not in V1_TYPES:
            raise ConfigError(f"{where}: layer '{v1.name}': V1 type {enum_name} has no "
                              "current equivalent")
        layer.type = V1_TYPES[enum_name]
    n_specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    return layer


_DEPRECATED_TRANSFORM = ("scale", "mean_file", "crop_size", "mirror")


def _upgrade_data_transform(layer):
    """Move scale/mean_file/crop_size/mirror from a data layer's own param to transform_param."""
    for param_name in ("data_param", "image_data_param", "window_data_param"):
        if not layer.HasField(param_name):
            continue
        sub = getattr(layer, param_name)
        for field in _DEPRECATED_TRANSFORM:
            if sub.HasField(field):
                setattr(layer.transform_param, field, getattr(sub, field))
                sub.ClearField(field)


def upgrade_net(param, source: Source | None = None):
    """Upgrade ``param`` in place to the current format (see the module docstring)."""
    source = source or Source("<net>")
    if len(param.layers):
        if len(param.layer):
            raise ConfigError(f"{source.name}: net mixes V1 'layers' and current 'layer' "
                              "fields; use one of them")
        upgraded = [upgrade_v1_layer(v1, source.layer_line(i)) for i, v1 in enumerate(param.layers)]
        param.ClearField("layers")
        param.layer.extend(upgraded)
    for layer in param.layer:
        _upgrade_data_transform(layer)
    if len(param.input):
        _upgrade_inputs(param, source)
    return param


#: Legacy ``solver_type`` enum value -> ``type`` string.
LEGACY_SOLVER_TYPES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}


def upgrade_solver_type(param, where: str = "solver") -> None:
    """Caffe's upgrade: the legacy ``solver_type`` enum becomes the ``type`` string."""
    if not param.HasField("solver_type"):
        return
    if param.HasField("type"):
        raise ConfigError(f"{where}: the legacy solver_type and the new type cannot both be "
                          "given; keep type")
    param.type = LEGACY_SOLVER_TYPES[param.solver_type]
    param.ClearField("solver_type")


def _upgrade_inputs(param, source: Source):
    """Deploy-style ``input`` + ``input_dim``/``input_shape`` fields -> a leading Input layer."""
    n = len(param.input)
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    layer.top.extend(param.input)
    if len(param.input_shape):
        if len(param.input_shape) not in (1, n):
            raise ConfigError(f"{source.name}: {n} inputs but {len(param.input_shape)} "
                              "input_shape entries")
        for shape in param.input_shape:
            layer.input_param.shape.add().CopyFrom(shape)
    elif len(param.input_dim):
        if len(param.input_dim) != 4 * n:
            raise ConfigError(f"{source.name}: {n} inputs need {4 * n} input_dim values, "
                              f"got {len(param.input_dim)}")
        for i in range(n):
            layer.input_param.shape.add().dim.extend(param.input_dim[4 * i:4 * i + 4])
    else:
        raise ConfigError(f"{source.name}: inputs {list(param.input)} have no input_dim or "
                          "input_shape")
    layers = [layer] + list(param.layer)
    param.ClearField("input")
    param.ClearField("input_dim")
    param.ClearField("input_shape")
    param.ClearField("layer")
    param.layer.extend(layers)


# -- NetState filtering --------------------------------------------------------------------

def state_meets_rule(state, rule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(param, state, source: Source | None = None):
    """A copy of ``param`` keeping only the layers included under NetState ``state``, and the
    indices (in ``param.layer``) of the layers kept."""
    source = source or Source("<net>")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    out.state.CopyFrom(state)
    kept = []
    for i, layer in enumerate(param.layer):
        if len(layer.include) and len(layer.exclude):
            raise ConfigError(f"{source.layer_line(i)}: layer '{layer.name}' has both include "
                              "and exclude rules; give one kind only")
        if len(layer.include):
            keep = any(state_meets_rule(state, r) for r in layer.include)
        else:
            keep = not any(state_meets_rule(state, r) for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
            kept.append(i)
    return out, kept


def make_state(param, phase, level=None, stages=()):
    """The NetState for a net: the file's own ``state`` with phase (and level/stages) set."""
    state = caffe_pb2.NetState()
    state.CopyFrom(param.state)
    state.phase = phase
    if level is not None:
        state.level = level
    for s in stages:
        if s not in state.stage:
            state.stage.append(s)
    return state
