"""The training loop: Caffe's Solver (iterations, display, testing, snapshots) over an update rule.

``get_solver(path_or_param)`` picks the class from the solver's ``type`` ("SGD", "Nesterov",
"AdaGrad", "RMSProp", "AdaDelta", "Adam") or the legacy ``solver_type`` enum. Paths in a solver
file (``net``, ``train_net``, ``test_net``, ``weights``, the ``snapshot_prefix`` folder) are
relative to the current directory, as in Caffe; when not found there, owlnet also looks in the
solver file's folder and its parents (so a zoo solver naming ``examples/mnist/x.prototxt``
works from anywhere).

One iteration of :meth:`Solver.step`, as Caffe: clear the parameter diffs; test every
``test_interval`` iterations (also at 0 when ``test_initialization``); ``iter_size`` times
forward/backward, averaging the loss; log every ``display`` iterations the loss smoothed over
the last ``average_loss`` iterations and each train output; apply the update; ``iter += 1``;
snapshot every ``snapshot`` iterations or when the action callback asks. A loss that is not
finite stops training with a TrainingError naming its iteration: at once on the CPU; on a GPU
the losses stay on the device and are read at display, test and snapshot iterations and at
the end of ``step`` (so the step never waits for the device, and the error may come at the
next such iteration, naming the earlier one where the loss went bad). The device work of
the iteration goes through the solver's step executor (``owlnet.parallel.executors``): one
device by default, or the data-parallel one attached as ``solver.parallel``.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .. import backend, config, device_checks, fileio, snapshot
from .. import logging as owl_logging
from ..errors import ConfigError, SnapshotError, TrainingError
from ..net import Net
from ..parallel import captured
from ..proto import caffe_pb2
from . import updates
from .lr_policy import LearningRate

ACTIONS = ("none", "stop", "snapshot")


def read_solver_param(source) -> caffe_pb2.SolverParameter:
    """A SolverParameter from a path, prototxt text or message (a copy), with the legacy
    ``solver_type`` turned into ``type`` (``config.upgrade_solver_type``)."""
    return config.read_solver(source)[0]


def _solver_folder(source) -> str | None:
    """The folder of a solver file, or None when ``source`` is text or a message."""
    is_path = isinstance(source, os.PathLike) or (
        isinstance(source, str) and os.path.isfile(source))
    return os.path.dirname(os.path.abspath(source)) if is_path else None


class LossCheck:
    """Stops training at the first iteration whose loss is not finite.

    Host losses are checked as they come (free). With ``defer`` (losses on a device), they
    are kept as they are and read together by :meth:`check`, which the solver calls where it
    reads the device anyway; at most ``limit`` are kept between checks.
    """

    limit = 1000

    def __init__(self, defer: bool):
        self.defer = defer
        self.pending: list = []                   # (iteration, loss not read yet)

    def note(self, iteration: int, loss):
        """Take iteration ``iteration``'s loss; returns it (a float unless deferred)."""
        if not self.defer:
            loss = float(loss)
            self._verify(iteration, loss, iteration)
            return loss
        self.pending.append((iteration, loss))
        if len(self.pending) >= self.limit:
            self.check(iteration)
        return loss

    def check(self, now: int) -> None:
        """Read the pending losses (at iteration ``now``: one transfer when all are device
        values) and the deferred device checks; TrainingError for the first bad loss."""
        pending, self.pending = self.pending, []
        losses = [loss for _, loss in pending]
        if losses and all(type(loss) not in (int, float) for loss in losses):
            losses = backend.to_host(backend.array_module(losses[0]).stack(losses)).tolist()
        for (iteration, _), loss in zip(pending, losses):
            self._verify(iteration, float(loss), now)
        device_checks.raise_pending()

    @staticmethod
    def _verify(iteration: int, loss: float, now: int) -> None:
        if not math.isfinite(loss):
            later = f" (found at iteration {now})" if now != iteration else ""
            raise TrainingError(f"iteration {iteration}: the loss is {loss}; training "
                                f"stopped{later} (no snapshot written of these weights)")


class SolverFiles:
    """What a solver file names, found and built: its net files (relative to the current
    directory, else to the solver file's folder or a parent), snapshot prefix, train net and
    test nets. Kept apart from the loop so the tools can build a test net alone."""

    def __init__(self, param, source_dir: str | None = None):
        self.param = param
        self.source_dir = source_dir
        self._nets: dict = {}         # (field, index) -> (NetParameter, Source, description)

    def find(self, path: str, what: str) -> str:
        """``path`` relative to the current directory, else to the solver's folder or a parent."""
        if os.path.exists(path) or os.path.isabs(path) or self.source_dir is None:
            return path
        folder = Path(self.source_dir)
        for base in (folder, *folder.parents):
            if (base / path).exists():
                return str(base / path)
        raise ConfigError(f"{what} {path} not found (looked in the current directory "
                          f"{os.getcwd()} and in {self.source_dir} and its parents)")

    def snapshot_prefix(self, check_writable: bool = True) -> str:
        """``snapshot_prefix`` with its folder found as ``find`` says; with ``check_writable``
        (training), an error unless snapshots are off or the folder can be written."""
        prefix = self.param.snapshot_prefix
        folder = os.path.dirname(prefix)
        if folder and not os.path.isdir(folder) and self.source_dir is not None:
            try:
                prefix = os.path.join(self.find(folder, "snapshot_prefix folder"),
                                      os.path.basename(prefix))
            except ConfigError:
                pass  # reported below when snapshots are due
        if self.param.snapshot and check_writable:
            if not self.param.HasField("snapshot_prefix"):
                raise ConfigError("snapshot is set but snapshot_prefix is not")
            folder = os.path.dirname(prefix) or "."
            if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
                raise ConfigError(f"cannot write to snapshot prefix '{prefix}': make sure the "
                                  f"folder {folder} exists and is writeable")
        return prefix

    def net_source(self, field: str, index: int | None = None):
        """What solver field ``field`` names, read once (later calls hand on the same message):
        the NetParameter (a prototxt path found as ``find`` says, or the message itself), its
        ``config.Source`` and a description for the log."""
        key = (field, index)
        if key not in self._nets:
            value = getattr(self.param, field)
            if index is not None:
                value = value[index]
            if isinstance(value, str):
                path = self.find(value, f"{field} file")
                self._nets[key] = (*config.read_net(path), f"{field} file: {path}")
            else:
                self._nets[key] = (*config.read_net(value), field)
        return self._nets[key]

    def build_net(self, net_param, source, phase, extra_state):
        """A Net of ``net_param`` (read from ``source``) in Caffe's merged NetState:
        ``phase``, then the net's own ``state``, then the solver's ``train_state``/
        ``test_state`` (later ones win)."""
        state = caffe_pb2.NetState(phase=phase)
        state.MergeFrom(net_param.state)
        if extra_state is not None:
            state.MergeFrom(extra_state)
        net = Net(net_param, source=source, phase=state.phase, level=state.level,
                  stages=tuple(state.stage))
        for entry in self.param.weights:
            for path in entry.split(","):
                net.copy_from(self.find(path, "weights file"))
        return net

    def build_train_net(self, log: bool = False) -> Net:
        """A new train net as the solver file describes it (data-parallel slices use more)."""
        p = self.param
        fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(fields) != 1:
            raise ConfigError("the solver must name exactly one train net with one of net, "
                              f"net_param, train_net, train_net_param (it names: "
                              f"{', '.join(fields) or 'none'})")
        net_param, source, description = self.net_source(fields[0])
        if log:
            owl_logging.info(f"Creating training net from {description}")
        return self.build_net(net_param, source, caffe_pb2.TRAIN, p.train_state)

    def build_test_nets(self) -> list:
        """The test nets, as Caffe's InitTestNets: test_net(_param) entries, then the generic
        net for the remaining test_iter entries, each with its test_state."""
        p = self.param
        specific = [("test_net_param", i) for i in range(len(p.test_net_param))]
        specific += [("test_net", i) for i in range(len(p.test_net))]
        generic = [f for f in ("net_param", "net") if p.HasField(f)]
        if generic and len(p.test_iter) < len(specific):
            raise ConfigError(f"test_iter must be given for each test net: {len(specific)} test "
                              f"nets, {len(p.test_iter)} test_iter")
        if not generic and len(p.test_iter) != len(specific):
            raise ConfigError(f"test_iter must be given once per test net: {len(specific)} test "
                              f"nets (test_net, test_net_param), {len(p.test_iter)} test_iter")
        sources = list(specific)
        if generic:
            sources += [(generic[0], None)] * (len(p.test_iter) - len(specific))
        if p.test_state and len(p.test_state) != len(sources):
            raise ConfigError(f"test_state must be unset or given once per test net: "
                              f"{len(sources)} test nets, {len(p.test_state)} test_state")
        if sources and p.test_interval <= 0:
            raise ConfigError(f"{len(sources)} test net(s) need test_interval > 0")
        nets = []
        for i, (field, index) in enumerate(sources):
            net_param, source, description = self.net_source(field, index)
            owl_logging.info(f"Creating test net (#{i}) specified by {description}")
            extra = p.test_state[i] if p.test_state else None
            nets.append(self.build_net(net_param, source, caffe_pb2.TEST, extra))
        return nets


class Solver:
    """Base of the solvers: builds the nets, runs the loop, snapshots and restores.

    ``action_callback()`` (optional) is asked after each iteration and during testing and
    returns "none", "stop" or "snapshot" (Caffe's SolverAction for SIGINT/SIGHUP).
    ``on_iteration`` is a list of callables, each called with the solver after every
    iteration (a progress bar, say). ``executor`` runs each iteration's device work
    (``owlnet.parallel.StepExecutor``); ``parallel`` (None, or a data-parallel executor from
    ``owlnet.parallel.DataParallel`` attached before ``solve``) spreads each batch over devices
    and ranks: it runs the slices' forward/backward, reduces their gradients before the update,
    and agrees on the actions; only the primary rank (rank 0) tests and snapshots. Without
    one, ``owlnet.parallel.captured.select`` picks the executor: on the GPU a captured step
    (CUDA graphs) when the net allows it, else the eager one, logging why.
    """

    rule_class: type[updates.UpdateRule] = updates.SGD

    def __init__(self, param, action_callback=None, source_dir: str | None = None):
        source_dir = source_dir or _solver_folder(param)
        self.param = param = read_solver_param(param)
        self.files = SolverFiles(param, source_dir)
        self.action_callback = action_callback
        self.on_iteration: list = []
        self.callbacks: list = []           # (on_start, on_gradients) pairs: add_callback
        if param.average_loss < 1:
            raise ConfigError(f"average_loss must be at least 1, got {param.average_loss}")
        if param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            fileio.import_h5py("snapshot_format: HDF5")     # fail now, not at the first snapshot
        self.snapshot_prefix = self.files.snapshot_prefix()
        if param.random_seed >= 0:
            backend.set_random_seed(param.random_seed)
        owl_logging.ensure_configured()
        self.net = self.files.build_train_net(log=True)
        self.test_nets = self.files.build_test_nets()
        owl_logging.info("Solver scaffolding done.")
        self.rule = self.build_rule(self.net)
        self.parallel = None
        self.lr = LearningRate(param)
        self.iter = 0
        self.smoothed_loss = 0.0
        self._losses: list[float] = []
        self.requested_early_exit = False
        self.continue_on_snapshot_error = False
        self.loss_check = LossCheck(defer=backend.mode() == "gpu")

    @property
    def type(self) -> str:
        return self.rule_class.type

    def build_train_net(self) -> Net:
        """Another train net as the solver file describes it (data-parallel slices use it)."""
        return self.files.build_train_net()

    def build_rule(self, net: Net) -> updates.UpdateRule:
        """An update rule of this solver's type for ``net`` (with its own history)."""
        return self.rule_class(self.param, net)

    @property
    def parallel(self):
        """The data-parallel executor attached, or None (then one device runs the step)."""
        return self._parallel

    @parallel.setter
    def parallel(self, executor) -> None:
        self._parallel = executor
        self.executor = executor or captured.select(self.net, self.rule, self.param,
                                                    self.callbacks)

    @property
    def is_primary(self) -> bool:
        """Whether this process tests and snapshots (rank 0 of a distributed run)."""
        return self.executor.is_primary

    # -- the loop ---------------------------------------------------------------------------
    @backend.device_arrays()
    def solve(self, resume_file=None) -> None:
        """Train to ``max_iter`` (from ``resume_file`` when given), as Caffe's Solve."""
        owl_logging.info(f"Solving {self.net.name}")
        owl_logging.info(f"Learning Rate Policy: {self.param.lr_policy}")
        self.requested_early_exit = False
        if resume_file:
            owl_logging.info(f"Restoring previous solver status from {resume_file}")
            self.restore(resume_file)
        self.executor.synchronize()
        start_iter = self.iter
        self.step(self.param.max_iter - self.iter)
        p = self.param
        if (p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0)
                and self.is_primary):
            self._snapshot_during_training()
        if self.requested_early_exit:
            owl_logging.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = self.executor.forward_loss()
            self._update_smoothed_loss(loss, start_iter)
            owl_logging.info(f"Iteration {self.iter}, loss = {owl_logging.num(self.smoothed_loss)}")
        if p.test_interval and self.iter % p.test_interval == 0 and self.is_primary:
            self.test_all()
        owl_logging.info("Optimization Done.")

    @backend.device_arrays()
    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (fewer if the action callback says stop), in the
        executor's scope (a captured step's stream: every device read here follows its work)."""
        start_iter = self.iter
        stop_iter = self.iter + int(iters)
        self._losses = []
        self.smoothed_loss = 0.0
        timer_start = time.perf_counter()
        with self.executor.scope():
            self._iterate(stop_iter, start_iter, timer_start, self.iter)
            self.loss_check.check(self.iter)

    def _iterate(self, stop_iter, start_iter, timer_start, iterations_last) -> None:
        """The loop of :meth:`step`."""
        p = self.param
        executor = self.executor
        while self.iter < stop_iter:
            executor.clear_param_diffs()
            if (p.test_interval and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization)):
                self.loss_check.check(self.iter)
                if self.is_primary:
                    self.test_all()
                if executor.agree("stop" if self.requested_early_exit else "none") == "stop":
                    self.requested_early_exit = True
                    break
            self._run_callbacks(0)
            display = bool(p.display) and self.iter % p.display == 0
            loss = 0.0
            for k in range(p.iter_size):
                loss += executor.forward_backward(self.iter, reduce=k == p.iter_size - 1)
            loss = self.loss_check.note(self.iter, executor.reduce(loss / p.iter_size))
            self._update_smoothed_loss(loss, start_iter)
            if display:
                self.loss_check.check(self.iter)
                lapse = time.perf_counter() - timer_start
                per_second = (self.iter - iterations_last) / (lapse or 1.0)
                owl_logging.info(owl_logging.iteration_line(self.iter, per_second, lapse,
                                                            p.display, self.smoothed_loss))
                timer_start = time.perf_counter()
                iterations_last = self.iter
                self._log_outputs()
            self._run_callbacks(1)
            self.apply_update()
            self.iter += 1
            for callback in self.on_iteration:
                callback(self)
            request = executor.agree(self._requested_action())
            if ((p.snapshot and self.iter % p.snapshot == 0) or request == "snapshot") \
                    and self.is_primary:
                self._snapshot_during_training()
            if request == "stop":
                self.requested_early_exit = True
                break

    def apply_update(self) -> None:
        """Update the train net's parameters from their diffs (clip, regularize, rule)."""
        rate = self.lr.rate(self.iter)
        if self.param.display and self.iter % self.param.display == 0:
            owl_logging.info(owl_logging.lr_line(self.iter, rate))
        self.executor.update(rate, self.iter)

    def _update_smoothed_loss(self, loss: float, start_iter: int) -> None:
        average = self.param.average_loss
        if len(self._losses) < average:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            index = (self.iter - start_iter) % average
            self.smoothed_loss += (loss - self._losses[index]) / average
            self._losses[index] = loss

    def _log_outputs(self) -> None:
        index = 0
        for name in self.net.outputs:
            weight = self.net.output_loss_weights.get(name, 0.0)
            for value in backend.to_host(self.net.blobs[name].data).ravel():
                owl_logging.info(owl_logging.output_line("Train", index, name, value, weight))
                index += 1

    def _requested_action(self) -> str:
        if self.action_callback is None:
            return "none"
        action = self.action_callback()
        if action not in ACTIONS:
            raise ConfigError(f"action_callback returned {action!r}; expected one of "
                              f"{', '.join(ACTIONS)}")
        return action

    # -- testing ----------------------------------------------------------------------------
    def test_all(self) -> list[dict]:
        """Test every test net (stopping early if asked); the results of each."""
        results = []
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(i))
        return results

    @backend.device_arrays()
    def test(self, test_net_id: int = 0) -> dict:
        """Run test net ``test_net_id`` for its ``test_iter`` batches with the train net's
        weights; log and return the mean of each output ({name: float, or array when the
        output has several values})."""
        owl_logging.info(owl_logging.testing_line(self.iter, test_net_id))
        test_net = self.test_nets[test_net_id]
        test_net.share_trained_layers(self.net)
        batches = self.param.test_iter[test_net_id]
        totals: dict = {}
        loss = 0.0
        for _ in range(batches):
            request = self._requested_action()
            while request != "none":
                if request == "snapshot":
                    self._snapshot_during_training()
                else:
                    self.requested_early_exit = True
                request = self._requested_action()
            if self.requested_early_exit:
                break
            loss = loss + test_net.forward_range(0, len(test_net.layers) - 1)
            for name in test_net.outputs:
                values = test_net.blobs[name].data.ravel().astype("float64")
                totals[name] = values if name not in totals else totals[name] + values
        if self.requested_early_exit:
            owl_logging.info("Test interrupted.")
            return {}
        if batches <= 0:
            return {}
        if self.param.test_compute_loss:
            owl_logging.info(f"Test loss: {owl_logging.num(loss / batches)}")
        results = {}
        index = 0
        for name in test_net.outputs:
            means = backend.to_host(totals[name]) / batches
            weight = test_net.output_loss_weights.get(name, 0.0)
            for value in means:
                owl_logging.info(owl_logging.output_line("Test", index, name, value, weight))
                index += 1
            results[name] = float(means[0]) if means.size == 1 else means
        return results

    # -- snapshots --------------------------------------------------------------------------
    def snapshot(self) -> tuple[str, str]:
        """Write ``{prefix}_iter_{iter}.caffemodel`` and ``.solverstate`` (``.caffemodel.h5``
        and ``.solverstate.h5`` with snapshot_format HDF5); returns both paths."""
        resume = {
            "rng": snapshot.rng_state(),
            "train_data": self.net.data_state(),
            "test_data": [net.data_state() for net in self.test_nets],
        }
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            return snapshot.write_snapshot_hdf5(self.snapshot_prefix, self.iter, self.net,
                                                self.param.snapshot_diff, self.rule.history,
                                                self.lr.current_step, resume)
        net_param = self.net.to_proto(write_diff=self.param.snapshot_diff)
        return snapshot.write_snapshot(self.snapshot_prefix, self.iter, net_param,
                                       self.rule.history, self.lr.current_step, resume)

    def _snapshot_during_training(self) -> None:
        """A snapshot the loop asks for; a failed one ends training (SnapshotError), or is
        logged and training goes on when ``continue_on_snapshot_error`` is set. Never of
        weights trained from a loss that is not finite."""
        self.loss_check.check(self.iter)
        try:
            self.snapshot()
        except SnapshotError as exc:
            if not self.continue_on_snapshot_error:
                raise
            owl_logging.warning(f"snapshot at iteration {self.iter} failed, training goes on "
                                f"without it: {exc}")

    def restore(self, path) -> None:
        """Continue from a .solverstate (or .solverstate.h5): weights, history, iter,
        current_step, and (for owlnet's snapshots) the RNG and the data layers' positions."""
        path = os.fspath(path)
        state = snapshot.read_solver_state(path)
        model_path = snapshot.learned_net_path(state, path)
        params = self.net.learnable_params
        names = [blob.name or f"#{i}" for i, blob in enumerate(params)] * self.rule.history_sets
        history = snapshot.read_history(state, path, [h.shape for h in self.rule.history],
                                        names, self.rule.type)
        extra = snapshot.read_resume(state, path, model_path)
        if extra is not None:
            missing = {"rng", "train_data", "test_data"} - set(extra)
            if missing:
                raise SnapshotError(f"{path}: owlnet resume state lacks "
                                    f"{', '.join(sorted(missing))}")
            if len(extra["test_data"]) != len(self.test_nets):
                raise SnapshotError(f"{path}: written for {len(extra['test_data'])} test nets, "
                                    f"this solver has {len(self.test_nets)}")
        if model_path is not None:
            self.net.copy_from(model_path)
        self.rule.set_history(history)
        self.iter = state.iter
        self.lr.current_step = state.current_step
        if extra is not None:
            snapshot.restore_rng(extra["rng"], path)
            self.net.restore_data_state(extra["train_data"])
            for net, data_state in zip(self.test_nets, extra["test_data"]):
                net.restore_data_state(data_state)

    # -- pycaffe's callbacks ----------------------------------------------------------------
    def add_callback(self, on_start, on_gradients=None) -> None:
        """pycaffe's ``Solver.add_callback``: ``on_start()`` runs at the start of every
        iteration (after any test), ``on_gradients()`` once the gradients are computed (and
        reduced), before the update. An object with ``on_start`` and ``on_gradients_ready``
        methods (an NCCL) may be given alone."""
        if on_gradients is None:
            on_start, on_gradients = on_start.on_start, on_start.on_gradients_ready
        self.callbacks.append((on_start, on_gradients))
        if self.parallel is None:
            self.parallel = None            # choose the executor again (callbacks: eager)

    def _run_callbacks(self, which: int) -> None:
        for pair in self.callbacks:
            pair[which]()


class SGDSolver(Solver):
    rule_class = updates.SGD


class NesterovSolver(Solver):
    rule_class = updates.Nesterov


class AdaGradSolver(Solver):
    rule_class = updates.AdaGrad


class RMSPropSolver(Solver):
    rule_class = updates.RMSProp


class AdaDeltaSolver(Solver):
    rule_class = updates.AdaDelta


class AdamSolver(Solver):
    rule_class = updates.Adam


SOLVERS = {cls.rule_class.type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver,
                                                RMSPropSolver, AdaDeltaSolver, AdamSolver)}


def get_solver(path_or_param, action_callback=None) -> Solver:
    """The solver its ``type`` (or legacy ``solver_type``) names, from a path, prototxt text or
    SolverParameter (read once: the solver gets the message and the file's folder)."""
    param = read_solver_param(path_or_param)
    try:
        cls = SOLVERS[param.type]
    except KeyError:
        raise ConfigError(f"unknown solver type {param.type!r} (known types: "
                          f"{', '.join(SOLVERS)})") from None
    return cls(param, action_callback=action_callback, source_dir=_solver_folder(path_or_param))
