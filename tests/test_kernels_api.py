"""The paged-attention API: dispatch, "auto", int8 pools, input checks."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import quantize
from kernels import testing
from kernels.paged_attention import IMPLEMENTATIONS, paged_attention
from kernels.paged_attention import resolve_implementation


@pytest.mark.parametrize("q_len,q_lens", [(1, [1, 0, 1]), (3, [3, 2, 0])])
def test_pallas_triton_through_api_matches_xla(q_len, q_lens):
  case = testing.make_case(21 + q_len, kv_lens=[19, 40, 7], q_lens=q_lens,
                           q_len=q_len, num_heads=4, num_kv_heads=2)
  out = paged_attention(*case.args(), implementation="pallas_triton")
  ref = paged_attention(*case.args(), implementation="xla")
  testing.assert_matches(out, case, np.asarray(ref))


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked",
                                            "pallas_triton"])
def test_int8_through_api_close_to_float_pool(implementation):
  """A float32 pool quantized to int8 (one scale per page, K/V and head):
  attention over the int8 pool stays within int8 rounding of attention over
  the original float32 pool, computed by the reference."""
  case = testing.make_case(22, kv_lens=[33, 64], num_heads=4,
                           num_kv_heads=2, dtype="float32")
  pool8, scales = quantize.quantize_pages(case.kv_pages)
  out = paged_attention(case.q, pool8, *case.args()[2:],
                        implementation=implementation, kv_scales=scales)
  assert out.dtype == case.q.dtype
  exact = testing.reference(case)  # the unquantized float32 pool
  err = testing.relative_error(np.asarray(out, np.float32), exact)
  assert 1e-4 < err < 2e-2, err  # int8 rounding shows, and no more


def test_quantize_round_trip_within_half_a_step():
  rng = np.random.default_rng(23)
  pages = jnp.asarray(rng.standard_normal((5, 2, 3, 16, 64)) * 4.0,
                      jnp.float32)
  q, scales = quantize.quantize_pages(pages)
  assert q.dtype == jnp.int8 and scales.shape == (5, 2, 3)
  back = quantize.dequantize_pages(q, scales)
  err = np.abs(np.asarray(back) - np.asarray(pages))
  assert np.all(err <= np.asarray(scales)[..., None, None] * 0.5 + 1e-6)
  assert np.abs(np.asarray(q)).max() == 127


@pytest.mark.parametrize("backend,q_len,head_dim,quantized,want", [
    ("cpu", 1, 64, False, "xla_chunked"),
    ("gpu", 1, 64, False, "pallas_triton"),
    ("gpu", 7, 128, True, "pallas_triton"),
    ("gpu", 1, 80, False, "xla_chunked"),  # not a power of 2
    ("tpu", 1, 128, False, "pallas_mosaic_tpu"),
    ("tpu", 5, 128, False, "xla_chunked"),  # TPU prefill: dtype unknown
    ("tpu", 1, 128, True, "pallas_mosaic_tpu"),
])
def test_auto_picks_a_supporting_implementation(monkeypatch, backend, q_len,
                                                head_dim, quantized, want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  got = resolve_implementation("auto", q_len=q_len, head_dim=head_dim,
                                   quantized=quantized)
  assert got == want


def test_each_backend_is_imported_when_first_looked_up():
  """A CPU process that imports the model and runs attention on "auto"
  (XLA) never imports the Pallas backends (their lowerings take most of a
  second to import); a lookup imports its backend and gives its function."""
  backends = ("kernels.paged_attention_triton", "kernels.decode_mosaic_gpu",
              "kernels.paged_attention_mosaic_gpu",
              "kernels.paged_attention_mosaic_tpu")
  script = f"""
import sys
import numpy as np
from dualpath_jax.model import runner
from kernels import testing
from kernels.paged_attention import IMPLEMENTATIONS, paged_attention
case = testing.make_case(5, kv_lens=[19, 3], num_heads=4, num_kv_heads=2)
out = paged_attention(*case.args(), implementation="auto")
testing.assert_matches(out, case, testing.reference(case))
print("after attention:", [m for m in {backends!r} if m in sys.modules])
fn = IMPLEMENTATIONS["pallas_triton"]
from kernels import paged_attention_triton
assert fn is paged_attention_triton.paged_attention_triton
print("after a lookup:", "kernels.paged_attention_triton" in sys.modules)
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, timeout=300, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "after attention: []" in proc.stdout, proc.stdout
  assert "after a lookup: True" in proc.stdout, proc.stdout
  assert sorted(IMPLEMENTATIONS) == sorted(
      ["xla", "xla_chunked", "pallas_triton", "pallas_mosaic_tpu",
       "pallas_mosaic_gpu"])
  with pytest.raises(KeyError):
    IMPLEMENTATIONS["cuda_magic"]  # pylint: disable=pointless-statement


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked"])
def test_numpy_and_list_arguments_are_taken_as_arrays(implementation):
  """Numpy arrays used to hit numpy's bounds check on the junk table entries
  the kernels clamp (`xla`: IndexError) or fail to trace (`xla_chunked`);
  lists failed on `.ndim`. Both give the reference's result now."""
  case = testing.make_case(21, kv_lens=[10, 20], q_len=4, num_heads=4,
                           num_kv_heads=2, head_dim=16, block_size=8)
  q, pool, tables, kv_lens, q_lens = (np.asarray(a) for a in case.args())
  assert tables.max() >= pool.shape[0] or tables.min() < 0  # junk entries
  for args in ((q, pool, tables, kv_lens, q_lens),
               (q, pool, tables.tolist(), kv_lens.tolist(), q_lens.tolist())):
    out = paged_attention(*args, implementation=implementation)
    testing.assert_matches(out, case)


def test_eager_calls_check_lengths_and_the_ids_holding_context():
  """Called eagerly, a table id out of the pool among the entries holding
  context (kernels would clamp it and read another page) and lengths no call
  means (a context longer than the table holds included) raise, naming the
  row; junk past the context, a table used to its last slot and empty rows
  do not. Under `jit` nothing is checked."""
  case = testing.make_case(25, kv_lens=[10, 20], q_len=4, num_heads=4,
                           num_kv_heads=2, head_dim=16, block_size=8,
                           pages_per_seq=4)
  q, pool, tables, kv_lens, q_lens = case.args()
  assert (np.asarray(tables)[:, 3] >= pool.shape[0]).any() or (
      np.asarray(tables)[:, 3] < 0).any()  # junk past the context: fine
  testing.assert_matches(paged_attention(*case.args()), case)
  full = tables.at[1, 3].set(tables[1, 0])  # row 1: every entry a page
  paged_attention(q, pool, full, jnp.array([10, 32]), q_lens)  # to the end
  with pytest.raises(ValueError, match=r"row 1: kv_lens 33 exceeds the block "
                     r"table's capacity 32 \(4 pages of 8 tokens\)"):
    paged_attention(q, pool, full, jnp.array([10, 33]), q_lens)
  with pytest.raises(ValueError, match=r"row 1: block_tables\[1, 3\]"):
    paged_attention(q, pool, tables, jnp.array([10, 32]), q_lens)
  paged_attention(q, pool, tables, jnp.array([0, 20]), jnp.array([0, 4]))
  for column, bad_id in ((1, pool.shape[0]), (0, -1)):
    bad_tables = tables.at[0, column].set(bad_id)
    with pytest.raises(ValueError, match=rf"row 0: block_tables\[0, {column}\]"):
      paged_attention(q, pool, bad_tables, kv_lens, q_lens)
    # under jit the same call runs (clamped), unchecked
    jax.jit(paged_attention)(q, pool, bad_tables, kv_lens, q_lens)
  for lens in ((jnp.array([10, 20]), jnp.array([5, 4])),  # q_lens > q_len
               (jnp.array([3, 20]), jnp.array([4, 4])),  # q_lens > kv_lens
               (jnp.array([10, 20]), jnp.array([-1, 4]))):
    with pytest.raises(ValueError, match="row 0: q_lens"):
      paged_attention(q, pool, tables, *lens)
  # It was blamed on q_lens ("q_lens 0 must be in [0, min(4, -3)]").
  with pytest.raises(ValueError, match="row 0: kv_lens -3 must be >= 0"):
    paged_attention(q, pool, tables, jnp.array([-3, 20]), jnp.array([0, 4]))


def test_bad_inputs_raise():
  case = testing.make_case(24, kv_lens=[10], num_heads=2, num_kv_heads=1)
  with pytest.raises(ValueError, match="unknown"):
    paged_attention(*case.args(), implementation="cuda_magic")
  with pytest.raises(ValueError, match="kv_scales"):
    paged_attention(case.q, case.kv_pages.astype(jnp.int8),
                        *case.args()[2:])
  scales = jnp.ones((1, 2, 1), jnp.float32)
  with pytest.raises(ValueError, match="kv_scales must be"):
    paged_attention(case.q, case.kv_pages.astype(jnp.int8),
                        *case.args()[2:], kv_scales=scales)
  # An integer q came back cast to int (zeros); an int32 pool was read as
  # a float one.
  for implementation in ("xla", "pallas_triton"):
    with pytest.raises(ValueError, match="q must be floating point"):
      paged_attention(case.q.astype(jnp.int32), *case.args()[1:],
                      implementation=implementation)
    with pytest.raises(ValueError, match="kv_pages must be floating point"):
      paged_attention(case.q, case.kv_pages.astype(jnp.int32),
                      *case.args()[2:], implementation=implementation)
  # A prefill call was refused in the name of the decode kernel.
  prefill = testing.make_case(24, kv_lens=[10], q_len=2, num_heads=2,
                              num_kv_heads=1)
  assert prefill.kv_pages.dtype == jnp.float32
  with pytest.raises(ValueError, match="the Mosaic GPU prefill kernel takes"):
    paged_attention(*prefill.args(), implementation="pallas_mosaic_gpu")


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked",
                                            "pallas_mosaic_tpu"])
def test_rows_with_no_key_are_zeros_whatever_their_table_names(
    implementation):
  """A padding row of a batch (`kv_lens == 0`) has no context page to fill
  its table with; the reference returned NaN where its table named a NaN
  page (the engine's padding rows name page 0), the kernels zeros."""
  rng = np.random.default_rng(0)
  pool = rng.standard_normal((4, 2, 2, 16, 64)).astype(np.float32)
  pool[0] = np.nan
  q = rng.standard_normal((2, 2, 8, 64)).astype(np.float32)
  tables = np.array([[1, 2], [0, 0]], np.int32)
  out = np.asarray(paged_attention(
      q, pool, tables, np.array([20, 0], np.int32), np.array([1, 0], np.int32),
      implementation=implementation))
  assert np.isfinite(out[0, 0]).all() and (out[0, 0] != 0).any()
  assert (out[0, 1] == 0).all() and (out[1] == 0).all()  # padding, empty


def _entry_points():
  """Every public paged-attention function a model author may call
  directly: (name, fn, takes q_lens)."""
  from kernels import decode_mosaic_gpu, decode_mosaic_tpu, decode_triton  # pylint: disable=g-import-not-at-top
  from kernels import paged_attention_ref, paged_attention_xla  # pylint: disable=g-import-not-at-top
  from kernels import prefill_mosaic_gpu, prefill_mosaic_tpu, prefill_triton  # pylint: disable=g-import-not-at-top
  return [
      ("api", paged_attention, True),
      ("ref", paged_attention_ref.ref_paged_attention, True),
      ("xla_chunked", paged_attention_xla.xla_chunked_paged_attention, True),
      ("triton decode", decode_triton.paged_decode, False),
      ("triton prefill", prefill_triton.paged_prefill, True),
      ("mosaic gpu decode", decode_mosaic_gpu.paged_decode, False),
      ("mosaic gpu prefill", prefill_mosaic_gpu.paged_prefill, True),
      ("mosaic tpu decode", decode_mosaic_tpu.paged_decode_tpu, False),
      ("mosaic tpu prefill", prefill_mosaic_tpu.paged_prefill_tpu, True),
  ]


@pytest.mark.parametrize("bad,match", [
    ("head_dim", "head_dim mismatch"),
    ("heads", "not a multiple of num_kv_heads"),
    ("float_tables", "block_tables must be integers"),
    ("float_lens", "kv_lens must be integers"),
    ("batch", "do not match q's batch"),
    ("q_rank", "expected q"),
    ("no_queries", "no query tokens"),
])
def test_every_entry_point_rejects_bad_arguments(bad, match):
  """A wrong shape or dtype is a ValueError naming it at every public
  entry point, not a lowering error or (head_dim, before these checks: the
  Triton kernels returned q's head_dim) a result of the wrong shape."""
  case = testing.make_case(25, kv_lens=[40, 7], num_heads=4, num_kv_heads=2,
                           head_dim=64, block_size=16, dtype="bfloat16")
  q, kv, tables, lens, q_lens = case.args()  # q: [batch, 1, heads, dim]
  if bad == "head_dim":
    q = jnp.concatenate([q, q], axis=-1)
  elif bad == "heads":
    q = q[:, :, :3]
  elif bad == "float_tables":
    tables = tables.astype(jnp.float32)
  elif bad == "float_lens":
    lens = lens.astype(jnp.float32)
  elif bad == "batch":
    lens = lens[:1]
  for name, fn, prefill in _entry_points():
    args_q = q
    if bad == "q_rank":
      args_q = q[0] if prefill else q  # 3-D for prefill, 4-D for decode
    elif bad == "no_queries":
      if not prefill:
        continue  # a decode query is one token by its shape
      args_q = q[:, :0]
    elif not prefill:
      args_q = q[:, 0]
    args = (args_q, kv, tables, lens) + ((q_lens,) if prefill else ())
    with pytest.raises(ValueError, match=match):
      fn(*args)
    del name


def _numpy_write_kv(pool, k, v, slots):
  """What `write_kv` must do, one token at a time: a page whose offset-0
  slot is written is zeroed first (at most batch * ceil(q_len / P) of them,
  the lowest ids); then each token's K and V land at its slot and padding
  slots (-1) write nothing."""
  want = pool.copy()
  page_size = pool.shape[3]
  bound = slots.shape[0] * -(-slots.shape[1] // page_size)
  started = sorted(int(s) // page_size for s in slots.reshape(-1)
                   if s >= 0 and s % page_size == 0)
  want[started[:bound]] = 0
  for b in range(slots.shape[0]):
    for t in range(slots.shape[1]):
      if slots[b, t] >= 0:
        page, off = divmod(int(slots[b, t]), page_size)
        want[page, 0, :, off], want[page, 1, :, off] = k[b, t], v[b, t]
  return want


@pytest.mark.parametrize("order", ["random", "consecutive", "decode"])
def test_write_kv_scatters_tokens_zeroes_started_pages_drops_padding(order):
  """Against numpy: each token's K and V land at its slot, padding slots
  (-1) write nothing, a page started at its offset 0 holds zeros past the
  new tokens (the pool is NaN junk), every other page is kept.
  "consecutive" rows (positions in order across page boundaries, one
  beginning mid-page) have every started page zeroed; "random" slots start
  more pages than in-order rows can, and only the lowest ids are."""
  from kernels import write_kv  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(26)
  pool = rng.standard_normal((12, 2, 2, 16, 8)).astype(np.float32)
  pool[rng.random(pool.shape) < 0.2] = np.nan
  q_len = 1 if order == "decode" else 21
  k = rng.standard_normal((2, q_len, 2, 8)).astype(np.float32)
  v = rng.standard_normal((2, q_len, 2, 8)).astype(np.float32)
  if order == "random":
    starts = np.arange(6) * 16  # six page starts: more than 2 x 2
    rest = rng.permutation(np.setdiff1d(np.arange(12 * 16), starts))
    slots = np.concatenate([starts, rest[:2 * q_len - 6]]).reshape(2, q_len)
    slots[1, 15:] = -1
  elif order == "consecutive":
    slots = np.stack([np.arange(21) + 3 * 16 + 5,  # pages 3 (mid) to 4
                      np.arange(21) + 8 * 16])  # pages 8 to 9
    slots[1, 18:] = -1
  else:
    slots = np.array([[5 * 16], [7 * 16 + 9]])
  slots = slots.astype(np.int32)
  want = _numpy_write_kv(pool, k, v, slots)
  got = write_kv(jnp.asarray(pool), jnp.asarray(k), jnp.asarray(v),
                 jnp.asarray(slots))
  np.testing.assert_array_equal(np.asarray(got), want)
  started = sorted(int(s) // 16 for s in slots.reshape(-1)
                   if s >= 0 and s % 16 == 0)
  zeroed = started[:4] if order == "random" else started
  assert zeroed and np.isfinite(want[zeroed]).all()
  assert np.isnan(want).any()  # pages not started keep their junk
  if order == "random":
    assert np.isnan(want[started[4:]]).any()  # past the bound: kept


def test_write_kv_refuses_bad_shapes_and_dtypes():
  from kernels import write_kv  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(26)
  pool = rng.standard_normal((6, 2, 2, 16, 8)).astype(np.float32)
  k = v = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
  slots = rng.permutation(6 * 16)[:10].reshape(2, 5).astype(np.int32)
  with pytest.raises(ValueError, match="slot_mapping"):
    write_kv(jnp.asarray(pool), jnp.asarray(k), jnp.asarray(v),
             jnp.asarray(slots[:, :4]))
  with pytest.raises(ValueError, match="expected k and v"):
    write_kv(jnp.asarray(pool), jnp.asarray(k[..., :4]),
             jnp.asarray(v[..., :4]), jnp.asarray(slots))
  with pytest.raises(ValueError, match="must be integers"):
    write_kv(jnp.asarray(pool), jnp.asarray(k), jnp.asarray(v),
             jnp.asarray(slots, jnp.float32))


def test_write_kv_takes_numpy_and_lists_and_refuses_slots_past_the_pool():
  """Numpy pools failed on `.at`, list slots on `.shape`; a slot past the
  pool was dropped by the scatter without a sign. Eagerly it raises now,
  naming the slot; -1 still marks padding."""
  from kernels import write_kv  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(27)
  pool = rng.standard_normal((4, 2, 2, 16, 8)).astype(np.float32)
  k, v = rng.standard_normal((2, 2, 5, 2, 8)).astype(np.float32)
  slots = np.array([[16, 17, 18, -1, -1], [32, 33, 34, 35, 36]], np.int32)
  want = np.asarray(write_kv(jnp.asarray(pool), jnp.asarray(k),
                             jnp.asarray(v), jnp.asarray(slots)))
  np.testing.assert_array_equal(
      want[1, 0, :, :3], np.moveaxis(k[0, :3], 0, 1))  # written where named
  for args in ((pool, k, v, slots), (pool, k, v, slots.tolist())):
    np.testing.assert_array_equal(np.asarray(write_kv(*args)), want)
  for bad in (64, 500):
    past = slots.copy()
    past[1, 3] = bad
    with pytest.raises(ValueError, match=rf"slot_mapping\[1, 3\] = {bad} is "
                       r"past the pool's 64 slots"):
      write_kv(pool, k, v, past)
  jitted = jax.jit(write_kv)(pool, k, v, past)  # traced: not checked
  np.testing.assert_array_equal(np.asarray(jitted)[2, :, :, :3],
                                want[2, :, :, :3])


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
def test_sm_scale_traced_or_as_an_array(implementation):
  """A concrete array scale is taken as a float by every implementation; a
  traced one by the XLA ones, and refused by name by the Pallas kernels,
  which compile it in (their error was JAX's "Non-hashable static
  arguments", naming nothing)."""
  case = testing.make_case(28, kv_lens=[9, 20], q_len=1, num_heads=4,
                           num_kv_heads=2, head_dim=16, block_size=16)
  scale = 0.3
  want = paged_attention(*case.args(), sm_scale=scale, implementation="xla")
  got = paged_attention(*case.args(), sm_scale=np.float32(scale),
                        implementation=implementation)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert not np.allclose(np.asarray(want), np.asarray(
      paged_attention(*case.args(), implementation="xla")), atol=1e-3)
  call = jax.jit(lambda s: paged_attention(
      *case.args(), sm_scale=s, implementation=implementation))
  if implementation == "xla":
    np.testing.assert_allclose(np.asarray(call(scale)), np.asarray(want),
                               atol=1e-5)
  else:
    with pytest.raises(ValueError, match="sm_scale must be a Python float"):
      call(scale)
