"""Tests of `--mesh=1P2D` parsing and the device split (one device, in process).

The split on 8 real (CPU) devices runs in a subprocess: see
tests/test_transfer_multidevice.py.
"""

from __future__ import annotations

import dataclasses

import jax
import pytest

from dualpath_jax.transfer import MeshConfig, build_cluster_mesh


@pytest.mark.parametrize("spec,tp,expected", [
    ("1P2D", 1, (1, 2, 1, 1)), ("2p4d", 2, (2, 4, 2, 2)),
    (" 3P1D ", "4,2", (3, 1, 4, 2)), ("1P1D", "2", (1, 1, 2, 2))])
def test_parse(spec, tp, expected):
  c = MeshConfig.parse(spec, tp)
  assert (c.num_prefill, c.num_decode, c.prefill_tp, c.decode_tp) == expected
  assert c.devices_needed == expected[0] * expected[2] + expected[1] * expected[3]
  assert str(c).startswith(f"{expected[0]}P{expected[1]}D")


@pytest.mark.parametrize("spec,tp", [("1P", 1), ("P2D", 1), ("0P2D", 1),
                                     ("1P2D", "a"), ("1P2D", "1,2,3"),
                                     ("1P2D", 0), (3, 1)])
def test_parse_rejects(spec, tp):
  with pytest.raises(ValueError):
    MeshConfig.parse(spec, tp)


def test_engines_share_the_single_device():
  devices = jax.devices()[:1]
  cluster = build_cluster_mesh(MeshConfig.parse("2P4D"), devices)
  assert [e.name for e in cluster.engines] == ["P0", "P1", "D0", "D1", "D2",
                                               "D3"]
  assert [e.role for e in cluster.engines] == ["prefill"] * 2 + ["decode"] * 4
  assert all(e.devices == (devices[0],) and e.tp == 1 for e in cluster.engines)
  assert cluster.shared and cluster.num_devices == 1
  assert cluster.device_ids() == {name: [devices[0].id] for name in
                                  ("P0", "P1", "D0", "D1", "D2", "D3")}
  assert cluster.sharing_warning() is None  # one device: sharing is the point
  assert cluster.engine("D3").mesh.axis_names == ("tp",)
  with pytest.raises(ValueError, match="no engine named"):
    cluster.engine("D4")


def test_sharing_among_several_devices_is_a_warning():
  """A mesh wider than a host of several devices wraps around silently:
  on a pod that is a wrong --mesh/--tp, and the launchers warn."""
  one = build_cluster_mesh(MeshConfig.parse("2P3D", tp=2), jax.devices()[:1] * 2)
  several = dataclasses.replace(one, num_devices=8)
  warning = several.sharing_warning()
  assert warning.startswith("2P3D") and "needs 10 devices, 8 available" in warning
  assert "'D2'" in warning
  unshared = build_cluster_mesh(MeshConfig.parse("1P1D"), jax.devices()[:1])
  assert dataclasses.replace(unshared, prefill=(), num_devices=8
                             ).sharing_warning() is None


def test_too_few_devices():
  devices = jax.devices()[:1]
  with pytest.raises(ValueError, match="allow_shared_devices=False"):
    build_cluster_mesh(MeshConfig.parse("1P2D", allow_shared_devices=False),
                       devices)
  with pytest.raises(ValueError, match="for one engine"):
    build_cluster_mesh(MeshConfig.parse("1P1D", tp=2), devices)
