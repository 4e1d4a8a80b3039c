"""Shared pytest configuration for the brute-force test suite.

Makes the helper modules next to this file (``problems``, ``reference``) and the
repository's package importable, whether or not the package is installed and
whichever pytest import mode is used.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_TESTS_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent

for _path in (_TESTS_DIR, _REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def pytest_configure(config: pytest.Config) -> None:
    """Configure PyTorch for many tiny tests.

    - One intra-op thread per test process: the models are tiny, so threads buy
      nothing, while OpenMP threads that compete for the cores (with pytest-xdist
      workers, ``pytest -n 2``, or any other load) slow the suite down by more than
      an order of magnitude (measured: 5 s vs. 135 s for ``test_operators.py`` on a
      busy 2-core machine).
    - Silence a deprecation warning that PyTorch emits internally (forward-mode AD).

    Args:
        config: The pytest configuration.
    """
    torch.set_num_threads(1)
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )


@pytest.fixture(autouse=True)
def _restore_global_torch_state() -> Iterator[None]:
    """Restore the global RNG state and default dtype after each test.

    Problem factories seed the global RNG to initialize models; restoring the state
    keeps tests independent of their execution order.

    Yields:
        Nothing.
    """
    rng_state = torch.get_rng_state()
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_rng_state(rng_state)
    torch.set_default_dtype(default_dtype)
