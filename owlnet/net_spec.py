"""NetSpec: write a net in Python and get its NetParameter (pycaffe's ``caffe.net_spec``).

::

    from owlnet import layers as L, params as P
    n = owlnet.NetSpec()
    n.data, n.label = L.Data(source="train_lmdb", backend=P.Data.LMDB, batch_size=64, ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    print(n.to_proto())

``L.Type(*bottoms, **settings)`` makes one layer of Caffe type ``Type``. A setting goes into the
type's own parameter message (``kernel_size`` -> ``convolution_param.kernel_size``) when that
message has the field, else onto the LayerParameter itself (``loss_weight``, ``include``);
settings ending in ``param`` are always LayerParameter fields. Dicts fill sub-messages, lists
fill repeated fields (a list of dicts adds one message each). ``ntop`` (default 1) is the
number of tops, ``in_place=True`` makes the tops the bottoms. The call returns the top (one),
a tuple of tops (several) or the layer itself (``ntop=0``).

Names: tops assigned to a NetSpec attribute take that name, and a layer takes its first top's
name; others are named after their type and a counter (``Convolution1``), as pycaffe does.
"""
from __future__ import annotations

from collections import Counter, OrderedDict

from .proto import caffe_pb2


def param_name_dict() -> dict:
    """Layer type -> prefix of its parameter field (``"InnerProduct"`` -> ``"inner_product"``),
    from the LayerParameter's ``*_param`` fields and their message types."""
    names = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    names.setdefault("Deconvolution", "convolution")
    return names


_PARAM_NAMES = param_name_dict()


def assign_proto(proto, name: str, value) -> None:
    """Set field ``name`` of ``proto`` from a Python value: dicts fill sub-messages, lists (or
    a single value, for a repeated field) extend repeated fields."""
    field = getattr(proto, name)
    repeated = hasattr(field, "extend")
    if repeated and not isinstance(value, (list, tuple)):
        value = [value]
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], dict):
            for item in value:
                message = field.add()
                for key, sub in item.items():
                    assign_proto(message, key, sub)
        else:
            field.extend(value)
    elif isinstance(value, dict):
        for key, sub in value.items():
            assign_proto(field, key, sub)
    else:
        setattr(proto, name, value)


class Top:
    """The ``n``-th output of a layer (a Function) in a NetSpec graph."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """The NetParameter of every layer this top depends on."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function:
    """One layer of a NetSpec graph: its type, bottoms (Tops) and settings."""

    def __init__(self, type_name: str, inputs, params: dict):
        self.type_name = type_name
        for index, item in enumerate(inputs):
            if not isinstance(item, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(item)})")
        self.inputs = tuple(inputs)
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _auto_name(self, owner, names, autonames) -> str:
        autonames[self.type_name] += 1
        names[owner] = f"{self.type_name}{autonames[self.type_name]}"
        return names[owner]

    def _top_name(self, top, names, autonames) -> str:
        return names[top] if top in names else top.fn._auto_name(top, names, autonames)

    def _layer_name(self, names, autonames) -> str:
        if self not in names:
            if self.tops:
                names[self] = self._top_name(self.tops[0], names, autonames)
            else:
                self._auto_name(self, names, autonames)
        return names[self]

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottoms = []
        for item in self.inputs:
            item._to_proto(layers, names, autonames)
            bottoms.append(layers[item.fn].top[item.n])
        layer = caffe_pb2.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        layer.name = self._layer_name(names, autonames)
        for key, value in self.params.items():
            prefix = _PARAM_NAMES.get(self.type_name)
            if not key.endswith("param") and prefix is not None and _has_field(
                    getattr(layer, f"{prefix}_param"), key):
                assign_proto(getattr(layer, f"{prefix}_param"), key, value)
            else:
                assign_proto(layer, key, value)
        layers[self] = layer


def _has_field(message, name: str) -> bool:
    return name in message.DESCRIPTOR.fields_by_name


def to_proto(*tops):
    """The NetParameter of the layers the given tops depend on, inputs first."""
    layers = OrderedDict()
    autonames = Counter()
    for top in tops:
        top._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Named tops of a net under construction: ``n.name = L.Type(...)``; ``n.to_proto()``."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top '{name}'") from None

    def __setitem__(self, key, value):
        self.__setattr__(key, value)

    def __getitem__(self, item):
        return self.__getattr__(item)

    def __delitem__(self, name):
        del self.tops[name]

    def keys(self):
        return list(self.tops.keys())

    def vals(self):
        return list(self.tops.values())

    def to_proto(self):
        names = {value: key for key, value in self.tops.items()}
        autonames = Counter()
        layers = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``layers.Type(*bottoms, **settings)`` makes a layer of Caffe type ``Type``."""

    def __getattr__(self, name):
        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        return layer_fn


class Parameters:
    """``params.Pooling.MAX``: the enum values of Caffe's ``PoolingParameter`` (and others)."""

    def __getattr__(self, name):
        message = getattr(caffe_pb2, f"{name}Parameter")

        class Param:
            def __getattr__(self, param_name):
                return getattr(message, param_name)
        return Param()


layers = Layers()
params = Parameters()
