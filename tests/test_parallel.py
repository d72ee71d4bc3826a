"""Data-parallel training (owlnet.parallel): -n N slices in one process and MPI ranks on CPU.

Every case trains the same small conv net from the same seed and compares with one process
at the same global batch: final weights within a relative error of 1e-5 per blob, and the
same loss at every iteration. The MPI tests need mpiexec and mpi4py (`pip install mpich
mpi4py`); the NCCL path needs GPUs (marked gpu).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import owlnet
from owlnet import backend, parallel
from netutil import write_bar_lmdb
from owlnet.errors import ConfigError, TrainingError
from owlnet.solver import get_solver

ROOT = Path(__file__).resolve().parents[1]

NET = """
name: "small"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 crop_size: 8 mirror: true }}
  data_param {{ source: "{train}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 crop_size: 8 }}
  data_param {{ source: "{train}" batch_size: 6 backend: LMDB }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }}
                       bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool" top: "ip1"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""

SOLVER = """
net: "{net}"
test_iter: 2
test_interval: 25
base_lr: 0.05
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 1
max_iter: {max_iter}
snapshot: {snapshot}
snapshot_prefix: "{prefix}"
random_seed: 5
"""
ITERATIONS = 50


@pytest.fixture(scope="module")
def lmdb_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel") / "train_lmdb"
    write_bar_lmdb(path, 60, 0, size=10, bar=40, spacing=3)
    return path


def make_solver(folder, lmdb_path, batch=12, max_iter=ITERATIONS, snapshot=0):
    folder.mkdir(parents=True, exist_ok=True)
    net = folder / "net.prototxt"
    net.write_text(NET.format(train=lmdb_path, batch=batch))
    solver = folder / "solver.prototxt"
    solver.write_text(SOLVER.format(net=net, prefix=folder / "snap", max_iter=max_iter,
                                    snapshot=snapshot))
    return solver


def train_in_process(solver_path, n, resume=None):
    """Train with -n n in this process; the per-iteration losses and the final weights."""
    backend.set_mode_cpu()
    solver = get_solver(str(solver_path))
    if n > 1:
        solver.parallel = parallel.DataParallel(solver, [None] * n)
    losses = []
    solver.on_iteration.append(lambda s: losses.append(s.smoothed_loss))
    try:
        solver.solve(resume_file=resume)
    finally:
        if solver.parallel is not None:
            solver.parallel.close()
    weights = {name: [b.data.copy() for b in blobs] for name, blobs in solver.net.params.items()}
    return losses, weights


def assert_same_weights(weights, expected):
    assert weights.keys() == expected.keys()
    for name in expected:
        for k, (mine, theirs) in enumerate(zip(weights[name], expected[name])):
            error = np.linalg.norm(mine - theirs) / np.linalg.norm(theirs)
            assert error <= 1e-5, f"{name}[{k}]: relative error {error:.3g}"


def weights_from_caffemodel(path, net_path):
    net = owlnet.Net(str(net_path), owlnet.TEST)
    net.copy_from(str(path))
    return {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()}


@pytest.fixture(scope="module")
def reference(lmdb_path, tmp_path_factory):
    """One process, global batch 12: losses and final weights."""
    solver = make_solver(tmp_path_factory.mktemp("reference"), lmdb_path)
    return train_in_process(solver, 1)


# -- in-process slices ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
def test_slices_in_process_equal_one_device(n, lmdb_path, tmp_path, reference):
    losses, weights = train_in_process(make_solver(tmp_path, lmdb_path), n)
    ref_losses, ref_weights = reference
    assert len(losses) == ITERATIONS
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[-1] < 0.5 * ref_losses[0]          # it learned something
    assert_same_weights(weights, ref_weights)


def test_slices_read_disjoint_shares_of_the_batch(lmdb_path, tmp_path):
    solver = get_solver(str(make_solver(tmp_path, lmdb_path)))
    data = parallel.DataParallel(solver, [None] * 3)
    try:
        positions = [net.layer_dict["data"].stream_positions(4) for net in data.nets]
        assert [len(p) for p in positions] == [4, 4, 4]
        np.testing.assert_array_equal(np.sort(np.concatenate(positions)), np.arange(48, 60))
    finally:
        data.close()


def test_batch_not_divisible_is_an_error(lmdb_path, tmp_path):
    solver = get_solver(str(make_solver(tmp_path, lmdb_path, batch=10)))
    with pytest.raises(ConfigError, match=r"batch_size 10 is not divisible by the 3 slices"):
        parallel.DataParallel(solver, [None] * 3)


def test_resume_from_a_sliced_snapshot(lmdb_path, tmp_path, reference):
    """-n 2 for 20 iterations with a snapshot, then resumed to 50: same as one run."""
    folder = tmp_path / "resume"
    solver = make_solver(folder, lmdb_path, max_iter=20, snapshot=20)
    train_in_process(solver, 2)
    solver = make_solver(folder, lmdb_path, snapshot=20)
    losses, weights = train_in_process(solver, 2, resume=folder / "snap_iter_20.solverstate")
    np.testing.assert_allclose(losses, reference[0][20:], rtol=1e-5)
    assert_same_weights(weights, reference[1])


def test_cli_n2_trains(lmdb_path, tmp_path):
    from owlnet.tools import train
    solver = make_solver(tmp_path, lmdb_path, max_iter=4)
    assert train.main([str(solver), "-n", "2", "--no-progress"]) == 0
    assert (tmp_path / "snap_iter_4.caffemodel").is_file()


def test_local_reducer_sums_into_slice_zero():
    buffers = [np.arange(6, dtype=np.float32) * (d + 1) for d in range(3)]
    parallel.LocalReducer().start([buffers], 2, 5)
    np.testing.assert_array_equal(buffers[0], [0, 1, 12, 18, 24, 5])


def test_reducer_sums_each_device_group_then_all_reduces_the_holders():
    """As with two GPUs of two slices each: each group sums into its first buffer (the
    holder), then the collective sees the holders only."""

    class Recording(parallel.Reducer):
        def all_reduce(self, holders, lo, hi):
            self.seen = [h[lo:hi].copy() for h in holders]

    groups = [[np.full(4, 1.0), np.full(4, 2.0)], [np.full(4, 10.0), np.full(4, 20.0)]]
    reducer = Recording([None, None])
    reducer.start(groups, 1, 3)
    np.testing.assert_array_equal(groups[0][0], [1, 3, 3, 1])
    np.testing.assert_array_equal(groups[1][0], [10, 30, 30, 10])
    np.testing.assert_array_equal(groups[0][1], [2, 2, 2, 2])            # others untouched
    assert [list(h) for h in reducer.seen] == [[3, 3], [30, 30]]


def test_slices_cannot_mix_cpu_and_gpus(lmdb_path, tmp_path):
    solver = get_solver(str(make_solver(tmp_path, lmdb_path)))
    with pytest.raises(ConfigError, match="cannot mix the CPU and GPUs"):
        parallel.DataParallel(solver, [None, 0])


def test_mpi_detection(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not parallel.launched_by_mpi() and parallel.mpi_comm() is None
    monkeypatch.setenv("PMI_SIZE", "1")
    assert not parallel.launched_by_mpi()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert parallel.launched_by_mpi()


# -- MPI ranks --------------------------------------------------------------------------------
def _mpiexec():
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return found


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec and mpi4py "
                                                       "(pip install mpich mpi4py)")


def mpi_command(ranks, solver, *extra):
    return [MPIEXEC, "-n", str(ranks), sys.executable, str(ROOT / "tools" / "net_trainer.py"),
            str(solver), "--no-progress", *extra]


def logged_losses(log_text):
    return [float(v) for v in re.findall(r"Iteration \d+ \([^)]*\), loss = (\S+)", log_text)]


@needs_mpi
@pytest.mark.parametrize("ranks, local", [(2, 1), (3, 1), (2, 2)])
def test_mpi_ranks_equal_one_process(ranks, local, lmdb_path, tmp_path, reference):
    solver = make_solver(tmp_path, lmdb_path)
    log = tmp_path / "rank0.log"
    run = subprocess.run(mpi_command(ranks, solver, "-n", str(local), "--log", str(log)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    text = log.read_text()
    assert f"{ranks} rank(s) x {local} slice(s)" in text
    # the log prints six significant digits
    np.testing.assert_allclose(logged_losses(text)[:ITERATIONS], reference[0], rtol=2e-5)
    weights = weights_from_caffemodel(tmp_path / f"snap_iter_{ITERATIONS}.caffemodel",
                                      tmp_path / "net.prototxt")
    assert_same_weights(weights, reference[1])
    assert sorted(p.name for p in tmp_path.glob("snap_*")) == [
        f"snap_iter_{ITERATIONS}.caffemodel", f"snap_iter_{ITERATIONS}.solverstate"]


@needs_mpi
def test_mpi_resume_with_the_same_ranks(lmdb_path, tmp_path, reference):
    """2 ranks for 20 iterations, then 2 ranks resumed from that snapshot to 50."""
    first = make_solver(tmp_path, lmdb_path, max_iter=20, snapshot=20)
    run = subprocess.run(mpi_command(2, first), cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    second = make_solver(tmp_path, lmdb_path, snapshot=20)
    log = tmp_path / "resumed.log"
    run = subprocess.run(mpi_command(2, second, "--snapshot", "1", "--log", str(log)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(logged_losses(log.read_text())[:ITERATIONS - 20],
                               reference[0][20:], rtol=2e-5)
    weights = weights_from_caffemodel(tmp_path / f"snap_iter_{ITERATIONS}.caffemodel",
                                      tmp_path / "net.prototxt")
    assert_same_weights(weights, reference[1])


def _rank_pid(launcher_pid, rank):
    """The pid of the process of ``rank`` among ``launcher_pid``'s descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, launcher_pid):
            ancestor = parents.get(ancestor)
        if ancestor != launcher_pid:
            continue
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in environ and b"PMI_SIZE=2" in environ:
            return pid
    return None


def _start_and_wait_for_training(solver, log, *extra):
    job = subprocess.Popen(mpi_command(2, solver, "--log", str(log), *extra),
                           cwd=log.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log.is_file() and "Iteration 3 " in log.read_text():
            return job
        time.sleep(0.1)
    job.kill()
    pytest.fail("training did not start")


@needs_mpi
def test_a_hung_rank_makes_the_others_fail_with_a_message(lmdb_path, tmp_path):
    solver = make_solver(tmp_path, lmdb_path, max_iter=100000)
    job = _start_and_wait_for_training(solver, tmp_path / "rank0.log",
                                       "--collective-timeout", "2")
    pid = _rank_pid(job.pid, 1)
    assert pid is not None
    started = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    print(err)
    assert job.returncode != 0
    assert time.monotonic() - started < 30
    # rank 0's log file (the launcher may drop the aborted ranks' last stderr lines). Where
    # the stop lands decides the message: before rank 1 announced the collective, it is
    # named; after, rank 0 can only say the collective did not complete.
    assert re.search(r"rank 1 did not reach the \w+ all-reduce of iteration \d+ within 2 s|"
                     r"the \w+ all-reduce of iteration \d+ did not complete within 2 s",
                     (tmp_path / "rank0.log").read_text() + err), err


@needs_mpi
def test_a_killed_rank_ends_the_job(lmdb_path, tmp_path):
    solver = make_solver(tmp_path, lmdb_path, max_iter=100000)
    job = _start_and_wait_for_training(solver, tmp_path / "rank0.log",
                                       "--collective-timeout", "2")
    pid = _rank_pid(job.pid, 1)
    assert pid is not None
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    try:
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
    print(err)
    assert job.returncode != 0
    assert time.monotonic() - started < 30


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


# -- GPUs -------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_nccl_slices_on_two_gpus_equal_one_gpu(lmdb_path, tmp_path, reference):
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    backend.set_mode_gpu()
    try:
        solver = get_solver(str(make_solver(tmp_path, lmdb_path)))
        solver.parallel = parallel.DataParallel(solver, [0, 1])
        solver.solve()
        solver.parallel.close()
        weights = {name: [backend.to_host(b.data) for b in blobs]
                   for name, blobs in solver.net.params.items()}
    finally:
        backend.set_mode_cpu()
    assert_same_weights(weights, reference[1])


def test_training_error_is_typed():
    assert issubclass(TrainingError, owlnet.errors.OwlnetError)


def test_the_step_executor_is_single_device_unless_attached(lmdb_path, tmp_path):
    solver = get_solver(str(make_solver(tmp_path, lmdb_path)))
    assert isinstance(solver.executor, parallel.SingleDevice) and solver.parallel is None
    assert list(solver.net.data_sources()) == ["data"]
    slices = parallel.DataParallel(solver, [None] * 2)
    solver.parallel = slices
    try:
        assert solver.executor is slices and slices.slices == 2 and slices.holders == [0]
        assert slices.nets[1].layer_dict["data"].batch_size == 6
        replica = slices.nets[1]                 # same device: the primary's weights, own diffs
        assert np.shares_memory(replica.params["conv"][0].data, solver.net.arena.data)
        assert not np.shares_memory(replica.arena.diff, solver.net.arena.diff)
        assert np.shares_memory(replica.params["conv"][0].diff, replica.arena.diff)
    finally:
        slices.close()
    solver.parallel = None
    assert isinstance(solver.executor, parallel.SingleDevice)


def test_a_source_that_cannot_be_sliced_is_an_error(tmp_path):
    net = tmp_path / "memory.prototxt"
    net.write_text('layer { name: "m" type: "MemoryData" top: "data" top: "label" '
                   'memory_data_param { batch_size: 4 channels: 1 height: 2 width: 2 } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                   'inner_product_param { num_output: 2 } }\n'
                   'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" '
                   'top: "loss" }')
    solver = get_solver(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 1\n'
                        'snapshot_after_train: false')
    assert list(solver.net.data_sources()) == ["m"]
    with pytest.raises(ConfigError, match=r"layer 'm' \(MemoryData\) cannot be read in shares"):
        parallel.DataParallel(solver, [None] * 2)


STAGED_SCRIPT = r"""
import sys
import numpy as np
from mpi4py import MPI
import fakecupy
from owlnet import parallel
from owlnet.parallel import reducers
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
with fakecupy.fake_gpu() as cupy:
    shared = reducers.gpus_shared_between_ranks(comm, [0])       # both ranks on "GPU 0"
    alone = reducers.gpus_shared_between_ranks(comm, [rank])     # a GPU each
    reducer = parallel.StagedMPIReducer(comm, 20.0)
    gradient = cupy.asarray(np.arange(8, dtype=np.float32) * (rank + 1))
    reducer.begin(1)
    reducer.start([[gradient]], 0, 3)
    reducer.start([[gradient]], 3, 8)
    reducer.wait()
    with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as out:
        out.write(f"{shared} {alone} {gradient.get().tolist()}")
"""


@needs_mpi
def test_ranks_sharing_a_gpu_reduce_through_host_copies(tmp_path):
    """Two ranks on one GPU (NCCL refuses that: an H200 said NCCL_ERROR_INVALID_USAGE): the
    ranks find the GPU shared, and the staged reducer sums each bucket through MPI on host
    copies, written back to the device arrays."""
    script = tmp_path / "staged.py"
    script.write_text(STAGED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    want = f"True False {(np.arange(8) * 3.0).tolist()}"
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [want, want]
