"""kernels/testing.py's own checks: a bug confined to one output row fails
`assert_matches` even where the whole output's error stays in bounds."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import testing


def test_one_wrong_row_fails_though_the_whole_output_is_close():
  case = testing.prefill_case(testing.PREFILL_CASES[1])  # bfloat16
  ref = testing.reference(case)
  out = ref.copy()
  b, t, h = 0, 3, 1  # one token's head: 3% off
  out[b, t, h] *= 1.03
  assert testing.relative_error(out, ref) < testing.tolerance(case)
  assert testing.worst_row_error(out, ref) == pytest.approx(0.03, rel=1e-3)
  with pytest.raises(AssertionError, match="one row's relative error"):
    testing.assert_matches(out, case, ref)
  testing.assert_matches(ref, case, ref)  # the reference itself passes


def test_worst_row_error_skips_zero_rows():
  ref = np.zeros((2, 4))
  ref[0] = [1.0, 0.0, 0.0, 0.0]
  out = ref.copy()
  out[0, 0] = 1.5
  assert testing.worst_row_error(out, ref) == pytest.approx(0.5)
  assert testing.worst_row_error(np.zeros((2, 4)), np.zeros((2, 4))) == 0.0
