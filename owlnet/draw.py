"""Draw a net's graph with Graphviz (pycaffe's ``caffe.draw``; needs the ``draw`` extra).

Layers are boxes (coloured by kind: convolution red, pooling orange, inner product purple,
others blue), blobs are octagons, an in-place layer (one bottom, the same top) is an
ellipse. Edges from a layer to its tops carry the batch size of Data layers and the
``num_output`` of Convolution, Deconvolution and InnerProduct. ``phase`` (TRAIN or TEST)
keeps only the layers its include/exclude rules admit for that phase; ``display_lrm`` adds
each layer's learning-rate multipliers to its label.

Needs the ``pydot`` package and Graphviz's ``dot`` program (``pip install owlnet[draw]``;
``dot`` comes from the system's graphviz package).
"""
from __future__ import annotations

from .errors import OwlnetError
from .fileio import atomic_write
from .proto import caffe_pb2

LAYER_STYLE = {"shape": "record", "style": "filled"}
IN_PLACE_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
_COLOURS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
            "InnerProduct": "#CC33FF"}
_DEFAULT_COLOUR = "#6495ED"


def _pydot():
    try:
        import pydot  # noqa: PLC0415
    except ImportError:
        raise OwlnetError("drawing nets needs pydot and Graphviz: pip install 'owlnet[draw]' "
                          "and install the graphviz package of your system") from None
    return pydot


def get_pooling_types_dict() -> dict:
    """Pooling method number -> name (0 -> "MAX", ...)."""
    methods = caffe_pb2.PoolingParameter.PoolMethod
    return {methods.Value(name): name for name in methods.keys()}


def choose_color_by_layertype(layertype: str) -> str:
    return _COLOURS.get(layertype, _DEFAULT_COLOUR)


def get_edge_label(layer) -> str:
    """What the edges out of ``layer`` say: batch size or number of outputs, else nothing."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer) -> str:
    """The learning-rate multipliers of the layer's parameters, for its label."""
    if not layer.param:
        return ""
    return ", ".join(f"lr mult: {spec.lr_mult:g}" for spec in layer.param)


def _first(values, default):
    return values[0] if len(values) else default


def get_layer_label(layer, rankdir: str, display_lrm: bool = False) -> str:
    """The node text: name, type and, for convolution and pooling, kernel, stride and pad."""
    separator = " " if rankdir in ("TB", "BT") else "\\n"
    parts = [layer.name, f"({layer.type})"]
    if layer.type in ("Convolution", "Deconvolution"):
        conv = layer.convolution_param
        parts += [f"kernel size: {_first(conv.kernel_size, conv.kernel_h or 1)}",
                  f"stride: {_first(conv.stride, conv.stride_h or 1)}",
                  f"pad: {_first(conv.pad, conv.pad_h)}"]
    elif layer.type == "Pooling":
        pool = layer.pooling_param
        parts += [f"pool type: {get_pooling_types_dict()[pool.pool]}",
                  f"kernel size: {pool.kernel_size or pool.kernel_h}",
                  f"stride: {pool.stride_h or pool.stride}", f"pad: {pool.pad_h or pool.pad}"]
    if display_lrm and layer.param:
        parts.append(get_layer_lr_mult(layer))
    return '"' + separator.join(parts) + '"'


def _admitted(layer, phase) -> bool:
    """Whether ``layer`` is drawn for ``phase``: an include rule of that phase (or none at
    all), and no exclude rule of that phase."""
    if phase is None:
        return True
    included = not layer.include or any(rule.phase == phase for rule in layer.include)
    return included and not any(rule.phase == phase for rule in layer.exclude)


def get_pydot_graph(caffe_net, rankdir: str, label_edges: bool = True, phase=None,
                    display_lrm: bool = False):
    """A pydot graph of a NetParameter: a node per layer and per blob, edges between them."""
    pydot = _pydot()
    graph = pydot.Dot(caffe_net.name or "Net", graph_type="digraph", rankdir=rankdir)
    nodes, edges = {}, []
    for layer in caffe_net.layer:
        if not _admitted(layer, phase):
            continue
        node = f"{layer.name}_{layer.type}"
        label = get_layer_label(layer, rankdir, display_lrm)
        in_place = len(layer.bottom) == 1 and list(layer.top) == list(layer.bottom)
        style = IN_PLACE_STYLE if in_place else dict(
            LAYER_STYLE, fillcolor=choose_color_by_layertype(layer.type))
        nodes[node] = pydot.Node(label, **style)
        for bottom in layer.bottom:
            nodes[f"{bottom}_blob"] = pydot.Node(f'"{bottom}"', **BLOB_STYLE)
            edges.append((f"{bottom}_blob", node, '""'))
        for top in layer.top:
            nodes[f"{top}_blob"] = pydot.Node(f'"{top}"', **BLOB_STYLE)
            edges.append((node, f"{top}_blob", get_edge_label(layer) if label_edges else '""'))
    for node in nodes.values():
        graph.add_node(node)
    for source, target, label in edges:
        graph.add_edge(pydot.Edge(nodes[source], nodes[target], label=label))
    return graph


def draw_net(caffe_net, rankdir: str, ext: str = "png", phase=None,
             display_lrm: bool = False) -> bytes:
    """The net drawn as an image file's bytes (``ext``: png, pdf, svg, ... as dot makes)."""
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    try:
        return graph.create(format=ext)
    except FileNotFoundError:
        raise OwlnetError("drawing nets needs Graphviz's 'dot' program on PATH (install the "
                          "graphviz package of your system)") from None


def draw_net_to_file(caffe_net, filename, rankdir: str = "LR", phase=None,
                     display_lrm: bool = False) -> None:
    """Draw the net into ``filename``; its extension picks the format."""
    ext = str(filename).rsplit(".", 1)[-1]
    atomic_write(filename, draw_net(caffe_net, rankdir, ext, phase, display_lrm))
