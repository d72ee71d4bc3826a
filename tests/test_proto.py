"""Schema tests for proto/caffe.proto and the generated owlnet.proto.caffe_pb2.

The field facts below were looked up in BVLC Caffe's src/caffe/proto/caffe.proto;
any mismatch means files exchanged with Caffe would be misread.
"""
from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from owlnet.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT.parent / "shared" / "caffe-zoo"

FD = descriptor_pb2.FieldDescriptorProto
OPT, REP, REQ = FD.LABEL_OPTIONAL, FD.LABEL_REPEATED, FD.LABEL_REQUIRED
TYPES = {
    "int32": FD.TYPE_INT32, "int64": FD.TYPE_INT64, "uint32": FD.TYPE_UINT32,
    "float": FD.TYPE_FLOAT, "double": FD.TYPE_DOUBLE, "bool": FD.TYPE_BOOL,
    "string": FD.TYPE_STRING, "bytes": FD.TYPE_BYTES,
    "message": FD.TYPE_MESSAGE, "enum": FD.TYPE_ENUM,
}


def _file_proto() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(fdp)
    return fdp


FILE = _file_proto()


def _message(path: str) -> descriptor_pb2.DescriptorProto:
    names = path.split(".")
    scope = {m.name: m for m in FILE.message_type}
    msg = scope[names[0]]
    for name in names[1:]:
        msg = {m.name: m for m in msg.nested_type}[name]
    return msg


def _f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _field(path: str, name: str) -> descriptor_pb2.FieldDescriptorProto:
    return {f.name: f for f in _message(path).field}[name]


# (message, field, number, type, label, default as protoc records it or None,
#  packed, message/enum type name or None)
FIELDS = [
    ("BlobShape", "dim", 1, "int64", REP, None, True, None),
    ("BlobProto", "shape", 7, "message", OPT, None, False, ".caffe.BlobShape"),
    ("BlobProto", "data", 5, "float", REP, None, True, None),
    ("BlobProto", "diff", 6, "float", REP, None, True, None),
    ("BlobProto", "double_data", 8, "double", REP, None, True, None),
    ("BlobProto", "double_diff", 9, "double", REP, None, True, None),
    ("BlobProto", "num", 1, "int32", OPT, "0", False, None),
    ("BlobProto", "channels", 2, "int32", OPT, "0", False, None),
    ("BlobProto", "height", 3, "int32", OPT, "0", False, None),
    ("BlobProto", "width", 4, "int32", OPT, "0", False, None),
    ("BlobProtoVector", "blobs", 1, "message", REP, None, False, ".caffe.BlobProto"),
    ("Datum", "channels", 1, "int32", OPT, None, False, None),
    ("Datum", "height", 2, "int32", OPT, None, False, None),
    ("Datum", "width", 3, "int32", OPT, None, False, None),
    ("Datum", "data", 4, "bytes", OPT, None, False, None),
    ("Datum", "label", 5, "int32", OPT, None, False, None),
    ("Datum", "float_data", 6, "float", REP, None, False, None),
    ("Datum", "encoded", 7, "bool", OPT, "false", False, None),
    ("FillerParameter", "type", 1, "string", OPT, "constant", False, None),
    ("FillerParameter", "std", 6, "float", OPT, "1", False, None),
    ("FillerParameter", "sparse", 7, "int32", OPT, "-1", False, None),
    ("FillerParameter", "variance_norm", 8, "enum", OPT, "FAN_IN", False,
     ".caffe.FillerParameter.VarianceNorm"),
    ("NetParameter", "name", 1, "string", OPT, None, False, None),
    ("NetParameter", "layers", 2, "message", REP, None, False, ".caffe.V1LayerParameter"),
    ("NetParameter", "input", 3, "string", REP, None, False, None),
    ("NetParameter", "input_dim", 4, "int32", REP, None, False, None),
    ("NetParameter", "force_backward", 5, "bool", OPT, "false", False, None),
    ("NetParameter", "state", 6, "message", OPT, None, False, ".caffe.NetState"),
    ("NetParameter", "debug_info", 7, "bool", OPT, "false", False, None),
    ("NetParameter", "input_shape", 8, "message", REP, None, False, ".caffe.BlobShape"),
    ("NetParameter", "layer", 100, "message", REP, None, False, ".caffe.LayerParameter"),
    ("SolverParameter", "train_net", 1, "string", OPT, None, False, None),
    ("SolverParameter", "test_net", 2, "string", REP, None, False, None),
    ("SolverParameter", "test_iter", 3, "int32", REP, None, False, None),
    ("SolverParameter", "test_interval", 4, "int32", OPT, "0", False, None),
    ("SolverParameter", "base_lr", 5, "float", OPT, None, False, None),
    ("SolverParameter", "display", 6, "int32", OPT, None, False, None),
    ("SolverParameter", "max_iter", 7, "int32", OPT, None, False, None),
    ("SolverParameter", "lr_policy", 8, "string", OPT, None, False, None),
    ("SolverParameter", "gamma", 9, "float", OPT, None, False, None),
    ("SolverParameter", "power", 10, "float", OPT, None, False, None),
    ("SolverParameter", "momentum", 11, "float", OPT, None, False, None),
    ("SolverParameter", "weight_decay", 12, "float", OPT, None, False, None),
    ("SolverParameter", "stepsize", 13, "int32", OPT, None, False, None),
    ("SolverParameter", "snapshot", 14, "int32", OPT, "0", False, None),
    ("SolverParameter", "snapshot_prefix", 15, "string", OPT, None, False, None),
    ("SolverParameter", "solver_mode", 17, "enum", OPT, "GPU", False,
     ".caffe.SolverParameter.SolverMode"),
    ("SolverParameter", "random_seed", 20, "int64", OPT, "-1", False, None),
    ("SolverParameter", "net", 24, "string", OPT, None, False, None),
    ("SolverParameter", "net_param", 25, "message", OPT, None, False, ".caffe.NetParameter"),
    ("SolverParameter", "regularization_type", 29, "string", OPT, "L2", False, None),
    ("SolverParameter", "solver_type", 30, "enum", OPT, "SGD", False,
     ".caffe.SolverParameter.SolverType"),
    ("SolverParameter", "delta", 31, "float", OPT, "1e-08", False, None),
    ("SolverParameter", "average_loss", 33, "int32", OPT, "1", False, None),
    ("SolverParameter", "stepvalue", 34, "int32", REP, None, False, None),
    ("SolverParameter", "clip_gradients", 35, "float", OPT, "-1", False, None),
    ("SolverParameter", "iter_size", 36, "int32", OPT, "1", False, None),
    ("SolverParameter", "snapshot_format", 37, "enum", OPT, "BINARYPROTO", False,
     ".caffe.SolverParameter.SnapshotFormat"),
    ("SolverParameter", "rms_decay", 38, "float", OPT, "0.99", False, None),
    ("SolverParameter", "momentum2", 39, "float", OPT, "0.999", False, None),
    ("SolverParameter", "type", 40, "string", OPT, "SGD", False, None),
    ("SolverParameter", "layer_wise_reduce", 41, "bool", OPT, "true", False, None),
    ("SolverParameter", "weights", 42, "string", REP, None, False, None),
    ("SolverState", "iter", 1, "int32", OPT, None, False, None),
    ("SolverState", "learned_net", 2, "string", OPT, None, False, None),
    ("SolverState", "history", 3, "message", REP, None, False, ".caffe.BlobProto"),
    ("SolverState", "current_step", 4, "int32", OPT, "0", False, None),
    ("NetState", "phase", 1, "enum", OPT, "TEST", False, ".caffe.Phase"),
    ("NetState", "level", 2, "int32", OPT, "0", False, None),
    ("NetState", "stage", 3, "string", REP, None, False, None),
    ("NetStateRule", "phase", 1, "enum", OPT, None, False, ".caffe.Phase"),
    ("NetStateRule", "not_stage", 5, "string", REP, None, False, None),
    ("ParamSpec", "name", 1, "string", OPT, None, False, None),
    ("ParamSpec", "share_mode", 2, "enum", OPT, None, False, ".caffe.ParamSpec.DimCheckMode"),
    ("ParamSpec", "lr_mult", 3, "float", OPT, "1", False, None),
    ("ParamSpec", "decay_mult", 4, "float", OPT, "1", False, None),
    ("LayerParameter", "name", 1, "string", OPT, None, False, None),
    ("LayerParameter", "type", 2, "string", OPT, None, False, None),
    ("LayerParameter", "bottom", 3, "string", REP, None, False, None),
    ("LayerParameter", "top", 4, "string", REP, None, False, None),
    ("LayerParameter", "loss_weight", 5, "float", REP, None, False, None),
    ("LayerParameter", "param", 6, "message", REP, None, False, ".caffe.ParamSpec"),
    ("LayerParameter", "blobs", 7, "message", REP, None, False, ".caffe.BlobProto"),
    ("LayerParameter", "include", 8, "message", REP, None, False, ".caffe.NetStateRule"),
    ("LayerParameter", "exclude", 9, "message", REP, None, False, ".caffe.NetStateRule"),
    ("LayerParameter", "phase", 10, "enum", OPT, None, False, ".caffe.Phase"),
    ("LayerParameter", "propagate_down", 11, "bool", REP, None, False, None),
    ("LayerParameter", "transform_param", 100, "message", OPT, None, False,
     ".caffe.TransformationParameter"),
    ("LayerParameter", "loss_param", 101, "message", OPT, None, False, ".caffe.LossParameter"),
    ("LayerParameter", "convolution_param", 106, "message", OPT, None, False,
     ".caffe.ConvolutionParameter"),
    ("ConvolutionParameter", "num_output", 1, "uint32", OPT, None, False, None),
    ("ConvolutionParameter", "bias_term", 2, "bool", OPT, "true", False, None),
    ("ConvolutionParameter", "pad", 3, "uint32", REP, None, False, None),
    ("ConvolutionParameter", "kernel_size", 4, "uint32", REP, None, False, None),
    ("ConvolutionParameter", "group", 5, "uint32", OPT, "1", False, None),
    ("ConvolutionParameter", "stride", 6, "uint32", REP, None, False, None),
    ("ConvolutionParameter", "dilation", 18, "uint32", REP, None, False, None),
    ("ConvolutionParameter", "engine", 15, "enum", OPT, "DEFAULT", False,
     ".caffe.ConvolutionParameter.Engine"),
    ("ConvolutionParameter", "axis", 16, "int32", OPT, "1", False, None),
    ("PoolingParameter", "pool", 1, "enum", OPT, "MAX", False,
     ".caffe.PoolingParameter.PoolMethod"),
    ("PoolingParameter", "kernel_size", 2, "uint32", OPT, None, False, None),
    ("PoolingParameter", "stride", 3, "uint32", OPT, "1", False, None),
    ("PoolingParameter", "pad", 4, "uint32", OPT, "0", False, None),
    ("PoolingParameter", "global_pooling", 12, "bool", OPT, "false", False, None),
    ("PoolingParameter", "round_mode", 13, "enum", OPT, "CEIL", False,
     ".caffe.PoolingParameter.RoundMode"),
    ("InnerProductParameter", "axis", 5, "int32", OPT, "1", False, None),
    ("InnerProductParameter", "transpose", 6, "bool", OPT, "false", False, None),
    ("LRNParameter", "local_size", 1, "uint32", OPT, "5", False, None),
    ("LRNParameter", "beta", 3, "float", OPT, "0.75", False, None),
    ("LRNParameter", "k", 5, "float", OPT, "1", False, None),
    ("LossParameter", "ignore_label", 1, "int32", OPT, None, False, None),
    ("LossParameter", "normalize", 2, "bool", OPT, None, False, None),
    ("LossParameter", "normalization", 3, "enum", OPT, "VALID", False,
     ".caffe.LossParameter.NormalizationMode"),
    ("TransformationParameter", "scale", 1, "float", OPT, "1", False, None),
    ("TransformationParameter", "crop_size", 3, "uint32", OPT, "0", False, None),
    ("TransformationParameter", "mean_value", 5, "float", REP, None, False, None),
    ("BatchNormParameter", "use_global_stats", 1, "bool", OPT, None, False, None),
    ("BatchNormParameter", "moving_average_fraction", 2, "float", OPT, "0.999", False, None),
    ("BatchNormParameter", "eps", 3, "float", OPT, "1e-05", False, None),
    ("DataParameter", "batch_size", 4, "uint32", OPT, None, False, None),
    ("DataParameter", "backend", 8, "enum", OPT, "LEVELDB", False, ".caffe.DataParameter.DB"),
    ("DataParameter", "prefetch", 10, "uint32", OPT, "4", False, None),
    ("ConcatParameter", "concat_dim", 1, "uint32", OPT, "1", False, None),
    ("ConcatParameter", "axis", 2, "int32", OPT, "1", False, None),
    ("SliceParameter", "axis", 3, "int32", OPT, "1", False, None),
    ("ClipParameter", "min", 1, "float", REQ, None, False, None),
    ("ClipParameter", "max", 2, "float", REQ, None, False, None),
    ("SwishParameter", "beta", 1, "float", OPT, "1", False, None),
    ("InfogainLossParameter", "axis", 2, "int32", OPT, "1", False, None),
    ("MVNParameter", "eps", 3, "float", OPT, "1e-09", False, None),
    ("ImageDataParameter", "batch_size", 4, "uint32", OPT, "1", False, None),
    ("WindowDataParameter", "crop_mode", 11, "string", OPT, "warp", False, None),
    ("V1LayerParameter", "layer", 1, "message", OPT, None, False, ".caffe.V0LayerParameter"),
    ("V1LayerParameter", "type", 5, "enum", OPT, None, False,
     ".caffe.V1LayerParameter.LayerType"),
    ("V1LayerParameter", "blobs", 6, "message", REP, None, False, ".caffe.BlobProto"),
    ("V1LayerParameter", "blobs_lr", 7, "float", REP, None, False, None),
    ("V1LayerParameter", "convolution_param", 10, "message", OPT, None, False,
     ".caffe.ConvolutionParameter"),
    ("V1LayerParameter", "param", 1001, "string", REP, None, False, None),
    ("V1LayerParameter", "blob_share_mode", 1002, "enum", REP, None, False,
     ".caffe.V1LayerParameter.DimCheckMode"),
    ("V0LayerParameter", "kernelsize", 8, "uint32", OPT, None, False, None),
    ("V0LayerParameter", "blobs", 50, "message", REP, None, False, ".caffe.BlobProto"),
    ("V0LayerParameter", "det_context_pad", 58, "uint32", OPT, "0", False, None),
    ("V0LayerParameter", "hdf5_output_param", 1001, "message", OPT, None, False,
     ".caffe.HDF5OutputParameter"),
]

# LayerParameter's type-specific fields: name -> number (Caffe master).
LAYER_PARAM_NUMBERS = {
    "accuracy_param": 102, "argmax_param": 103, "batch_norm_param": 139,
    "bias_param": 141, "clip_param": 148, "concat_param": 104,
    "contrastive_loss_param": 105, "convolution_param": 106, "crop_param": 144,
    "data_param": 107, "dropout_param": 108, "dummy_data_param": 109,
    "eltwise_param": 110, "elu_param": 140, "embed_param": 137, "exp_param": 111,
    "flatten_param": 135, "hdf5_data_param": 112, "hdf5_output_param": 113,
    "hinge_loss_param": 114, "image_data_param": 115, "infogain_loss_param": 116,
    "inner_product_param": 117, "input_param": 143, "log_param": 134,
    "lrn_param": 118, "memory_data_param": 119, "mvn_param": 120,
    "parameter_param": 145, "pooling_param": 121, "power_param": 122,
    "prelu_param": 131, "python_param": 130, "recurrent_param": 146,
    "reduction_param": 136, "relu_param": 123, "reshape_param": 133,
    "scale_param": 142, "sigmoid_param": 124, "softmax_param": 125,
    "spp_param": 132, "slice_param": 126, "swish_param": 147, "tanh_param": 127,
    "threshold_param": 128, "tile_param": 138, "window_data_param": 129,
    "transform_param": 100, "loss_param": 101,
}

ENUMS = {
    "Phase": {"TRAIN": 0, "TEST": 1},
    "SolverParameter.SnapshotFormat": {"HDF5": 0, "BINARYPROTO": 1},
    "SolverParameter.SolverMode": {"CPU": 0, "GPU": 1},
    "SolverParameter.SolverType": {"SGD": 0, "NESTEROV": 1, "ADAGRAD": 2,
                                   "RMSPROP": 3, "ADADELTA": 4, "ADAM": 5},
    "LossParameter.NormalizationMode": {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2,
                                        "NONE": 3},
    "FillerParameter.VarianceNorm": {"FAN_IN": 0, "FAN_OUT": 1, "AVERAGE": 2},
    "PoolingParameter.PoolMethod": {"MAX": 0, "AVE": 1, "STOCHASTIC": 2},
    "PoolingParameter.RoundMode": {"CEIL": 0, "FLOOR": 1},
    "EltwiseParameter.EltwiseOp": {"PROD": 0, "SUM": 1, "MAX": 2},
    "ReductionParameter.ReductionOp": {"SUM": 1, "ASUM": 2, "SUMSQ": 3, "MEAN": 4},
    "HingeLossParameter.Norm": {"L1": 1, "L2": 2},
    "DataParameter.DB": {"LEVELDB": 0, "LMDB": 1},
    "ParamSpec.DimCheckMode": {"STRICT": 0, "PERMISSIVE": 1},
}

V1_LAYER_TYPES = {
    "NONE": 0, "ABSVAL": 35, "ACCURACY": 1, "ARGMAX": 30, "BNLL": 2, "CONCAT": 3,
    "CONTRASTIVE_LOSS": 37, "CONVOLUTION": 4, "DATA": 5, "DECONVOLUTION": 39,
    "DROPOUT": 6, "DUMMY_DATA": 32, "EUCLIDEAN_LOSS": 7, "ELTWISE": 25, "EXP": 38,
    "FLATTEN": 8, "HDF5_DATA": 9, "HDF5_OUTPUT": 10, "HINGE_LOSS": 28,
    "IM2COL": 11, "IMAGE_DATA": 12, "INFOGAIN_LOSS": 13, "INNER_PRODUCT": 14,
    "LRN": 15, "MEMORY_DATA": 29, "MULTINOMIAL_LOGISTIC_LOSS": 16, "MVN": 34,
    "POOLING": 17, "POWER": 26, "RELU": 18, "SIGMOID": 19,
    "SIGMOID_CROSS_ENTROPY_LOSS": 27, "SILENCE": 36, "SOFTMAX": 20,
    "SOFTMAX_LOSS": 21, "SPLIT": 22, "SLICE": 33, "TANH": 23, "WINDOW_DATA": 24,
    "THRESHOLD": 31,
}

# Every top-level message in Caffe master's caffe.proto.
CAFFE_MESSAGES = {
    "BlobShape", "BlobProto", "BlobProtoVector", "Datum", "FillerParameter",
    "NetParameter", "SolverParameter", "SolverState", "NetState", "NetStateRule",
    "ParamSpec", "LayerParameter", "TransformationParameter", "LossParameter",
    "AccuracyParameter", "ArgMaxParameter", "ClipParameter", "ConcatParameter",
    "BatchNormParameter", "BiasParameter", "ContrastiveLossParameter",
    "ConvolutionParameter", "CropParameter", "DataParameter", "DropoutParameter",
    "DummyDataParameter", "EltwiseParameter", "ELUParameter", "EmbedParameter",
    "ExpParameter", "FlattenParameter", "HDF5DataParameter",
    "HDF5OutputParameter", "HingeLossParameter", "ImageDataParameter",
    "InfogainLossParameter", "InnerProductParameter", "InputParameter",
    "LogParameter", "LRNParameter", "MemoryDataParameter", "MVNParameter",
    "ParameterParameter", "PoolingParameter", "PowerParameter",
    "PythonParameter", "RecurrentParameter", "ReductionParameter",
    "ReLUParameter", "ReshapeParameter", "ScaleParameter", "SigmoidParameter",
    "SliceParameter", "SoftmaxParameter", "SwishParameter", "TanHParameter",
    "TileParameter", "ThresholdParameter", "WindowDataParameter",
    "SPPParameter", "V1LayerParameter", "V0LayerParameter", "PReLUParameter",
}

# Non-BVLC messages (SSD, ShuffleNet, darknet2caffe, DeepLab forks) and their LayerParameter
# field numbers in those forks (interp_param: 2143, as DeepLab's 143 is BVLC's input_param).
NON_BVLC_MESSAGES = {
    "UpsampleParameter", "ShuffleChannelParameter", "PermuteParameter", "NormalizeParameter",
    "PriorBoxParameter", "NonMaximumSuppressionParameter", "ResizeParameter",
    "SaveOutputParameter", "DetectionOutputParameter", "InterpParameter",
}
NON_BVLC_LAYER_PARAM_NUMBERS = {
    "upsample_param": 149, "shuffle_channel_param": 164, "permute_param": 202,
    "prior_box_param": 203, "detection_output_param": 204, "norm_param": 206,
    "interp_param": 2143,
}


def test_generated_module_is_current():
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools not installed")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Field numbers inside the non-BVLC messages, as SSD's / DeepLab's / ShuffleNet's protos have them.
NON_BVLC_FIELDS = [
    ("PermuteParameter", "order", 1), ("NormalizeParameter", "channel_shared", 3),
    ("NormalizeParameter", "eps", 4), ("PriorBoxParameter", "variance", 6),
    ("PriorBoxParameter", "img_size", 7), ("PriorBoxParameter", "step", 10),
    ("PriorBoxParameter", "offset", 13), ("NonMaximumSuppressionParameter", "eta", 3),
    ("DetectionOutputParameter", "code_type", 6), ("DetectionOutputParameter", "keep_top_k", 7),
    ("DetectionOutputParameter", "variance_encoded_in_target", 8),
    ("DetectionOutputParameter", "confidence_threshold", 9), ("InterpParameter", "pad_end", 6),
    ("UpsampleParameter", "scale", 1), ("ShuffleChannelParameter", "group", 1),
]


@pytest.mark.parametrize("msg,name,number", NON_BVLC_FIELDS)
def test_non_bvlc_field_numbers(msg, name, number):
    assert _field(msg, name).number == number


def test_file_identity():
    assert FILE.package == "caffe"
    assert FILE.syntax in ("", "proto2")
    assert {m.name for m in FILE.message_type} == CAFFE_MESSAGES | NON_BVLC_MESSAGES
    assert [e.name for e in FILE.enum_type] == ["Phase"]


def test_fact_table_is_large_enough():
    assert len(FIELDS) >= 40


@pytest.mark.parametrize(
    "msg,name,number,ftype,label,default,packed,type_name", FIELDS,
    ids=[f"{m}.{n}" for m, n, *_ in FIELDS],
)
def test_field(msg, name, number, ftype, label, default, packed, type_name):
    f = _field(msg, name)
    assert f.number == number
    assert f.type == TYPES[ftype]
    assert f.label == label
    if default is None:
        assert not f.HasField("default_value"), f.default_value
    elif ftype == "float":
        # protoc prints float defaults at float32 precision ("9.99999972e-10").
        assert _f32(float(f.default_value)) == _f32(float(default))
    else:
        assert f.default_value == default
    assert bool(f.options.packed) == packed
    if type_name is not None:
        assert f.type_name == type_name


def test_layer_parameter_type_specific_numbers():
    fields = {f.name: f for f in _message("LayerParameter").field}
    numbers = {**LAYER_PARAM_NUMBERS, **NON_BVLC_LAYER_PARAM_NUMBERS}
    for name, number in numbers.items():
        assert fields[name].number == number, name
        assert fields[name].label == OPT, name
    # Nothing beyond the common fields and the type-specific ones.
    common = {"name", "type", "bottom", "top", "phase", "loss_weight", "param",
              "blobs", "propagate_down", "include", "exclude"}
    assert set(fields) == common | set(numbers)


def test_field_numbers_unique_per_message():
    def walk(msgs, prefix=""):
        for m in msgs:
            nums = [f.number for f in m.field]
            assert len(nums) == len(set(nums)), prefix + m.name
            walk(m.nested_type, prefix + m.name + ".")
    walk(FILE.message_type)


@pytest.mark.parametrize("path", sorted(ENUMS))
def test_enum_values(path):
    parts = path.split(".")
    if len(parts) == 1:
        enum = {e.name: e for e in FILE.enum_type}[parts[0]]
    else:
        enum = {e.name: e for e in _message(".".join(parts[:-1])).enum_type}[parts[-1]]
    assert {v.name: v.number for v in enum.value} == ENUMS[path]


def test_v1_layer_type_enum():
    enum = {e.name: e for e in _message("V1LayerParameter").enum_type}["LayerType"]
    assert {v.name: v.number for v in enum.value} == V1_LAYER_TYPES


def test_blobproto_wire_bytes():
    # Packed float data (field 5, wire type 2) then shape (field 7) with packed dims.
    blob = caffe_pb2.BlobProto()
    blob.data.extend([1.0, -2.0])
    blob.shape.dim.extend([2, 3])
    expected = (b"\x2a\x08" + struct.pack("<2f", 1.0, -2.0)
                + b"\x3a\x04\x0a\x02\x02\x03")
    assert blob.SerializeToString() == expected
    back = caffe_pb2.BlobProto.FromString(expected)
    assert list(back.data) == [1.0, -2.0] and list(back.shape.dim) == [2, 3]


def test_datum_wire_bytes():
    datum = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"\x00\x01\x02\x03",
                            label=7)
    assert datum.SerializeToString() == (
        b"\x08\x01\x10\x02\x18\x02\x22\x04\x00\x01\x02\x03\x28\x07")


def test_legacy_unpacked_floats_still_parse():
    # Very old writers emitted data/diff unpacked; proto2 parsers must accept it.
    raw = b"".join(b"\x2d" + struct.pack("<f", v) for v in (0.5, 1.5))
    assert list(caffe_pb2.BlobProto.FromString(raw).data) == [0.5, 1.5]


def test_defaults_visible_through_api():
    s = caffe_pb2.SolverParameter()
    assert s.type == "SGD" and s.solver_mode == s.GPU and s.random_seed == -1
    assert s.snapshot_format == s.BINARYPROTO and s.regularization_type == "L2"
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID
    assert caffe_pb2.PoolingParameter().stride == 1


ZOO_FILES = sorted(ZOO.rglob("*.prototxt")) if ZOO.is_dir() else []


def test_zoo_present():
    if not ZOO.is_dir():
        pytest.skip(f"{ZOO} not available")
    assert ZOO_FILES


@pytest.mark.parametrize(
    "path", ZOO_FILES, ids=[str(p.relative_to(ZOO)) for p in ZOO_FILES])
def test_zoo_prototxt_parses(path):
    is_solver = "solver" in path.name
    msg = caffe_pb2.SolverParameter() if is_solver else caffe_pb2.NetParameter()
    text_format.Parse(path.read_text(), msg)
    if is_solver:
        assert msg.HasField("base_lr")
    else:
        assert len(msg.layer) > 0
        # Text round trip is lossless.
        again = type(msg)()
        text_format.Parse(text_format.MessageToString(msg), again)
        assert again == msg
