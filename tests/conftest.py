import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ZOO = ROOT.parent / "shared" / "caffe-zoo"


@pytest.fixture
def zoo():
    """The real Caffe files shipped beside the project (test inputs, never copied in)."""
    if not ZOO.is_dir():
        pytest.skip(f"{ZOO} is not present")
    return ZOO


@pytest.fixture(autouse=True)
def fresh_owlnet_logger():
    """Each test starts with owlnet's logger as a fresh process has it (no handler, INFO)."""
    from owlnet import logging as owl_logging
    logger = owl_logging.logger
    saved = (list(logger.handlers), logger.level, logger.propagate)
    for handler in saved[0]:
        logger.removeHandler(handler)
    logger.propagate = True
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in saved[0]:
        logger.addHandler(handler)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture(autouse=True)
def restored_owlnet_environment():
    """Tools set OWLNET_* variables for their process (--skip-bad-records,
    --no-python-layers) and backend settings (math mode, cuDNN autotune); a test calling a
    tool's main() must not leave them to the next."""
    import os

    from owlnet import backend
    saved = {k: v for k, v in os.environ.items() if k.startswith("OWLNET_")}
    settings = dict(backend._state)
    yield
    backend._state.update(settings)
    for key in [k for k in os.environ if k.startswith("OWLNET_")]:
        if key not in saved:
            del os.environ[key]
    os.environ.update(saved)


def _has_gpu():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
