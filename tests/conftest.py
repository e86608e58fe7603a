import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
DATA = os.path.join(os.path.dirname(__file__), "data")


def pytest_configure(config):
    """pytest resets warning filters for each test: the engine's filter of numba's inliner warning, again."""
    from engine.kernels import INLINER_WARNING
    config.addinivalue_line("filterwarnings", f"ignore:{INLINER_WARNING}:numba.core.errors.NumbaIRAssumptionWarning")


@pytest.fixture(scope="session")
def data_dir():
    return DATA


@pytest.fixture(scope="session")
def smollm():
    """The default model (SmolLM2-135M-Instruct Q4_1), loaded once for the session."""
    from engine.api import load
    return load(None, n_ctx=1024, threads=2)


@pytest.fixture(scope="session")
def reference():
    import json
    with open(os.path.join(DATA, "smollm2_llamacpp.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def smollm_torch():
    """The same model on the float32 torch reference path."""
    from engine.api import load
    return load(None, n_ctx=1024, threads=2, backend="torch")
