"""launch.kernel_table: the benchmark table's lines and verdicts."""

from __future__ import annotations

from launch import kernel_table

SHAPE = dict(batch=1, heads=32, kv_heads=8, head_dim=128, page=16,
             ctx=32768, dtype="bfloat16")


def _decode_row(**extra):
  return dict(kind="decode", impl="pallas_triton (ours)", shape=SHAPE,
              time_us=87.5, gbps=1540.0, tflops=0.38, pct_copy=51.3,
              rel_err=2.3e-3, **extra)


def test_row_lines():
  line = kernel_table.fmt_row(_decode_row())
  assert "ctx=32768" in line and "pallas_triton (ours)" in line
  assert line.split()[-5:] == ["87.5", "1540.0", "0.38", "51.3", "2.3e-03"]
  failed = dict(kind="decode", impl="pallas_mosaic_gpu (ours)", shape=SHAPE,
                error="ValueError: bad tiling")
  assert "ERROR ValueError: bad tiling" in kernel_table.fmt_row(failed)
  copy = dict(kind="copy", impl="gather runs of 4 (ours)",
              shape=dict(layers=2, blocks=64), time_us=10.0, gbps=40.0,
              tflops=0.0, pct_pinned=80.0)
  assert kernel_table.fmt_row(copy).split()[-2] == "80.0p"
  assert kernel_table.host_to_device("gather runs of 4 (ours)")
  assert not kernel_table.host_to_device("scatter device->host (ours)")


def test_table_verdicts(capsys):
  check = dict(target="decode >= 60% of copy BW", shape="[pallas_triton]",
               value=0.513, ok=False)
  kernel_table.print_table([_decode_row()], [check], interpret=False)
  out = capsys.readouterr().out
  assert "MISS decode >= 60% of copy BW" in out and "0.51" in out
  kernel_table.print_table([_decode_row()], [dict(check, ok=True)],
                           interpret=False)
  assert "PASS decode" in capsys.readouterr().out
  kernel_table.print_table([_decode_row()], [dict(check, ok=None)],
                           interpret=True)
  out = capsys.readouterr().out
  assert "n/a  decode" in out and "judged only on a GPU" in out
