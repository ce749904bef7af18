"""The arithmetic of benchmarks/train_step.py's ceiling line: what the matmul floor allows.

A step made of its matmuls alone takes the floor's time, so it runs PyTorch's time / floor times
as fast as PyTorch; a target ratio r then asks for a step of (PyTorch's time / r) / floor times
the floor. Timings are made up here: the benchmark measures, the test checks what it prints.
"""

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import train_step as bench  # noqa: E402

pytestmark = pytest.mark.host_only("the arithmetic of a benchmark's report: no arrays")

seconds = st.floats(0.01, 10.0)


@given(floor=seconds, torch_loop=seconds, mini_loop=seconds, torch_plain=seconds,
       mini_plain=seconds)
def test_ceiling_is_pytorchs_time_over_the_floor(floor, torch_loop, mini_loop, torch_plain,
                                                 mini_plain):
    times = {"torch/loop": torch_loop, "minilora/loop": mini_loop,
             "torch/plain": torch_plain, "minilora/plain": mini_plain}
    out = bench.print_ceiling("lora", times, floor)
    assert set(out) == {"loop", "plain"}
    for kind, goal in bench.GOALS["lora"].items():
        ceiling, asks, minilora = out[kind]
        assert ceiling == pytest.approx(times[f"torch/{kind}"] / floor)
        assert asks == pytest.approx(ceiling / goal)
        assert minilora == pytest.approx(times[f"minilora/{kind}"] / floor)
        # meeting the target is the same as minilora's x floor within what the target asks
        meets = times[f"torch/{kind}"] / times[f"minilora/{kind}"] >= goal
        assert meets == (minilora <= asks) or minilora == pytest.approx(asks)


def test_ceiling_line_names_each_target_and_skips_missing_sides(capsys):
    out = bench.print_ceiling("qlora", {"torch/loop": 0.3, "minilora/loop": 0.2}, 0.15)
    line = capsys.readouterr().out
    assert set(out) == {"loop"} and out["loop"] == pytest.approx((2.0, 2.0 / 1.2, 4 / 3))
    assert "loop at most 2.00x PyTorch" in line and "target 1.2x" in line
    # no PyTorch side (bitsandbytes could not be built): nothing to compare, nothing printed
    assert bench.print_ceiling("qlora", {"minilora/loop": 0.2}, 0.15) == {}
    assert capsys.readouterr().out == ""
    assert set(bench.GOALS) == set(bench.MODES)
