"""Faults training survives: signals, kill -9 (also mid-snapshot), a full or read-only disk, bad records.

The signal and kill tests run ``tools/net_trainer.py`` as a real subprocess on a tiny LMDB
job; the disk tests run the solver in-process with the failing call monkeypatched (the tests
run as root, for whom chmod does not stop writes, so a read-only folder is simulated by
EROFS from ``open`` or by a snapshot folder that turns into a regular file).
"""
import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from owlnet import fileio, snapshot
from owlnet.data.datum import encoded_datum
from netutil import write_bar_lmdb
from owlnet.errors import ConfigError, SnapshotError
from owlnet.solver import get_solver
from owlnet.tools import train

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "tools" / "net_trainer.py"

NET = """
name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  include {{ phase: TRAIN }} transform_param {{ scale: 0.00390625 mirror: true crop_size: 7 }}
  data_param {{ source: "{train}" batch_size: 6 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label"
  include {{ phase: TEST }} transform_param {{ scale: 0.00390625 crop_size: 7 }}
  data_param {{ source: "{test}" batch_size: 6 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "drop" type: "Dropout" bottom: "ip" top: "ip" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""

SOLVER = """
net: "{net}"
test_iter: 2
test_interval: {test_interval}
base_lr: 0.05
momentum: 0.9
lr_policy: "step"
gamma: 0.5
stepsize: 7
display: {display}
max_iter: {max_iter}
snapshot: {snapshot}
snapshot_prefix: "{prefix}"
random_seed: 11
"""
VERIFIED = {"snapshots loaded and resumed bitwise": 0, "kills": 0}


@pytest.fixture
def job(tmp_path):
    write_bar_lmdb(tmp_path / "train_lmdb", 30, 0)
    write_bar_lmdb(tmp_path / "test_lmdb", 12, 1)
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(train=tmp_path / "train_lmdb", test=tmp_path / "test_lmdb"))

    def make(name="solver.prototxt", prefix="snap/tiny", max_iter=20, snapshot=10,
             display=5, test_interval=10):
        solver = tmp_path / name
        (tmp_path / prefix).parent.mkdir(exist_ok=True)
        solver.write_text(SOLVER.format(net=net, prefix=tmp_path / prefix, max_iter=max_iter,
                                        snapshot=snapshot, display=display,
                                        test_interval=test_interval))
        return solver
    make.dir = tmp_path
    return make


def iteration_of(path):
    return int(Path(path).name.rsplit("_iter_", 1)[1].split(".")[0])


def newest_complete_snapshot(folder):
    """The solverstate of the newest snapshot whose files are complete (as a user resumes)."""
    states = sorted(Path(folder).glob("*.solverstate"), key=iteration_of, reverse=True)
    return states[0] if states else None


# -- signals, through the real command line ----------------------------------------------------
class Trainer:
    """``net_trainer.py`` in a subprocess, its log collected line by line on a thread."""

    def __init__(self, *args, env=None):
        self.lines = []
        self.proc = subprocess.Popen([sys.executable, str(TRAINER), *map(str, args),
                                      "--no-progress"], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text, after=0, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, line in enumerate(self.lines[after:], after):
                if text in line:
                    return index
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} in the log:\n{''.join(self.lines[-30:])}")

    def finish(self, timeout=60):
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code, "".join(self.lines)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_snapshot_then_stop(job, sig):
    solver = job(max_iter=1000000, snapshot=0, display=20, test_interval=1000000)
    trainer = Trainer(solver)
    trainer.wait_for("Iteration 20 (")
    trainer.proc.send_signal(sig)
    code, log = trainer.finish()
    assert code == 0, log
    assert "Optimization stopped early." in log and "Optimization Done." not in log
    state = newest_complete_snapshot(job.dir / "snap")
    assert state is not None and iteration_of(state) >= 20, log
    assert snapshot.read_solver_state(state).iter == iteration_of(state)


def test_sighup_snapshots_and_goes_on(job):
    solver = job(max_iter=1000000, snapshot=0, display=20, test_interval=1000000)
    trainer = Trainer(solver)
    trainer.wait_for("Iteration 20 (")
    trainer.proc.send_signal(signal.SIGHUP)
    at = trainer.wait_for("Snapshotting solver state")
    hup_state = None
    while hup_state is None:          # the line is logged just before the file is written
        time.sleep(0.01)
        hup_state = newest_complete_snapshot(job.dir / "snap")
    trainer.wait_for("Iteration", after=at + 1)             # still training
    assert trainer.proc.poll() is None
    trainer.proc.send_signal(signal.SIGINT)
    code, log = trainer.finish()
    assert code == 0, log
    states = sorted(iteration_of(p) for p in (job.dir / "snap").glob("*.solverstate"))
    assert len(states) == 2 and states[0] == iteration_of(hup_state) < states[1], log


# -- kill -9: at random moments and inside a snapshot ------------------------------------------
# The driver kills its own process (SIGKILL, no clean-up) on the N-th call of one file
# operation of owlnet.fileio.atomic_write, so each kill lands at a chosen point of a snapshot.
KILL_DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import owlnet.fileio
operation, when = sys.argv[1], int(sys.argv[2])
real = getattr(os, operation)
calls = [0]
def deadly(*args):
    calls[0] += 1
    if calls[0] == when:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
setattr(os, operation, deadly)
from owlnet.tools.train import main
sys.exit(main(sys.argv[3:]))
"""


def resume_and_compare(job, solver, reference):
    """Resume from the newest complete snapshot (or start over) and finish bitwise equal."""
    state = newest_complete_snapshot(job.dir / "snap")
    args = [str(solver), "--no-progress"] + (["--resume", str(state)] if state else [])
    if state is not None:
        snapshot.read_solver_state(state)              # the newest complete one always loads
    assert train.main(args) == 0
    final = job.dir / "snap" / "tiny_iter_20.caffemodel"
    assert final.read_bytes() == reference
    VERIFIED["snapshots loaded and resumed bitwise"] += state is not None


@pytest.fixture
def reference(job):
    """The uninterrupted run's final weights; the snapshot folder is emptied afterwards."""
    solver = job(max_iter=20, snapshot=4, display=0, test_interval=5)
    assert train.main([str(solver), "--no-progress"]) == 0
    final = (job.dir / "snap" / "tiny_iter_20.caffemodel").read_bytes()
    for path in (job.dir / "snap").iterdir():
        path.unlink()
    return solver, final


# atomic_write does: open tmp, write, fsync(file), replace(tmp -> path), fsync(folder); a
# snapshot is the caffemodel then the solverstate, so 2 replaces and 4 fsyncs each. The cases:
# the 2nd snapshot's caffemodel written but not renamed (fsync 5); its caffemodel in place and
# its solverstate written but not renamed (fsync 7); the same at the rename (replace 4); the
# very first snapshot never completed (replace 1: training starts over).
@pytest.mark.parametrize("operation,when", [("fsync", 5), ("fsync", 7), ("replace", 4),
                                            ("replace", 1)])
def test_kill_mid_snapshot_keeps_the_newest_complete_one(job, reference, operation, when):
    solver, final = reference
    driver = job.dir / "driver.py"
    driver.write_text(KILL_DRIVER.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(driver), operation, str(when), str(solver),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    VERIFIED["kills"] += 1
    resume_and_compare(job, solver, final)


def test_kill_9_at_random_moments_then_resume_bitwise(job, reference):
    solver, final = reference
    rng = random.Random(7)
    for _ in range(3):
        state = newest_complete_snapshot(job.dir / "snap")
        args = [solver] + (["--resume", state] if state else [])
        trainer = Trainer(*args)
        trainer.wait_for("Solving")
        time.sleep(rng.uniform(0.0, 0.25))
        trainer.proc.kill()
        trainer.finish()
        VERIFIED["kills"] += 1
        if (job.dir / "snap" / "tiny_iter_20.solverstate").exists():
            break
    resume_and_compare(job, solver, final)
    print(f"\nkill -9 runs: {VERIFIED['kills']} kills, "
          f"{VERIFIED['snapshots loaded and resumed bitwise']} newest snapshots resumed bitwise")


# -- a full or read-only disk --------------------------------------------------------------
def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_fails_after(solver, iteration, failure):
    def at_iteration(s):
        if s.iter == iteration:
            failure()
    solver.on_iteration.append(at_iteration)


def snapshot_files(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def test_disk_full_stops_training_with_snapshot_error(job, monkeypatch):
    solver = get_solver(str(job(max_iter=30)))
    disk_fails_after(solver, 15, lambda: monkeypatch.setattr(os, "fsync", no_space))
    with pytest.raises(SnapshotError, match=r"tiny_iter_20\.caffemodel: No space left"):
        solver.solve()
    assert solver.iter == 20                             # stopped, not silently going on
    assert sorted(snapshot_files(job.dir / "snap")) == ["tiny_iter_10.caffemodel",
                                                          "tiny_iter_10.solverstate"]
    monkeypatch.undo()
    fresh = get_solver(str(job(max_iter=30)))
    fresh.restore(job.dir / "snap" / "tiny_iter_10.solverstate")    # the previous one is intact
    assert fresh.iter == 10


def test_continue_on_snapshot_error_is_opt_in(job, monkeypatch, capfd):
    solver = job(max_iter=30)
    monkeypatch.setattr(os, "fsync", no_space)
    assert train.main([str(solver), "--no-progress"]) == 1
    err = capfd.readouterr().err
    assert "net_trainer: error: cannot write" in err and "No space left on device" in err
    assert "Optimization Done." not in err
    log = job.dir / "train.log"
    assert train.main([str(solver), "--no-progress", "--continue-on-snapshot-error",
                       "--log", str(log)]) == 0
    err = log.read_text()
    assert err.count("failed, training goes on without it") == 3    # iterations 10, 20, 30
    assert "Optimization Done." in err
    assert list((job.dir / "snap").iterdir()) == []     # no temporary files left behind


def test_read_only_snapshot_folder(job, monkeypatch):
    solver = get_solver(str(job(max_iter=30)))

    def read_only(path, mode="r", *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    disk_fails_after(solver, 15, lambda: monkeypatch.setattr(fileio, "open", read_only, raising=False))
    before = None

    def remember(s):
        nonlocal before
        if s.iter == 11:
            before = snapshot_files(job.dir / "snap")
    solver.on_iteration.append(remember)
    with pytest.raises(SnapshotError, match="tiny_iter_20.caffemodel: Read-only file system"):
        solver.solve()
    assert snapshot_files(job.dir / "snap") == before and len(before) == 2


def test_snapshot_folder_replaced_by_a_file(job):
    """A real filesystem failure (root is not stopped by chmod): the folder becomes a file."""
    solver = get_solver(str(job(max_iter=30)))
    snap = job.dir / "snap"

    def break_folder(s):
        if s.iter == 15:
            snap.rename(job.dir / "moved")
            snap.write_text("not a folder")
    solver.on_iteration.append(break_folder)
    with pytest.raises(SnapshotError, match="Not a directory"):
        solver.solve()
    assert sorted(p.name for p in (job.dir / "moved").iterdir()) == [
        "tiny_iter_10.caffemodel", "tiny_iter_10.solverstate"]
    again = job(name="again.prototxt", prefix="again/tiny")
    (job.dir / "again").rmdir()
    (job.dir / "again").write_text("a file where the folder should be")
    with pytest.raises(ConfigError, match="cannot write to snapshot prefix"):
        get_solver(str(again))                           # refused before training starts


# -- LMDB records that are corrupt or fail to decode -------------------------------------------
BAD = {b"00000004": b"\x08\x01\x12\xff\xff\xff\x0f truncated",
       b"00000011": encoded_datum(b"\xff\xd8\xff\xe0 not really a jpeg", 1).SerializeToString()}


@pytest.fixture
def bad_job(job):
    (job.dir / "train_lmdb").rename(job.dir / "good_lmdb")
    write_bar_lmdb(job.dir / "train_lmdb", 30, 0, bad=BAD)
    return job


def test_bad_record_stops_training_naming_its_key(bad_job, capfd, monkeypatch):
    monkeypatch.delenv("OWLNET_SKIP_BAD_RECORDS", raising=False)
    assert train.main([str(bad_job()), "--no-progress"]) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("net_trainer: error:") and "record '00000004'" in err
    assert "not a valid Datum" in err


def test_skip_bad_records_flag_counts_and_logs(bad_job, monkeypatch):
    monkeypatch.delenv("OWLNET_SKIP_BAD_RECORDS", raising=False)
    log = bad_job.dir / "train.log"
    assert train.main([str(bad_job()), "--no-progress", "--skip-bad-records",
                       "--log", str(log)]) == 0
    err = log.read_text()
    skips = [line for line in err.splitlines() if "skipped a bad record" in line]
    # 20 iterations x 6 = 4 epochs of 30 records with 2 bad ones: 8 skips at least (the
    # prefetcher may have prepared a few batches more).
    assert len(skips) >= 8 and "(1 skipped so far)" in skips[0]
    assert any("record '00000011': encoded image cannot be decoded" in s for s in skips)
    assert "Optimization Done." in err


def test_skipped_record_slot_takes_the_next_good_record(bad_job, monkeypatch):
    from owlnet import Net, TRAIN
    monkeypatch.setenv("OWLNET_SKIP_BAD_RECORDS", "1")
    text = (f'layer {{ name: "d" type: "Data" top: "x" top: "y" data_param {{ source: '
            f'"{bad_job.dir / "train_lmdb"}" batch_size: 6 }} }}')
    layer = Net(text, TRAIN).layer_dict["d"]
    batches = [layer.make_batch(b) for b in range(5)]          # records 0..29, no prefetch
    assert layer.records_skipped == 2
    assert np.array_equal(batches[0].data[4], batches[0].data[5])    # 4 bad -> record 5
    assert np.array_equal(batches[1].data[5], batches[2].data[0])    # 11 bad -> record 12
    layer.close()
