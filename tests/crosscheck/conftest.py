"""Cross-checks against PyTorch and friends.

Each module starts with ``torch = pytest.importorskip("torch")`` so that, without the crosscheck
extra, its tests are reported as skipped rather than failing.
"""
