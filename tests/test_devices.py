"""owlnet.tools.device: Caffe's rules for the solver file's mode, --gpu, --device, -n and MPI
ranks, checked on the CPU with a stand-in GPU count; device_query; the train call site."""
import types

import pytest

from owlnet import backend
from owlnet.errors import ConfigError, OwlnetError
from owlnet.proto import caffe_pb2
from owlnet.tools import device, train


def gpus(count):
    return lambda: (count, "" if count else "cudaErrorNoDevice: no CUDA-capable device")


def solver(text=""):
    from google.protobuf import text_format
    return text_format.Parse(text, caffe_pb2.SolverParameter())


def choose(count=2, **kwargs):
    return device.choose_devices(probe=gpus(count), **kwargs).devices


def test_cpu_unless_something_asks_for_a_gpu():
    assert choose() == [None]
    assert choose(slices=3) == [None, None, None]
    # solver_mode defaults to GPU in caffe.proto, but Caffe honours it only when the file sets it
    assert choose(solver_param=solver("base_lr: 0.1")) == [None]
    assert choose(solver_param=solver("solver_mode: CPU")) == [None]


def test_solver_mode_and_device_id_are_honoured():
    assert choose(solver_param=solver("solver_mode: GPU")) == [0]
    assert choose(solver_param=solver("solver_mode: GPU device_id: 1")) == [1]
    assert choose(gpu="0", solver_param=solver("solver_mode: GPU device_id: 1")) == [0]
    assert choose(device="gpu", solver_param=solver("device_id: 1")) == [1]


def test_asking_for_a_missing_gpu_is_an_error_never_a_cpu_run():
    with pytest.raises(ConfigError, match=r"solver_mode: GPU asks for a GPU, but no GPU is "
                                          r"usable here \(cudaErrorNoDevice.*--device cpu"):
        choose(0, solver_param=solver("solver_mode: GPU"))
    with pytest.raises(ConfigError, match="--gpu 0 asks for a GPU"):
        choose(0, gpu="0")
    with pytest.raises(ConfigError, match="--device gpu asks for a GPU"):
        choose(0, device="gpu")
    with pytest.raises(ConfigError, match="GPU 5 does not exist; 2 GPU"):
        choose(2, gpu="0,5")
    for local in (None, (0, 2)):
        with pytest.raises(ConfigError, match=r"GPU 3 \(device_id\) does not exist"):
            choose(2, solver_param=solver("solver_mode: GPU device_id: 3"), local=local)


def test_device_cpu_overrides_the_solver_file_and_says_so():
    choice = device.choose_devices(device="cpu", solver_param=solver("solver_mode: GPU"),
                                   probe=gpus(0))
    assert choice.devices == [None] and "overridden by --device cpu" in choice.note
    with pytest.raises(ConfigError, match="contradict"):
        choose(device="cpu", gpu="0")


@pytest.mark.parametrize("kwargs, devices", [
    ({"gpu": "1"}, [1]),
    ({"gpu": "all"}, [0, 1, 2]),
    ({"gpu": "0,2"}, [0, 2]),
    ({"gpu": "0,2", "slices": 2}, [0, 2]),
    ({"gpu": "1", "slices": 3}, [1, 1, 1]),          # N slices on the one GPU listed
    ({"device": "gpu", "slices": 2}, [0, 1]),       # N GPUs from the first
    ({"device": "gpu", "slices": 3}, [0, 1, 2]),
])
def test_gpu_lists_and_slices_in_one_process(kwargs, devices):
    assert choose(3, **kwargs) == devices


@pytest.mark.parametrize("kwargs, words", [
    ({"gpu": "0,1", "slices": 3}, "--gpu lists 2 GPUs but -n asks for 3"),
    ({"device": "gpu", "slices": 4}, "write --gpu 0 -n 4"),
    ({"gpu": "zero"}, "--gpu takes GPU indices"),
    ({"gpu": "-1"}, "--gpu takes GPU indices"),
    ({"slices": 0}, "-n must be at least 1"),
])
def test_inconsistent_requests_are_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        choose(3, **kwargs)


@pytest.mark.parametrize("count, kwargs, local, devices, shared", [
    (2, {"device": "gpu"}, (0, 2), [0], False),
    (2, {"device": "gpu"}, (1, 2), [1], False),            # each rank its own GPU
    (4, {"device": "gpu", "slices": 2}, (1, 2), [2, 3], False),
    (2, {"device": "gpu", "slices": 2}, (1, 2), [1, 1], False),
    (4, {"gpu": "2,3"}, (1, 2), [3], False),
    (1, {"device": "gpu"}, (1, 2), [0], True),             # one GPU: the ranks share it
    (2, {"solver_param": solver("solver_mode: GPU device_id: 1")}, (0, 2), [1], True),
])
def test_mpi_ranks_take_gpus_by_local_rank(count, kwargs, local, devices, shared):
    choice = device.choose_devices(local=local, probe=gpus(count), **kwargs)
    assert choice.devices == devices
    assert ("share" in choice.note) is shared


@pytest.mark.parametrize("variables", [
    {"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
    {"MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4"},
    {"PMI_LOCAL_RANK": "3", "PMI_LOCAL_SIZE": "4"},
    {"PALS_LOCAL_RANKID": "3", "PALS_LOCAL_SIZE": "4"},
])
def test_local_rank_from_the_launchers_variables(monkeypatch, variables):
    for rank_name, size_name in device.LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(rank_name, raising=False)
        monkeypatch.delenv(size_name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert device.local_rank(comm=None) == (3, 4)


def test_local_rank_from_a_shared_memory_split(monkeypatch):
    mpi = pytest.importorskip("mpi4py.MPI")
    for rank_name, size_name in device.LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(rank_name, raising=False)
        monkeypatch.delenv(size_name, raising=False)
    calls = []

    class Node:
        def Get_rank(self):
            return 1

        def Get_size(self):
            return 2

        def Free(self):
            calls.append("free")

    class Comm:
        def Split_type(self, kind):
            calls.append(kind)
            return Node()

    assert device.local_rank(Comm()) == (1, 2)
    assert calls == [mpi.COMM_TYPE_SHARED, "free"]


def fake_cupy(monkeypatch, count=2):
    """CuPy's probe and the backend's GPU switches replaced by recorders."""
    used = []
    props = {"name": b"Fake H100", "major": 9, "minor": 0, "totalGlobalMem": 80 << 30,
             "maxThreadsDim": (1024, 1024, 64)}
    runtime = types.SimpleNamespace(getDeviceCount=lambda: count,
                                    getDeviceProperties=lambda i: dict(props, index=i))
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(backend, "import_cupy", lambda: cupy)
    monkeypatch.setattr(backend, "set_device", lambda i: used.append(("device", i)))
    monkeypatch.setattr(backend, "set_mode_gpu", lambda: used.append("gpu"))
    return used


def test_setup_device_puts_the_backend_on_the_first_gpu_and_logs_caffes_lines(monkeypatch,
                                                                              caplog):
    used = fake_cupy(monkeypatch)
    assert device.gpu_count() == (2, "")
    with caplog.at_level("INFO", logger="owlnet"):
        device.setup_device([1, 1], note="2 ranks share 1 GPU(s)")
    assert used == [("device", 1), "gpu"]
    assert "Using GPUs 1" in caplog.text and "GPU 1: Fake H100, math mode fp32" in caplog.text
    assert "share" in caplog.text


def test_setup_device_on_the_cpu(caplog):
    with caplog.at_level("INFO", logger="owlnet"):
        device.setup_device([None], math="fp32")
    assert backend.mode() == "cpu" and "Use CPU." in caplog.text


def test_device_query_without_a_gpu_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setattr(device, "gpu_count", gpus(0))
    assert device.query_main(["-gpu", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("device_query: error: device_query: no GPU is usable here (cuda")


def test_device_query_prints_caffes_fields(monkeypatch, capsys):
    fake_cupy(monkeypatch, count=2)
    assert device.query_main(["--gpu", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Querying GPUs 1"
    assert out[1].split() == ["Device", "id:", "1"]
    fields = dict(line.split(":", 1) for line in out[2:])
    assert fields["Name"].strip() == "Fake H100"
    assert fields["Major revision number"].strip() == "9"
    assert fields["Maximum dimension of block"].strip() == "1024, 1024, 64"
    assert fields["Clock rate"].strip() == "n/a"                 # not in the fake's properties
    assert device.query_main(["--gpu", "2"]) == 1
    assert "GPU 2 does not exist" in capsys.readouterr().err


# -- the train call site -------------------------------------------------------------------------
class Stop(OwlnetError):
    pass


@pytest.fixture
def tiny_solver(tmp_path):
    from netutil import write_bar_lmdb
    write_bar_lmdb(tmp_path / "lmdb", 8, 0)
    (tmp_path / "net.prototxt").write_text(f"""
layer {{ name: "data" type: "Data" top: "data" top: "label"
  data_param {{ source: "{tmp_path / 'lmdb'}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 3 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
""")
    path = tmp_path / "solver.prototxt"
    # The snapshot at the end of training goes beside the solver, not into the working folder.
    path.write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 1\n'
                    f'snapshot_prefix: "{tmp_path / "tiny"}"\n')
    return path


def record_call_site(monkeypatch, count):
    """Stand-ins: ``count`` GPUs, a backend that stays on the CPU, and a DataParallel that
    records its device list and stops the run."""
    seen = {}
    monkeypatch.setattr(device, "gpu_count", gpus(count))
    monkeypatch.setattr(device, "setup_device",
                        lambda devices, math=None, note="", log_cpu=True: seen.update(setup=devices))

    def data_parallel(solver, devices, comm=None, timeout=None):
        seen.update(devices=list(devices), comm=comm)
        raise Stop("stopped after the call site")
    monkeypatch.setattr(train.parallel, "DataParallel", data_parallel)
    return seen


@pytest.mark.parametrize("argv, devices", [
    (["--gpu", "0,1"], [0, 1]),
    (["--gpu", "all"], [0, 1, 2]),
    (["--device", "gpu", "-n", "2"], [0, 1]),
    (["-gpu", "2", "-n", "2"], [2, 2]),
])
def test_train_hands_the_device_list_to_the_data_parallel_executor(monkeypatch, tiny_solver,
                                                                   argv, devices):
    seen = record_call_site(monkeypatch, 3)
    assert train.main([str(tiny_solver), "--no-progress", *argv]) == 1
    assert seen["devices"] == devices and seen["setup"] == devices and seen["comm"] is None


def test_each_mpi_rank_trains_on_its_own_gpu(monkeypatch, tiny_solver):
    seen = record_call_site(monkeypatch, 2)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    comm = types.SimpleNamespace(Get_rank=lambda: 1, Get_size=lambda: 2)
    args = train.build_parser().parse_args([str(tiny_solver), "--device", "gpu",
                                            "--no-progress"])
    with pytest.raises(Stop):
        train.train(args, comm)
    assert seen["devices"] == [1] and seen["comm"] is comm


def test_train_refuses_a_gpu_it_cannot_use(monkeypatch, tiny_solver, capsys):
    monkeypatch.setattr(device, "gpu_count", gpus(0))
    assert train.main([str(tiny_solver), "--gpu", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "net_trainer: error: --gpu 0 asks for a GPU, but no GPU is usable here" in err
    tiny_solver.write_text(tiny_solver.read_text() + "solver_mode: GPU\n")
    assert train.main([str(tiny_solver), "--no-progress"]) == 1
    assert "solver_mode: GPU asks for a GPU" in capsys.readouterr().err
    assert train.main([str(tiny_solver), "--no-progress", "--device", "cpu"]) == 0
    assert "overridden by --device cpu" in capsys.readouterr().err
