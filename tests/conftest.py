"""Shared test set-up: hypothesis profiles, a fresh seed for every test, and the forms that run.

Profiles: ``ci`` (derandomized, so CI is repeatable) and ``dev`` (more examples); pick one with
HYPOTHESIS_PROFILE. The default is ``ci``. The suite runs the fast forms (the default) or, under
``MINILORA_REFERENCE=1``, the reference forms; the header of the run says which.
"""

import os

# The tests multiply small matrices, where a second BLAS thread only adds hand-offs; on a busy
# machine those hand-offs cost a scheduler time slice each. Must precede numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import minilora as ml  # noqa: E402
from minilora import fast  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

RUN_FORMS = fast.enabled()  # the forms this run tests, as MINILORA_REFERENCE chose them at import


def pytest_report_header(config):
    """The first lines of a run say which forms of the ops it tests."""
    forms = "fast forms on" if RUN_FORMS else "reference forms (MINILORA_REFERENCE=1)"
    return [f"minilora: {forms}"]


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Each test starts from seed 0, float32 defaults and the run's forms, whatever the previous
    one did."""
    fast.set_enabled(RUN_FORMS)
    ml.manual_seed(0)
    ml.set_default_dtype(np.float32)
    yield
    ml.set_default_dtype(np.float32)
    fast.set_enabled(RUN_FORMS)
