"""launch.list_flags: comma-list flags refused by name before anything runs."""

import pytest

from launch import list_flags


def test_positive_ints():
  assert list_flags.positive_ints("samples", ["1", "4", "8"]) == [1, 4, 8]
  assert list_flags.positive_ints("b", ["2", "16"], power_of_2=True) == [2, 16]
  for bad, pow2 in ((["0"], False), (["x"], False), ([], False),
                    (None, False), (["3"], True)):
    with pytest.raises(ValueError, match="--samples: give positive"):
      list_flags.positive_ints("samples", bad, power_of_2=pow2)


def test_choices():
  allowed = ("single_path", "dualpath", "oracle")
  assert list_flags.choices("policies", " dualpath,oracle", allowed) == [
      "dualpath", "oracle"]
  for text, msg in (("magic", r"--policies: unknown \['magic'\]; choose "
                              r"from \['single_path', 'dualpath', 'oracle'\]"),
                    ("dualpath,dualpath", "lists an entry twice"),
                    ("dualpath,,oracle", "has an empty entry"),
                    (" , ", "is empty"), ("", "is empty")):
    with pytest.raises(ValueError, match=msg):
      list_flags.choices("policies", text, allowed)


def test_rates():
  assert list_flags.rates("rates", "0.4, 0.1,2") == [0.1, 0.4, 2.0]
  for text, msg in (("fast", "comma list of numbers"),
                    ("0.1,-1", "finite agents/s > 0"), ("0", "> 0"),
                    ("inf", "> 0"), ("nan", "> 0"),
                    ("0.1,0.10", "lists a rate twice"),
                    ("0.1,,0.2", "has an empty entry"), ("", "is empty")):
    with pytest.raises(ValueError, match=f"--rates.*{msg}|{msg}"):
      list_flags.rates("rates", text)
