"""Shared test set-up: hypothesis profiles and a fresh seed for every test.

Profiles: ``ci`` (derandomized, so CI is repeatable) and ``dev`` (more examples); pick one with
HYPOTHESIS_PROFILE. The default is ``ci``.
"""

import os

# The tests multiply small matrices, where a second BLAS thread only adds hand-offs; on a busy
# machine those hand-offs cost a scheduler time slice each (10-30x slower). Must precede numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import minilora as ml  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Each test starts from seed 0 and float32 defaults, whatever the previous one did."""
    ml.manual_seed(0)
    ml.set_default_dtype(np.float32)
    yield
    ml.set_default_dtype(np.float32)
