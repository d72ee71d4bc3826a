"""Python layers: ``type: "Python"`` runs a class the user wrote, as pycaffe's PythonLayer.

::

    layer { name: "loss" type: "Python" bottom: "pred" bottom: "label" top: "loss"
            python_param { module: "pyloss" layer: "EuclideanLoss" param_str: "..." }
            loss_weight: 1 }

``module`` is imported with Python's ordinary import, so it is found on ``sys.path``
(PYTHONPATH) and nowhere else: the folder of the prototxt is never added, so a model
downloaded with a Python file beside it runs no code unless the user put that folder on
their path. The class must derive from :class:`PyLayer` (pycaffe's ``caffe.Layer``); it is
built with the LayerParameter, then given ``param_str`` and ``phase``, and lives through
Caffe's cycle: ``setup(bottom, top)`` once, ``reshape(bottom, top)`` before every forward,
``forward(bottom, top)`` and ``backward(top, propagate_down, bottom)``. Its ``self.blobs``
(``self.blobs.add_blob(*shape)``) are learnable parameters like any layer's: saved in the
.caffemodel, loaded by ``copy_from``, updated by the solver with the prototxt's ``param``
specs. A Python loss layer needs an explicit ``loss_weight``, as in Caffe.

An exception raised in the user's code keeps its type and traceback and carries a note
naming the layer, its class and the call. For models one does not trust, Python layers can
be refused outright: ``OWLNET_NO_PYTHON_LAYERS=1`` in the environment, or
:func:`refuse_python_layers` (what the tools' ``--no-python-layers`` calls), and any net
naming one fails to build with a ConfigError before any module is imported.

``share_in_parallel`` is read but has no effect: every data-parallel slice builds its own
instance of the class (what Caffe does when it is false).
"""
from __future__ import annotations

import importlib
import os
import re

from ..blob import Blob
from ..errors import ConfigError
from .base import Layer, register

#: Environment variable that, set to a non-empty value other than "0", refuses Python layers.
REFUSE_VARIABLE = "OWLNET_NO_PYTHON_LAYERS"
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def refuse_python_layers() -> None:
    """Refuse every Python layer from now on, in this process and the processes it starts
    (sets ``OWLNET_NO_PYTHON_LAYERS=1``): for models whose code one does not trust."""
    os.environ[REFUSE_VARIABLE] = "1"


def python_layers_refused() -> bool:
    return os.environ.get(REFUSE_VARIABLE, "") not in ("", "0")


class BlobVec(list):
    """A Python layer's parameter blobs: a list of Blobs with pycaffe's ``add_blob``."""

    def __init__(self, layer_name: str = ""):
        super().__init__()
        self.layer_name = layer_name

    def add_blob(self, *shape) -> Blob:
        """Append a zero-filled Blob of ``shape``."""
        blob = Blob(shape, name=f"{self.layer_name}.{len(self)}")
        self.append(blob)
        return blob


class PyLayer:
    """Base class of Python layers (pycaffe's ``caffe.Layer``): subclass it and define
    ``setup``, ``reshape``, ``forward`` and (for training) ``backward``."""

    def __init__(self, layer_param=None):
        self.layer_param = layer_param
        self.name = layer_param.name if layer_param is not None else ""
        self.type = "Python"
        self.blobs = BlobVec(self.name)
        self.param_str = ""
        self.phase = None

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        raise NotImplementedError(f"Python layer '{self.name}' defines no reshape()")

    def forward(self, bottom, top):
        raise NotImplementedError(f"Python layer '{self.name}' defines no forward()")

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(f"Python layer '{self.name}' defines no backward()")


def load_layer_class(module_name: str, class_name: str, layer_name: str) -> type:
    """The PyLayer subclass ``module_name.class_name``, imported from ``sys.path``."""
    where = f"layer '{layer_name}' (Python)"
    if python_layers_refused():
        raise ConfigError(f"{where}: Python layers are refused ({REFUSE_VARIABLE} is set or "
                          f"--no-python-layers was given); this model would import module "
                          f"'{module_name}' and run its class '{class_name}'")
    if not _MODULE_NAME.match(module_name):
        raise ConfigError(f"{where}: python_param.module {module_name!r} is not a module name "
                          "(dotted identifiers, found on sys.path; not a file path)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            _note(exc, f"while importing module '{module_name}' for {where}")
            raise
        raise ConfigError(f"{where}: module '{module_name}' not found on sys.path; put its "
                          "folder on PYTHONPATH (owlnet never imports from the model's "
                          "folder by itself)") from None
    except Exception as exc:
        _note(exc, f"while importing module '{module_name}' for {where}")
        raise
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"{where}: module '{module_name}' ({module.__file__}) has no "
                          f"class '{class_name}'")
    if not (isinstance(cls, type) and issubclass(cls, PyLayer)):
        raise ConfigError(f"{where}: '{module_name}.{class_name}' is not a subclass of "
                          "owlnet.Layer (caffe.Layer)")
    return cls


def _note(exc: BaseException, text: str) -> None:
    """Attach ``text`` to ``exc`` for its traceback (notes exist from Python 3.11 on)."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)


@register("Python")
class PythonLayer(Layer):
    """Runs the user's PyLayer subclass named by ``python_param`` (see the module docstring).

    The math is the user's; this adapter passes the Blobs through and shares ``blobs`` with
    the user's object, so the net sees its parameters.
    """

    def __init__(self, layer_param, phase):
        super().__init__(layer_param, phase)
        spec = layer_param.python_param
        cls = load_layer_class(spec.module, spec.layer, self.name)
        self.call_name = f"{spec.module}.{spec.layer}"
        self.user = self._call("__init__", cls, layer_param)
        self.user.param_str = spec.param_str
        self.user.phase = phase
        self.blobs = self.user.blobs

    def _call(self, stage, function, *args):
        try:
            return function(*args)
        except Exception as exc:
            _note(exc, f"in Python layer '{self.name}' ({self.call_name}.{stage})")
            raise

    def layer_setup(self, bottom, top):
        self._call("setup", self.user.setup, bottom, top)
        self.blobs = self.user.blobs

    def reshape(self, bottom, top):
        self._call("reshape", self.user.reshape, bottom, top)

    def forward(self, bottom, top):
        self._call("forward", self.user.forward, bottom, top)

    def backward(self, top, propagate_down, bottom):
        self._call("backward", self.user.backward, top, propagate_down, bottom)
