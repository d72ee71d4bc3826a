"""owlnet: train Caffe-defined networks on NumPy (CPU) or CuPy/cuDNN (GPU).

The names here follow pycaffe's, so a Caffe user's scripts carry over::

    import owlnet as caffe
    net = caffe.Net("deploy.prototxt", "weights.caffemodel", caffe.TEST)
    out = net.forward(data=batch)
"""
from . import layer_types as _layer_types  # noqa: F401  (registers every layer type)
from .backend import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .blob import Blob
from .errors import (ConfigError, DataError, OwlnetError, ShapeError, SnapshotError,
                     TrainingError)
from .layer_types import known_types as layer_type_list
from .net import TEST, TRAIN, Net
from .onnx_export import export_onnx
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                     SGDSolver, Solver, get_solver)

__all__ = [
    "Net", "Blob", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device",
    "set_random_seed", "layer_type_list", "OwlnetError", "ConfigError", "ShapeError",
    "DataError", "SnapshotError", "TrainingError", "Solver", "SGDSolver", "NesterovSolver",
    "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "get_solver",
    "export_onnx",
]
__version__ = "0.1.0"
