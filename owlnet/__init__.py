"""owlnet: train Caffe-defined networks on NumPy (CPU) or CuPy/cuDNN (GPU).

The names here follow pycaffe's, so a Caffe user's scripts carry over (``import caffe``
gives this same package, see the ``caffe`` package beside it)::

    import owlnet as caffe
    net = caffe.Net("deploy.prototxt", "weights.caffemodel", caffe.TEST)
    out = net.forward(data=batch)
"""
from . import io, proto  # noqa: F401  (pycaffe's caffe.io and caffe.proto)
from . import layer_types as _layer_types  # noqa: F401  (registers every layer type)
from .backend import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .blob import Blob
from .classifier import Classifier
from .detector import Detector
from .errors import (ConfigError, DataError, OwlnetError, ShapeError, SnapshotError,
                     TrainingError)
from .layer_types import known_types as layer_type_list
from .layer_types.python import PyLayer as Layer
from .layer_types.python import refuse_python_layers
from .nccl import (NCCL, Timer, has_nccl, init_log, log, set_multiprocess, set_solver_count,
                   set_solver_rank, solver_count, solver_rank)
from .net import TEST, TRAIN, Net
from .net_spec import NetSpec, layers, params, to_proto
from .onnx_export import export_onnx
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                     SGDSolver, Solver, get_solver)

__all__ = [
    "Net", "Blob", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device",
    "set_random_seed", "layer_type_list", "OwlnetError", "ConfigError", "ShapeError",
    "DataError", "SnapshotError", "TrainingError", "Solver", "SGDSolver", "NesterovSolver",
    "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "get_solver",
    "Layer", "refuse_python_layers", "Classifier", "Detector", "NetSpec", "layers", "params",
    "to_proto", "NCCL", "has_nccl", "set_solver_count", "set_solver_rank", "solver_count",
    "solver_rank", "set_multiprocess", "init_log", "log", "Timer", "io", "proto",
    "export_onnx",
]
__version__ = "0.1.0"
