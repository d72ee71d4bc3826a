"""kernels.gpu's convolution on the CPU: CuPy replaced by tests/fakecupy.py (NumPy storage,
kernel bodies through the C harness), cuDNN by a recording fake or by the real frontend wheel
over a stub libcudnn. Checks the plans (whole batch to cuDNN, chunks only for im2col), the
fallbacks (missing library, failing graph: one log line each) and the im2col numbers."""
from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

import fakecupy
from owlnet.kernels import gpu


class FakeCudnn(types.ModuleType):
    """Records graphs and executions; ``fail_at`` names a graph method that raises (for
    build_plan_at_index: at every index); each graph offers plans costing ``plan_ms`` (device
    ms per run, on fakecupy's clock), of which those in ``unbuildable`` do not build."""

    def __init__(self, fail_at=None, no_library=False, plan_ms=(1.0,), unbuildable=()):
        super().__init__("cudnn")
        self.fail_at, self.no_library = fail_at, no_library
        self.plan_ms, self.unbuildable = plan_ms, unbuildable
        self.graphs, self.executions, self.plans_run, self.handles = [], [], [], 0
        self.data_type = types.SimpleNamespace(FLOAT="float")
        self.heur_mode = types.SimpleNamespace(A="A", FALLBACK="FALLBACK")
        self.numerical_note = types.SimpleNamespace(TENSOR_CORE="TENSOR_CORE")

    def create_handle(self):
        if self.no_library:
            raise RuntimeError("Unable to find symbol cudnnCreate")
        self.handles += 1
        return 1234

    def set_stream(self, handle, stream):
        pass

    def pygraph(self, **kwargs):
        graph = FakeGraph(self, kwargs)
        self.graphs.append(graph)
        return graph


class FakeTensor:
    def __init__(self, name, dim=None):
        self.name, self.dim = name, dim

    def set_output(self, flag):
        return self

    def set_dim(self, dim):
        self.dim = dim
        return self

    def set_stride(self, stride):
        return self

    def set_data_type(self, dtype):
        return self


class FakeGraph:
    def __init__(self, module, kwargs):
        self.module, self.kwargs, self.calls = module, kwargs, []

    def tensor(self, name, dim, stride, data_type):
        return FakeTensor(name, dim)

    def _op(self, kind, **kwargs):
        self.calls.append(kind)
        return FakeTensor(kind)

    def conv_fprop(self, image, weight, padding, stride, dilation):
        return self._op("fprop")

    def conv_dgrad(self, loss, filter, padding, stride, dilation):
        return self._op("dgrad")

    def conv_wgrad(self, image, loss, padding, stride, dilation):
        return self._op("wgrad")

    def deselect_workspace_greater_than(self, limit):
        self.calls.append("deselect_workspace_greater_than")
        self.workspace_limit = limit

    def __getattr__(self, name):
        if name not in ("validate", "build_operation_graph", "create_execution_plans",
                        "deselect_numeric_notes", "check_support"):
            raise AttributeError(name)

        def step(*args):
            self.calls.append(name)
            if name == self.module.fail_at:
                raise RuntimeError(f"{name}: CUDNN_STATUS_NOT_SUPPORTED")
        return step

    def get_execution_plan_count(self):
        return len(self.module.plan_ms)

    def build_plan_at_index(self, index):
        self.calls.append(("build", index))
        if self.module.fail_at == "build_plan_at_index" or index in self.module.unbuildable:
            raise RuntimeError("build_plan_at_index: CUDNN_STATUS_NOT_SUPPORTED")

    def get_workspace_size_plan_at_index(self, index):
        return 4096 * (index + 1)

    def execute_plan_at_index(self, pointers, workspace, index, handle):
        assert all(isinstance(p, int) for p in pointers.values()) and isinstance(workspace, int)
        assert ("build", index) in self.calls
        fakecupy.advance_clock(self.module.plan_ms[index])
        self.module.executions.append({t.name: p for t, p in pointers.items()})
        self.module.plans_run.append(index)


@pytest.fixture
def device():
    """The fake device (GPU mode), no cuDNN until ``use_cudnn`` installs a fake one."""
    with fakecupy.fake_gpu() as cupy:
        def use_cudnn(module):
            sys.modules["cudnn"] = module        # fake_gpu restores the real entry
            return module
        yield types.SimpleNamespace(cupy=cupy, use_cudnn=use_cudnn)


ALEXNET_CONV1 = dict(x=(128, 3, 227, 227), w=(96, 3, 11, 11), y=(128, 96, 55, 55),
                     pad=(0, 0), stride=(4, 4), dilation=(1, 1), group=1)


def test_cudnn_gets_the_whole_batch(device):
    """Defect 1: AlexNet conv1 at batch 128 runs as one cuDNN call per direction on the
    arrays themselves (aligned pointers), never on batch chunks."""
    fake = device.use_cudnn(FakeCudnn())
    cupy, c = device.cupy, ALEXNET_CONV1
    x, w, y = (cupy.empty(c[k], dtype=np.float32) for k in "xwy")
    args = (c["pad"], c["stride"], c["dilation"], c["group"])
    gpu.conv_forward(x, w, y, *args)
    gpu.conv_backward_data(y, w, x, *args)
    gpu.conv_backward_filter(x, y, w, *args)
    assert fake.executions == [{"x": x.data.ptr, "w": w.data.ptr, "fprop": y.data.ptr},
                               {"dy": y.data.ptr, "w": w.data.ptr, "dgrad": x.data.ptr},
                               {"x": x.data.ptr, "dy": y.data.ptr, "wgrad": w.data.ptr}]
    assert [g.calls[0] for g in fake.graphs] == ["fprop", "dgrad", "wgrad"]
    # The same shape again: the cached plan, no new graph.
    gpu.conv_forward(x, w, y, *args)
    assert len(fake.graphs) == 3 and len(fake.executions) == 4
    # im2col for the same shape would chunk: the chunking belongs to that path only.
    columns = gpu.ColumnPlan(gpu.plan("fprop", c["x"], c["w"], c["y"], *args, "default",
                                      np.float32).fallback.geometry, 4)
    assert len(columns.chunks) > 1


def test_strict_fp32_deselects_tensor_cores(device, monkeypatch):
    from owlnet import backend
    fake = device.use_cudnn(FakeCudnn())
    cupy = device.cupy
    x, w, y = cupy.zeros((1, 2, 5, 5), np.float32), cupy.zeros((3, 2, 3, 3), np.float32), \
        cupy.zeros((1, 3, 3, 3), np.float32)
    gpu.conv_forward(x, w, y, (0, 0), (1, 1), (1, 1), 1)
    calls = fake.graphs[0].calls
    assert calls.index("create_execution_plans") < calls.index("deselect_numeric_notes") \
        < calls.index("check_support") < calls.index(("build", 0))
    monkeypatch.setitem(backend._state, "math", "tf32")
    gpu.conv_forward(x, w, y, (0, 0), (1, 1), (1, 1), 1)
    assert "deselect_numeric_notes" not in fake.graphs[1].calls


def _small_conv(cupy):
    return (cupy.zeros((1, 2, 5, 5), np.float32), cupy.zeros((3, 2, 3, 3), np.float32),
            cupy.zeros((1, 3, 3, 3), np.float32))


def test_heuristics_run_the_first_plan_that_builds_within_the_workspace(device):
    """Without autotune: plans over the workspace limit are deselected before check_support,
    the first plan that builds runs (plan 0 does not build here), and no later plan is built."""
    fake = device.use_cudnn(FakeCudnn(plan_ms=(1.0, 2.0, 0.5), unbuildable=(0,)))
    x, w, y = _small_conv(device.cupy)
    gpu.conv_forward(x, w, y, (0, 0), (1, 1), (1, 1), 1)
    graph = fake.graphs[0]
    assert graph.workspace_limit == gpu.WORKSPACE_LIMIT
    assert graph.calls.index("deselect_workspace_greater_than") < graph.calls.index(
        "check_support")
    assert [c for c in graph.calls if isinstance(c, tuple)] == [("build", 0), ("build", 1)]
    assert fake.plans_run == [1]
    assert gpu._plans[next(iter(gpu._plans))].workspace_size == 4096 * 2


def test_autotune_keeps_the_fastest_plan_timed_on_scratch_arrays(device, monkeypatch):
    """With autotune every plan that builds is timed (fakecupy's clock advances by each plan's
    cost) on arrays of its own, and the fastest runs the call; a plan under another autotune
    setting is another plan."""
    from owlnet import backend
    fake = device.use_cudnn(FakeCudnn(plan_ms=(3.0, 1.0, 2.0, 0.1), unbuildable=(3,)))
    monkeypatch.setitem(backend._state, "autotune", True)
    x, w, y = _small_conv(device.cupy)
    gpu.conv_forward(x, w, y, (0, 0), (1, 1), (1, 1), 1)
    *timing, call = fake.executions
    assert fake.plans_run[-1] == 1 and call == {"x": x.data.ptr, "w": w.data.ptr,
                                                "fprop": y.data.ptr}
    assert sorted(set(fake.plans_run[:-1])) == [0, 1, 2]
    assert all(run["fprop"] != y.data.ptr for run in timing)
    gpu.conv_forward(x, w, y, (0, 0), (1, 1), (1, 1), 1)
    assert fake.plans_run[-1] == 1 and len(fake.graphs) == 1
    monkeypatch.setitem(backend._state, "autotune", False)
    gpu.conv_forward(x, w, y, (0, 0), (1, 1), (1, 1), 1)
    assert len(fake.graphs) == 2 and fake.plans_run[-1] == 0


def _conv_case(rng, n, c, h, w, m, group, kernel):
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((m, c // group) + kernel)
    return x, wt


def _reference(x, w, pad, stride, dilation, group, dy_rng):
    """Convolution, its data and filter gradients, written directly (window by window)."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    mg = m // group
    oh, ow = ((x.shape[2 + a] + 2 * pad[a] - dilation[a] * (w.shape[2 + a] - 1) - 1)
              // stride[a] + 1 for a in range(2))
    padded = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    y = np.zeros((n, m, oh, ow))
    dy = dy_rng.standard_normal(y.shape)
    dpadded, dw = np.zeros_like(padded), np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            window = (slice(None), slice(None),
                      slice(i * dilation[0], i * dilation[0] + stride[0] * (oh - 1) + 1, stride[0]),
                      slice(j * dilation[1], j * dilation[1] + stride[1] * (ow - 1) + 1, stride[1]))
            patch = padded[window]
            for g in range(group):
                ms, cs = slice(g * mg, (g + 1) * mg), slice(g * cg, (g + 1) * cg)
                y[:, ms] += np.einsum("nchw,mc->nmhw", patch[:, cs], w[ms, :, i, j])
                dpadded[window][:, cs] += np.einsum("nmhw,mc->nchw", dy[:, ms], w[ms, :, i, j])
                dw[ms, :, i, j] = np.einsum("nmhw,nchw->mc", dy[:, ms], patch[:, cs])
    dx = dpadded[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd]
    return y, dy, dx, dw


def _run_gpu(cupy, x, w, dy, pad, stride, dilation, group, dtype, engine="default"):
    dx_shape, y_shape = x.shape, dy.shape
    xd, wd, dyd = (cupy.asarray(a.astype(dtype)) for a in (x, w, dy))
    y, dx, dw = (cupy.full(s, np.nan, dtype=dtype) for s in (y_shape, dx_shape, w.shape))
    gpu.conv_forward(xd, wd, y, pad, stride, dilation, group, engine)
    gpu.conv_backward_data(dyd, wd, dx, pad, stride, dilation, group, engine)
    gpu.conv_backward_filter(xd, dyd, dw, pad, stride, dilation, group, engine)
    return [a.get() for a in (y, dx, dw)]


@pytest.mark.parametrize("fake", ["no_library", "no_frontend", "validate", "check_support",
                                  "build_plan_at_index"])
def test_cudnn_failures_fall_back_to_im2col_with_one_log_line(device, fake, caplog):
    """Defect 2: a missing libcudnn (create_handle fails), a missing frontend, or a graph that
    does not validate / is unsupported / does not build: im2col gives the numbers, and one
    warning says so (once for the library, once per shape for a graph)."""
    if fake == "no_frontend":
        module = device.use_cudnn(None)
    else:
        module = device.use_cudnn(FakeCudnn(fail_at=None if fake == "no_library" else fake,
                                            no_library=fake == "no_library"))
    rng = np.random.default_rng(0)
    x, w = _conv_case(rng, 2, 4, 7, 6, 6, 2, (3, 2))
    geometry = ((1, 0), (2, 1), (1, 2), 2)
    y, dy, dx, dw = _reference(x, w, *geometry[:3], geometry[3], np.random.default_rng(1))
    with caplog.at_level(logging.WARNING, logger="owlnet"):
        for _ in range(2):
            got = _run_gpu(device.cupy, x, w, dy, *geometry, np.float32)
    for g, want in zip(got, (y, dx, dw)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
    lines = [r.getMessage() for r in caplog.records]
    if fake in ("no_library", "no_frontend"):
        assert len(lines) == 1 and "cuDNN is not usable" in lines[0], lines
        assert "im2col" in lines[0]
        if module is not None:
            assert module.executions == []
    else:
        assert len(lines) == 3 and all(fake in line and "im2col" in line for line in lines)
        assert module.executions == []


def test_engine_caffe_never_touches_cudnn(device):
    fake = device.use_cudnn(FakeCudnn())
    rng = np.random.default_rng(2)
    x, w = _conv_case(rng, 1, 2, 5, 5, 3, 1, (3, 3))
    y, dy, dx, dw = _reference(x, w, (1, 1), (1, 1), (1, 1), 1, rng)
    for engine in ("caffe", "CAFFE", 1):          # Caffe's enum name or number
        got = _run_gpu(device.cupy, x, w, dy, (1, 1), (1, 1), (1, 1), 1, np.float32, engine)
        np.testing.assert_allclose(got[0], y, rtol=1e-4, atol=1e-4)
    assert fake.graphs == [] and fake.handles == 0


@pytest.mark.parametrize("case", [
    ((3, 4, 9, 8), 6, 2, (3, 3), (1, 1), (2, 2), (1, 1)),       # stride 2 + pad 1, groups
    ((2, 3, 11, 10), 4, 1, (3, 3), (2, 1), (1, 1), (2, 2)),     # dilation 2
    ((2, 2, 5, 6), 3, 1, (2, 3), (3, 4), (2, 1), (1, 2)),       # pad >= kernel, non-square
    ((2, 4, 5, 3), 4, 4, (1, 1), (0, 0), (1, 1), (1, 1)),       # 1x1 depthwise
], ids=["stride2_pad1_group2", "dilation2", "pad_over_kernel", "depthwise_1x1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_im2col_path_matches_cpu_kernels_in_chunks(device, monkeypatch, case, dtype):
    """The im2col plan over one chunk and over one image per chunk (workspace limit shrunk):
    the same numbers as kernels.cpu; the filter gradient sums over the chunks."""
    device.use_cudnn(None)
    shape, m, group, kernel, pad, stride, dilation = case
    rng = np.random.default_rng(3)
    x, w = _conv_case(rng, *shape, m, group, kernel)
    want = _reference(x, w, pad, stride, dilation, group, rng)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for limit in (gpu.WORKSPACE_LIMIT, 1):
        monkeypatch.setattr(gpu, "WORKSPACE_LIMIT", limit)
        monkeypatch.setattr(gpu, "_plans", {})
        got = _run_gpu(device.cupy, x, w, want[1], pad, stride, dilation, group, dtype, "caffe")
        expected_chunks = 1 if limit > 1 else shape[0]
        plan = next(iter(gpu._plans.values()))
        assert len(plan.chunks) == expected_chunks
        for g, ref, what in zip(got, (want[0], want[2], want[3]), ("y", "dx", "dw")):
            np.testing.assert_allclose(g, ref, rtol=tol, atol=tol, err_msg=what)


def test_misaligned_slice_takes_im2col_for_that_call(device):
    """A batch slice starting 8 bytes past a 16-byte boundary never reaches cuDNN."""
    fake = device.use_cudnn(FakeCudnn())
    cupy = device.cupy
    rng = np.random.default_rng(4)
    x, w = _conv_case(rng, 4, 1, 3, 2, 2, 1, (2, 1))      # 6 floats per image
    y, dy, dx, dw = _reference(x[1:], w, (0, 0), (1, 1), (1, 1), 1, rng)
    xd = cupy.asarray(x.astype(np.float32))
    part = xd[1:]
    assert part.data.ptr % 16 != 0
    out = cupy.empty(y.shape, np.float32)
    gpu.conv_forward(part, cupy.asarray(w.astype(np.float32)), out, (0, 0), (1, 1), (1, 1), 1)
    np.testing.assert_allclose(out.get(), y, rtol=1e-5, atol=1e-5)
    assert fake.executions == []


# -- the real frontend wheel over a stub libcudnn ----------------------------------------------
STUB_LIBCUDNN = r"""
#include <stdlib.h>
#include <stdint.h>
size_t cudnnGetVersion(void) { return 91900; }
size_t cudnnGetCudartVersion(void) { return 13000; }
int cudnnCreate(void **h) { *h = malloc(8); return 0; }
int cudnnDestroy(void *h) { return 0; }
int cudnnSetStream(void *h, void *s) { return 0; }
const char *cudnnGetErrorString(int s) { return "stub"; }
void cudnnGetLastErrorString(char *m, size_t n) { if (n) m[0] = 0; }
int cudnnBackendCreateDescriptor(int t, void **d) { *d = calloc(1, 64); return 0; }
int cudnnBackendDestroyDescriptor(void *d) { free(d); return 0; }
int cudnnBackendInitialize(void *d, int t, size_t s) { return 0; }
int cudnnBackendFinalize(void *d) { return 0; }
int cudnnBackendSetAttribute(void *d, int a, int t, int64_t c, const void *v) { return 0; }
int cudnnBackendGetAttribute(void *d, int a, int t, int64_t r, int64_t *c, void *v)
{ if (c) *c = 0; return 0; }
int cudnnBackendExecute(void *h, void *p, void *v) { return 0; }
"""

GRAPH_SCRIPT = r"""
import sys
sys.modules["torch"] = None          # the frontend imports torch when it can; owlnet must not
import cudnn
from owlnet.kernels import gpu
cases = [((2, 4, 9, 8), (6, 2, 3, 3), (2, 6, 5, 4), (1, 1), (2, 2), (1, 1), 2),
         ((128, 3, 227, 227), (96, 3, 11, 11), (128, 96, 55, 55), (0, 0), (4, 4), (1, 1), 1),
         ((2, 3, 11, 10), (4, 3, 3, 3), (2, 4, 9, 6), (2, 1), (1, 1), (2, 2), 1)]
for case in cases:
    for kind in ("fprop", "dgrad", "wgrad"):
        geometry = gpu.ConvGeometry(kind, *case, ())
        graph, tensors = gpu.define_graph(cudnn, 1, geometry)
        graph.validate()
        graph.build_operation_graph()
        assert len(tensors) == 3
        print(kind, "built")
for name in ("deselect_workspace_greater_than", "get_execution_plan_count",
             "build_plan_at_index", "get_workspace_size_plan_at_index", "execute_plan_at_index"):
    assert callable(getattr(cudnn.pygraph, name)), name
"""


def _real_libcudnn_present():
    """True where nvidia-cudnn-cu13 is installed or a CUDA device is visible (the device
    machine has both)."""
    import importlib.util
    try:
        if importlib.util.find_spec("nvidia.cudnn") is not None:
            return True
    except ModuleNotFoundError:
        pass
    from conftest import _has_gpu
    return _has_gpu()


def test_frontend_wheel_accepts_every_graph(tmp_path):
    """The frontend's Python API (nvidia-cudnn-frontend 1.16, the device machine's version)
    takes every call owlnet makes to define its three graphs: signatures, keywords, chaining.
    A stub libcudnn stands in for the library, so shapes are not checked by this."""
    import importlib.util
    import os
    import shutil
    import subprocess
    import sys
    if importlib.util.find_spec("cudnn") is None:
        pytest.skip("nvidia-cudnn-frontend is not installed")
    if _real_libcudnn_present():
        pytest.skip("the real libcudnn is here (the frontend loads it before the stub, and a "
                    "made-up handle crashes it): the gpu tests build these graphs for real")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the stub libcudnn")
    (tmp_path / "stub.c").write_text(STUB_LIBCUDNN)
    subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcudnn.so.9", "-o",
                    str(tmp_path / "libcudnn.so.9"), str(tmp_path / "stub.c")], check=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LD_LIBRARY_PATH=f"{tmp_path}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", GRAPH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split().count("built") == 9


def test_gpu_extra_brings_libcudnn():
    """Defect 2: ``pip install owlnet[gpu]`` installs libcudnn (nvidia-cudnn-cu13), not only
    the frontend, which does not depend on it."""
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    names = [r.split(">")[0].split("=")[0].split("<")[0].strip()
             for r in project["project"]["optional-dependencies"]["gpu"]]
    assert {"cupy-cuda13x", "nvidia-cudnn-frontend", "nvidia-cudnn-cu13"} <= set(names)
