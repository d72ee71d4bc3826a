"""Net: a NetParameter made into layers and blobs, with pycaffe's Python face.

Building follows Caffe's Net::Init: the file is upgraded and filtered by the NetState, a
Split layer is inserted wherever one top feeds several bottoms (so their diffs are summed),
layers are set up in file order with bottoms and tops wired by name (a top named like the
bottom at the same position is computed in place), parameters named in ``param { name }``
are shared, and the layers that need backward are found: those downstream of a parameter
with a non-zero lr_mult (or of a bottom that needs it), upstream of a loss, and with a top
that some consumer propagates into (see ``propagate_down``).
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from . import backend, config, fileio, fusion, memory, snapshot
from .arena import ParamArena
from .blob import Blob, device_current
from .errors import ConfigError, OwlnetError, ShapeError, SnapshotError
from .layer_types import create_layer
from .layer_types.base import DataSource
from .proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def insert_splits(layer_params, origins):
    """Layers with a Split after every top consumed more than once (Caffe's InsertSplits).

    A top with an explicit non-zero loss_weight counts as one more consumer; the Split's
    first top then carries that weight. Returns the new layer list and, for each layer, the
    index of the file layer it comes from (a Split takes its producer's).
    """
    last_producer = {}        # blob name -> (layer index, top index) of its latest producer
    consumers = {}            # (layer, top) -> number of uses
    loss_weight = {}          # (layer, top) -> explicit loss weight
    for i, lp in enumerate(layer_params):
        for name in lp.bottom:
            if name in last_producer:
                key = last_producer[name]
                consumers[key] = consumers.get(key, 0) + 1
        for j, name in enumerate(lp.top):
            last_producer[name] = (i, j)
        for j in range(min(len(lp.loss_weight), len(lp.top))):
            key = last_producer[lp.top[j]]
            loss_weight[key] = lp.loss_weight[j]
            if lp.loss_weight[j]:
                consumers[key] = consumers.get(key, 0) + 1

    out, out_origins = [], []
    renamed = {}              # blob name -> (split top prefix, next split index)
    for i, lp in enumerate(layer_params):
        lp = _copy(lp)
        for b, name in enumerate(lp.bottom):
            if name in renamed:
                prefix, k = renamed[name]
                lp.bottom[b] = f"{prefix}_{k}"
                renamed[name] = (prefix, k + 1)
        out.append(lp)
        out_origins.append(origins[i])
        for j, name in enumerate(lp.top):
            renamed.pop(name, None)
            count = consumers.get((i, j), 0)
            if count <= 1:
                continue
            prefix = f"{name}_{lp.name}_{j}_split"
            split = caffe_pb2.LayerParameter(name=prefix, type="Split")
            split.bottom.append(name)
            split.top.extend(f"{prefix}_{k}" for k in range(count))
            weight = loss_weight.get((i, j), 0.0)
            first = 0
            if weight:
                split.loss_weight.extend([weight] + [0.0] * (count - 1))
                lp.loss_weight[j] = 0.0
                first = 1
            renamed[name] = (prefix, first)
            out.append(split)
            out_origins.append(origins[i])
    return out, out_origins


def _copy(message):
    twin = type(message)()
    twin.CopyFrom(message)
    return twin


class Net:
    """A network built from a prototxt, used as pycaffe's ``caffe.Net``.

    ``Net(model_file, phase)``, ``Net(model_file, weights, phase)`` or keywords
    ``phase=``, ``weights=``, ``level=``, ``stages=``; ``model_file`` may also be prototxt
    text or a NetParameter. ``reuse_memory=True`` lets activations and diffs whose lifetimes
    in a training step do not overlap share storage (``owlnet.memory``; off unless given, or,
    for a TRAIN net, unless $OWLNET_REUSE_MEMORY is 1): then only kept blobs (data-layer
    tops, loss and net outputs, ``keep_blobs``, the names given to ``forward(blobs=)``/
    ``backward(diffs=)`` and the blobs at their ``start``/``end`` layers) hold their values
    after a step. With ``source`` (the ``config.Source`` that ``config.read_net``
    returned with it), ``network`` is a NetParameter already read and upgraded, used as it is
    (so a solver parses each net file once). ``fuse`` (True unless $OWLNET_FUSE is 0 when
    the net is built; may be set at any time) runs each convolution with the BatchNorm, Scale,
    Bias and ReLU after it in place as one step where no layer of them runs backward
    (``owlnet.fusion``; the blobs hold the same values).
    """

    def __init__(self, network, *args, phase=None, weights=None, level=None, stages=(),
                 source=None, reuse_memory=None, keep_blobs=()):
        if len(args) == 1:
            phase = args[0]
        elif len(args) == 2:
            weights, phase = args
        elif args:
            raise TypeError("Net(model_file, phase) or Net(model_file, weights, phase)")
        if phase not in (TRAIN, TEST):
            raise ConfigError("Net needs phase=owlnet.TRAIN or owlnet.TEST")
        if source is None:
            param, self.source = config.read_net(network)
        elif isinstance(network, caffe_pb2.NetParameter):
            param, self.source = network, source
        else:
            raise TypeError("Net(..., source=) takes the NetParameter that config.read_net read")
        state = config.make_state(param, phase, level, stages)
        param, kept = config.filter_net(param, state, self.source)
        self.phase = phase
        self.name = param.name
        self.force_backward = param.force_backward
        if reuse_memory is None:            # the switch of the training path: TRAIN nets only
            reuse_memory = phase == TRAIN and os.environ.get("OWLNET_REUSE_MEMORY") == "1"
        self.reuse_memory = bool(reuse_memory)
        self.keep_blobs = set(keep_blobs)
        self.memory_plan = None
        self.fuse = fusion.enabled_by_environment()
        self._layer_callbacks = {"before_forward": [], "after_forward": [],
                                 "before_backward": [], "after_backward": []}
        self._build(param, kept)
        if weights:
            self.copy_from(weights)

    # -- construction ----------------------------------------------------------------------
    @backend.device_arrays()
    def _build(self, param, origins):
        layer_params, origins = insert_splits(list(param.layer), origins)
        self.blobs: OrderedDict[str, Blob] = OrderedDict()
        self.layers, self._layer_names = [], []
        self._bottoms, self._tops = [], []
        self._loss_weights = []                 # per layer: [(top index, weight)]
        self._split_layers = set()
        self.inputs, available = [], OrderedDict()
        self.learnable_params, self.params_lr, self.params_weight_decay = [], [], []
        self.param_layers = []                  # per learnable param: the owning layer's index
        self._param_views = []                  # PERMISSIVE sharers: (blob, index, shape)
        self.params: OrderedDict[str, list] = OrderedDict()
        self._param_owner = {}                  # param name -> (layer, blob, learnable index)
        self._explicit_mults = []               # per learnable param: mults given explicitly
        self.blob_loss_weights: OrderedDict[str, float] = OrderedDict()
        self.layer_locations = []               # per layer: "file:line" of its definition
        file_names = {lp.name for lp in param.layer}
        for lp, origin in zip(layer_params, origins):
            where = self.source.layer_line(origin) if origin is not None else self.source.name
            try:
                self._add_layer(lp, where, available)
            except OwlnetError as exc:
                raise type(exc)(f"{where}: {exc}") from None
            except (ValueError, IndexError, TypeError, ZeroDivisionError, MemoryError) as exc:
                if lp.type == "Python":
                    raise   # the user's own error, with its traceback and a note naming the layer
                raise ShapeError(f"{where}: layer '{lp.name}' ({lp.type}) cannot be set up "
                                 f"for bottoms {[self.blobs[b].shape for b in lp.bottom]}: "
                                 f"{exc}") from None
            self.layer_locations.append(where)
            if lp.type == "Split" and lp.name not in file_names:
                self._split_layers.add(len(self.layers) - 1)
        self.outputs = list(available)
        self.layer_dict = OrderedDict(zip(self._layer_names, self.layers))
        self._find_backward_layers()
        self._plan_fusion()
        self.arena = ParamArena(self.learnable_params, self.params_lr, self.params_weight_decay,
                                self.param_layers, self._param_views)
        self._plan_memory()

    @backend.device_arrays()
    def _plan_memory(self):
        """With ``reuse_memory``, (re)compute the shared-storage plan at the current shapes;
        arrays the new plan leaves out get storage of their own again."""
        if not self.reuse_memory:
            return
        self._check_names(self.keep_blobs)
        previous = self.memory_plan
        self.memory_plan = memory.plan(self, self.keep_blobs)
        if previous is not None:
            memory.unplan(previous, {key for i in self.memory_plan.intervals for key in i.keys()})

    def _keep(self, names):
        """Keep these blobs out of the shared storage from now on (re-planning if needed)."""
        names = set(names or ()) - self.keep_blobs
        if self.reuse_memory and names:
            self._check_names(names)
            self.keep_blobs |= names
            self._plan_memory()

    def _check_names(self, names):
        for name in sorted(names):
            if name not in self.blobs:
                raise ConfigError(f"net '{self.name}' has no blob '{name}' (blobs: "
                                  f"{', '.join(self.blobs)})")

    def _add_layer(self, lp, where, available):
        index = len(self.layers)
        layer = create_layer(lp, self.phase)
        bottoms = []
        for name in lp.bottom:
            if name not in self.blobs:
                raise ConfigError(f"layer '{lp.name}' needs bottom blob '{name}', which no "
                                  "earlier layer produces")
            bottoms.append(self.blobs[name])
            available.pop(name, None)
        tops = []
        for j, name in enumerate(lp.top):
            if j < len(lp.bottom) and lp.bottom[j] == name:
                tops.append(self.blobs[name])      # in place
            elif name in self.blobs:
                raise ConfigError(f"layer '{lp.name}' produces top blob '{name}', which an "
                                  "earlier layer already produces (only the top at a "
                                  "bottom's own position may reuse its name, in place)")
            else:
                blob = Blob((), name=name)
                self.blobs[name] = blob
                tops.append(blob)
            available[name] = True
        layer.setup(bottoms, tops)
        layer.reshape(bottoms, tops)
        if lp.type == "Input":
            self.inputs.extend(lp.top)

        if len(lp.propagate_down) not in (0, len(bottoms)):
            raise ConfigError(f"layer '{lp.name}' has {len(lp.propagate_down)} propagate_down "
                              f"values for {len(bottoms)} bottoms (give none or one each)")
        if len(lp.loss_weight) > len(tops):
            raise ConfigError(f"layer '{lp.name}' has {len(lp.loss_weight)} loss_weight "
                              f"values for {len(tops)} tops")
        weights = list(lp.loss_weight) or ([1.0] if layer.is_loss and tops else [])
        self._loss_weights.append([(j, float(w)) for j, w in enumerate(weights) if w])
        for j, name in enumerate(lp.top):
            self.blob_loss_weights[name] = float(weights[j]) if j < len(weights) else 0.0

        self._add_params(layer, lp)
        self.layers.append(layer)
        self._layer_names.append(lp.name)
        self._bottoms.append(bottoms)
        self._tops.append(tops)
        return index

    def _add_params(self, layer, lp):
        """Register the layer's parameter blobs as Caffe's AppendParam does.

        A blob named in ``param { name }`` that an earlier layer owns is that layer's blob;
        an lr_mult or decay_mult one sharer gives explicitly applies to the shared blob and
        must agree with any other explicit value. Each layer's param_propagate_down follows
        its own lr_mult (0 for blobs the layer itself keeps out of learning, as BatchNorm's).
        """
        if len(lp.param) > len(layer.blobs):
            raise ConfigError(f"layer '{lp.name}' has {len(lp.param)} param specs for "
                              f"{len(layer.blobs)} param blobs")
        for k, blob in enumerate(layer.blobs):
            spec = lp.param[k] if k < len(lp.param) else caffe_pb2.ParamSpec()
            learns = layer.param_propagate_down[k]
            mults = {"lr_mult": spec.lr_mult if learns else 0.0,
                     "decay_mult": spec.decay_mult if learns else 0.0}
            given = {field for field in mults if learns and spec.HasField(field)}
            layer.param_propagate_down[k] = mults["lr_mult"] != 0
            if not spec.name or spec.name not in self._param_owner:
                if spec.name:
                    self._param_owner[spec.name] = (lp.name, blob, len(self.learnable_params))
                self.learnable_params.append(blob)
                self.param_layers.append(len(self.layers))
                self.params_lr.append(float(mults["lr_mult"]))
                self.params_weight_decay.append(float(mults["decay_mult"]))
                self._explicit_mults.append(given)
                continue
            owner_layer, owner, index = self._param_owner[spec.name]
            strict = spec.share_mode == caffe_pb2.ParamSpec.STRICT
            if (owner.shape != blob.shape) if strict else (owner.count != blob.count):
                raise ShapeError(f"layer '{lp.name}' shares param '{spec.name}' of shape "
                                 f"{blob.shape} with layer '{owner_layer}', whose shape is "
                                 f"{owner.shape}")
            if strict:
                layer.blobs[k] = owner
            else:
                layer.blobs[k] = Blob((), name=owner.name)   # bound to the arena below
                self._param_views.append((layer.blobs[k], index, blob.shape))
            for field, values in (("lr_mult", self.params_lr),
                                  ("decay_mult", self.params_weight_decay)):
                if field not in given:
                    continue
                if field not in self._explicit_mults[index]:
                    values[index] = float(mults[field])
                    self._explicit_mults[index].add(field)
                elif values[index] != mults[field]:
                    raise ConfigError(f"layer '{lp.name}' shares param '{spec.name}' with "
                                      f"{field} {mults[field]:g}, but it has {field} "
                                      f"{values[index]:g} where layer '{owner_layer}' owns it")
        if layer.blobs:
            self.params[lp.name] = layer.blobs

    def _find_backward_layers(self):
        """Which layers run backward and into which bottoms (Caffe's need-backward rules).

        Forward: a bottom needs backward when its blob does, or as its explicit
        ``propagate_down`` says; a layer when a bottom blob or a parameter (lr_mult != 0)
        does, and then so do its tops. Backward: a layer that contributes no loss, or whose
        tops no consumer propagates into, runs no backward.
        """
        blob_needs = {}
        self._layer_need_backward, self._bottom_need_backward = [], []
        for layer, bottoms, tops in zip(self.layers, self._bottoms, self._tops):
            explicit = layer.param.propagate_down
            needed = [blob_needs.get(b.name, False) for b in bottoms]
            need = any(needed) or any(layer.param_propagate_down)
            for t in tops:
                blob_needs[t.name] = need
            self._layer_need_backward.append(need)
            self._bottom_need_backward.append(
                [bool(p) for p in explicit] if len(explicit) else needed)
        under_loss, no_gradient = set(), set()
        for li in reversed(range(len(self.layers))):
            tops, bottoms = self._tops[li], self._bottoms[li]
            needs = self._bottom_need_backward[li]
            contributes = bool(self._loss_weights[li]) or any(t.name in under_loss for t in tops)
            if not contributes or all(t.name in no_gradient for t in tops):
                self._layer_need_backward[li] = False
                needs[:] = [False] * len(bottoms)
            if contributes:
                under_loss.update(b.name for b in bottoms)
            no_gradient.update(b.name for b, need in zip(bottoms, needs) if not need)
        if self.force_backward:
            for li, layer in enumerate(self.layers):
                self._layer_need_backward[li] = True
                self._bottom_need_backward[li] = [
                    need or layer.allow_force_backward(i)
                    for i, need in enumerate(self._bottom_need_backward[li])]
        for layer, need in zip(self.layers, self._layer_need_backward):
            layer.runs_backward = need

    # -- pycaffe-shaped views ---------------------------------------------------------------
    @property
    def top_names(self):
        return OrderedDict((n, [t.name for t in tops])
                           for n, tops in zip(self._layer_names, self._tops))

    @property
    def bottom_names(self):
        return OrderedDict((n, [b.name for b in bottoms])
                           for n, bottoms in zip(self._layer_names, self._bottoms))

    @property
    def output_loss_weights(self):
        return {name: self.blob_loss_weights.get(name, 0.0) for name in self.outputs}

    def _layer_index(self, name, default):
        if name is None:
            return default
        try:
            return self._layer_names.index(name)
        except ValueError:
            raise ConfigError(f"net '{self.name}' has no layer '{name}' (layers: "
                              f"{', '.join(self._layer_names)})") from None

    # -- running ----------------------------------------------------------------------------
    @backend.device_arrays()
    def reshape(self):
        """Propagate input shapes through every layer (call after reshaping an input blob)."""
        for layer, bottoms, tops in zip(self.layers, self._bottoms, self._tops):
            layer.reshape(bottoms, tops)
        self._plan_fusion()
        self._plan_memory()

    def _plan_fusion(self):
        """The fused steps of ``owlnet.fusion`` by first layer: those a forward can run
        (inference chains, learning convolutions with their ReLU, training BatchNorm steps)
        and those a backward can."""
        self._backward_steps = fusion.plan_training(self)
        self._forward_steps = {**fusion.plan(self), **fusion.plan_learning_convolutions(self),
                               **self._backward_steps}

    def segments(self, first: int, last: int, backward: bool = False) -> list:
        """Layers first..last as ``forward_range`` runs them (``backward_range``, with
        ``backward``, in reverse order): ``(a, b, step)`` for a fused step of
        ``owlnet.fusion`` over layers a..b, ``(a, a, None)`` for a single layer. Steps are
        fused with ``fuse`` on, no callbacks of the direction registered, and the step wholly
        inside first..last."""
        kind = "backward" if backward else "forward"
        observed = self._layer_callbacks["before_" + kind] or self._layer_callbacks[
            "after_" + kind]
        steps = {} if observed or not self.fuse else (
            self._backward_steps if backward else self._forward_steps)
        runs, li = [], first
        while li <= last:
            step = steps.get(li)
            if step is not None and step.last <= last:
                runs.append((li, step.last, step))
                li = step.last + 1
            else:
                runs.append((li, li, None))
                li += 1
        return runs[::-1] if backward else runs

    @backend.device_arrays()
    def forward_range(self, start: int, end: int):
        """Run layers start..end (inclusive); the weighted loss as a 0-d array on the device.
        Fused steps of ``owlnet.fusion`` run as one (``segments``)."""
        loss = 0.0
        before, after = self._layer_callbacks["before_forward"], self._layer_callbacks[
            "after_forward"]
        for li, _, step in self.segments(start, end):
            if step is not None:
                step.forward()
                continue
            for callback in before:
                callback(li)
            layer, bottoms, tops = self.layers[li], self._bottoms[li], self._tops[li]
            layer.reshape(bottoms, tops)
            layer.forward(bottoms, tops)
            for j, weight in self._loss_weights[li]:
                loss = loss + weight * tops[j].data.sum()
            for callback in after:
                callback(li)
        return loss

    @backend.device_arrays()
    def backward_range(self, start: int, end: int) -> None:
        """Back-propagate through layers start down to end (inclusive). Fused steps of
        ``owlnet.fusion`` run as one (``segments``)."""
        before, after = self._layer_callbacks["before_backward"], self._layer_callbacks[
            "after_backward"]
        for li, _, step in self.segments(end, start, backward=True):
            if step is not None:
                step.backward()
                continue
            for callback in before:
                callback(li)
            if self._layer_need_backward[li]:
                tops = self._tops[li]
                for j, weight in self._loss_weights[li]:
                    tops[j].diff[...] = weight
                self.layers[li].backward(tops, self._bottom_need_backward[li],
                                         self._bottoms[li])
            for callback in after:
                callback(li)

    def forward(self, blobs=None, start=None, end=None, **inputs):
        """pycaffe's forward: set inputs given by name, run, return the output blobs' data."""
        last = len(self.layers) - 1
        first, end_index = self._layer_index(start, 0), self._layer_index(end, last)
        names = list(self.outputs if end is None else self.top_names[end]) + list(blobs or [])
        self._keep(names + (self.bottom_names[start] if start is not None else []))
        for name, value in inputs.items():
            self._set_array(name, value, "data")
        self.forward_range(first, end_index)
        return {name: self.blobs[name].data for name in names}

    def backward(self, diffs=None, start=None, end=None, **top_diffs):
        """pycaffe's backward: set output diffs given by name, run, return the inputs' diffs."""
        last = len(self.layers) - 1
        first, end_index = self._layer_index(start, last), self._layer_index(end, 0)
        names = list(self.inputs if end is None else self.bottom_names[end]) + list(diffs or [])
        self._keep(names + (self.top_names[start] if start is not None else []))
        for name, value in top_diffs.items():
            self._set_array(name, value, "diff")
        self.backward_range(first, end_index)
        return {name: self.blobs[name].diff for name in names}

    def forward_backward(self):
        """Forward and backward over the whole net; the weighted loss where it was computed
        (a 0-d array on the device: ``float()`` reads it, waiting for the device)."""
        last = len(self.layers) - 1
        loss = self.forward_range(0, last)
        self.backward_range(last, 0)
        return loss

    def _set_array(self, name, value, which):
        if name not in self.blobs:
            raise ConfigError(f"net '{self.name}' has no blob '{name}' (blobs: "
                              f"{', '.join(self.blobs)})")
        blob = self.blobs[name]
        value = np.asarray(value) if isinstance(value, (list, tuple)) else value
        if tuple(value.shape) != blob.shape:
            raise ShapeError(f"blob '{name}' has shape {blob.shape}, the array given has shape "
                             f"{tuple(value.shape)} (reshape the blob and call net.reshape() "
                             "first)")
        getattr(blob, which)[...] = backend.to_device(value)

    # -- learning ---------------------------------------------------------------------------
    @backend.device_arrays()
    def clear_param_diffs(self):
        device_current(self.learnable_params)
        self.arena.diff[...] = 0

    def share_trained_layers(self, other: "Net"):
        """Use ``other``'s parameter values in this net's layers of the same name."""
        for name, blobs in self.params.items():
            source = other.params.get(name)
            if source is None:
                continue
            if len(source) != len(blobs):
                raise ShapeError(f"layer '{name}' has {len(blobs)} parameter blobs here and "
                                 f"{len(source)} in net '{other.name}'")
            for k, (mine, theirs) in enumerate(zip(blobs, source)):
                if mine.shape != theirs.shape:
                    raise ShapeError(f"layer '{name}' param {k}: shape {mine.shape} here, "
                                     f"{theirs.shape} in net '{other.name}'")
                mine.share_data(theirs)

    # -- data positions (for exact resume) --------------------------------------------------
    def data_sources(self) -> OrderedDict:
        """The layers that read batches from a source (``DataSource``), by name, in order."""
        return OrderedDict((name, layer) for name, layer in self.layer_dict.items()
                           if isinstance(layer, DataSource))

    def data_state(self) -> dict:
        """Each data source's position, by layer name (for exact resume)."""
        return {name: layer.state() for name, layer in self.data_sources().items()}

    def restore_data_state(self, states: dict) -> None:
        sources = self.data_sources()
        for name, state in states.items():
            if name in sources:
                sources[name].restore_state(state)

    # -- weights ----------------------------------------------------------------------------
    def to_proto(self, write_diff: bool = False):
        """The net as Caffe writes a .caffemodel: every layer's parameter with its blobs."""
        out = caffe_pb2.NetParameter(name=self.name)
        for li, layer in enumerate(self.layers):
            if li in self._split_layers:
                continue
            lp = out.layer.add()
            lp.CopyFrom(layer.param)
            lp.ClearField("blobs")
            for blob in layer.blobs:
                fileio.array_to_blobproto(backend.to_host(blob.data),
                                      backend.to_host(blob.diff) if write_diff else None,
                                      lp.blobs.add())
        return out

    def save(self, path) -> None:
        """Write the weights as a binary .caffemodel (atomically)."""
        fileio.atomic_write(path, self.to_proto().SerializeToString())

    def copy_from(self, source, reinit_mismatched: bool = False) -> list[str]:
        """Load weights from a .caffemodel path or NetParameter, matching layers by name.

        Source layers absent here are ignored, as in Caffe. A blob whose shape differs is an
        error, unless ``reinit_mismatched``: then that layer keeps its filler values. Returns
        the names of the layers left re-initialised.
        """
        if isinstance(source, caffe_pb2.NetParameter):
            param, where = source, "<NetParameter>"
        else:
            where = os.fspath(source)
            if snapshot.is_hdf5(where):     # Caffe's CopyTrainedLayersFrom: HDF5 by content
                return self.load_hdf5(where, reinit_mismatched)
            param = fileio.parse_binary(caffe_pb2.NetParameter(), where, "caffemodel")
        param = _copy(param)
        for field in ("input", "input_dim", "input_shape"):   # a deploy net's; no weights
            param.ClearField(field)
        param = config.upgrade_net(param, config.Source(where))
        reinitialised = []
        for lp in param.layer:
            layer = self.layer_dict.get(lp.name)
            if layer is None:
                continue
            if len(lp.blobs) != len(layer.blobs):
                raise SnapshotError(f"{where}: layer '{lp.name}' has {len(lp.blobs)} blobs in "
                                    f"the file, the net expects {len(layer.blobs)}")
            arrays = [fileio.blobproto_to_array(b, where=f"{where}: layer '{lp.name}' blob {k}")
                      for k, b in enumerate(lp.blobs)]
            mismatch = [(k, a.shape, t.shape) for k, (a, t) in enumerate(zip(arrays, layer.blobs))
                        if not _shapes_match(lp.blobs[k], a.shape, t.shape)]
            if mismatch:
                if reinit_mismatched:
                    reinitialised.append(lp.name)
                    continue
                k, have, want = mismatch[0]
                raise ShapeError(f"{where}: cannot copy param {k} of layer '{lp.name}': shape "
                                 f"{have} in the file, {want} in the net")
            for array, blob in zip(arrays, layer.blobs):
                blob.data[...] = backend.to_device(array.reshape(blob.shape))
        return reinitialised

    # -- HDF5 weights (pycaffe's save_hdf5 / load_hdf5; the layout is in owlnet.snapshot) ---
    def save_hdf5(self, path, write_diff: bool = False) -> None:
        """Write the weights as Caffe's HDF5 weights file (Net::ToHDF5), atomically."""
        snapshot.save_weights_hdf5(self, path, write_diff)

    def load_hdf5(self, path, reinit_mismatched: bool = False) -> list[str]:
        """Load weights from a Caffe HDF5 weights file (Net::CopyTrainedLayersFromHDF5);
        ``reinit_mismatched`` and the result as in ``copy_from``."""
        return snapshot.load_weights_hdf5(self, path, reinit_mismatched)

    def close(self) -> None:
        """Release what the layers hold (readers, prefetch threads) and publish the files
        they write (HDF5Output); the net is not used afterwards."""
        for layer in self.layers:
            if hasattr(layer, "close"):
                layer.close()
    # -- pycaffe's Python-side extras -------------------------------------------------------
    @property
    def _blob_names(self) -> list:
        return list(self.blobs)

    def before_forward(self, callback) -> None:
        """pycaffe's per-layer callbacks: ``callback(layer index)`` before (after) each layer's
        forward (backward), for every layer run, whether or not it needs a backward; an
        NCCL given to ``after_backward`` is Caffe's layer-wise reduce (see owlnet.nccl)."""
        self._layer_callbacks["before_forward"].append(callback)

    def after_forward(self, callback) -> None:
        self._layer_callbacks["after_forward"].append(callback)

    def before_backward(self, callback) -> None:
        self._layer_callbacks["before_backward"].append(callback)

    def after_backward(self, callback) -> None:
        self._layer_callbacks["after_backward"].append(callback)

    def share_with(self, other: "Net") -> None:
        """pycaffe's name for :meth:`share_trained_layers`."""
        self.share_trained_layers(other)

    def _batch(self, arrays: dict):
        """``arrays`` ({input name: N examples}) in batches of the net's batch size (the first
        axis of its first blob); the last batch padded with zeros."""
        count = len(next(iter(arrays.values())))
        size = next(iter(self.blobs.values())).shape[0]
        for start in range(0, count, size):
            batch = {}
            for name, array in arrays.items():
                part = np.asarray(array[start:start + size])
                if len(part) < size:
                    padding = np.zeros((size - len(part),) + part.shape[1:], dtype=part.dtype)
                    part = np.concatenate([part, padding])
                batch[name] = part
            yield batch

    def forward_all(self, blobs=None, **kwargs) -> dict:
        """Forward over any number N of examples given by input name, in batches; the outputs
        (and the blobs named in ``blobs``) of all N, as arrays of N."""
        names = list(dict.fromkeys(self.outputs + list(blobs or [])))
        collected = {name: [] for name in names}
        count = len(next(iter(kwargs.values()))) if kwargs else None
        for batch in self._batch(kwargs) if kwargs else [{}]:
            outputs = self.forward(blobs=blobs, **batch)
            for name in names:
                collected[name].append(backend.to_host(outputs[name]).copy())
        return {name: _stack(parts, count) for name, parts in collected.items()}

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs) -> tuple:
        """Forward and backward over N examples in batches: inputs and output diffs given by
        name; returns (outputs and ``blobs``, input diffs and ``diffs``) of all N."""
        out_names = list(dict.fromkeys(self.outputs + list(blobs or [])))
        diff_names = list(dict.fromkeys(self.inputs + list(diffs or [])))
        forward_in = {name: kwargs[name] for name in self.inputs if name in kwargs}
        backward_in = {name: kwargs[name] for name in self.outputs if name in kwargs}
        count = len(next(iter(kwargs.values()))) if kwargs else None
        forward_batches = list(self._batch(forward_in)) if forward_in else []
        backward_batches = list(self._batch(backward_in)) if backward_in else []
        rounds = max(len(forward_batches), len(backward_batches), 1)
        outs = {name: [] for name in out_names}
        grads = {name: [] for name in diff_names}
        for k in range(rounds):
            outputs = self.forward(blobs=blobs, **(forward_batches[k] if k < len(
                forward_batches) else {}))
            input_diffs = self.backward(diffs=diffs, **(backward_batches[k] if k < len(
                backward_batches) else {}))
            for name in out_names:
                outs[name].append(backend.to_host(outputs[name]).copy())
            for name in diff_names:
                grads[name].append(backend.to_host(input_diffs[name]).copy())
        return ({name: _stack(parts, count) for name, parts in outs.items()},
                {name: _stack(parts, count) for name, parts in grads.items()})


def _stack(parts: list, count):
    """Batches joined along the first axis, cut to ``count`` examples (the padding off)."""
    if parts[0].ndim == 0:
        return np.asarray(parts)
    joined = np.concatenate(parts)
    return joined if count is None else joined[:count]


def _shapes_match(proto, file_shape, net_shape) -> bool:
    """Caffe's ShapeEquals: legacy 4-d blobs match a net shape padded with leading 1s."""
    if file_shape == tuple(net_shape):
        return True
    if proto.HasField("shape") or len(net_shape) > 4:
        return False
    return file_shape == (1,) * (4 - len(net_shape)) + tuple(net_shape)

