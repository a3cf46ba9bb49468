"""Output files: checked before a run without leaving anything behind,
written atomically (a failed write keeps the previous file)."""

from __future__ import annotations

import json
import os

import pytest

from dualpath_jax import outputs


def test_output_path_checks_create_nothing(tmp_path):
  """A launcher's up-front check makes no folder (a run that fails later
  leaves nothing behind); the writer makes it when it writes."""
  path = tmp_path / "a" / "b" / "r.json"
  assert outputs.check_output_path(str(path), "--json") == str(path)
  assert not (tmp_path / "a").exists()
  outputs.write_json({"x": 1}, str(path))
  assert json.loads(path.read_text()) == {"x": 1}
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="is not a directory"):
    outputs.check_output_path(str(tmp_path / "file" / "sub" / "r.json"),
                              "--json")
  with pytest.raises(ValueError, match="is a directory"):
    outputs.check_output_path(str(tmp_path / "a"), "--json")
  with pytest.raises(ValueError, match="empty path"):
    outputs.check_output_path("", "--json")


def test_png_outputs_end_in_png_and_outputs_are_distinct(tmp_path):
  """A PNG never lands on a report given in its place: the path must end
  in .png, and two outputs (or a source and its output) must differ, also
  through another spelling of the same path."""
  report = tmp_path / "r.json"
  with pytest.raises(ValueError, match="does not end in .png"):
    outputs.check_output_path(str(report), "--plot", suffix=".png")
  assert outputs.check_output_path(str(tmp_path / "r.PNG"), "--plot",
                                   suffix=".png")
  outputs.check_distinct_paths([("--report", str(report)),
                                ("--plot", str(tmp_path / "r.png"))])
  with pytest.raises(ValueError, match="--out and --plot are the same file"):
    outputs.check_distinct_paths([
        ("--out", str(report)),
        ("--plot", str(tmp_path / "sub" / ".." / "r.json"))])
  (tmp_path / "link.json").symlink_to(report)
  with pytest.raises(ValueError, match="the report and the PNG"):
    outputs.check_distinct_paths([("the report", str(report)),
                                  ("the PNG", str(tmp_path / "link.json"))])


def test_output_dir_checks_refuse_what_cannot_hold_files(tmp_path):
  """A folder output (a cold tier's root): an existing or makeable
  directory passes and is not made; a file, or a folder under a file, is
  refused; so is a folder no file can be made in, found by a probe that
  leaves nothing behind (/proc refuses new files even to root)."""
  new = tmp_path / "x" / "store"
  assert outputs.check_output_dir(str(new), "--cold_tier") == str(new)
  assert not (tmp_path / "x").exists()
  assert outputs.check_output_dir(str(tmp_path), "--cold_tier") == str(tmp_path)
  assert list(tmp_path.iterdir()) == []  # the probe is gone
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    outputs.check_output_dir(str(tmp_path / "file"), "--cold_tier")
  with pytest.raises(ValueError, match="file is not a directory"):
    outputs.check_output_dir(str(tmp_path / "file" / "sub"), "--cold_tier")
  with pytest.raises(ValueError, match="empty path"):
    outputs.check_output_dir("", "--cold_tier")
  if os.path.isdir("/proc/self"):  # Linux
    for check in (outputs.check_output_dir, outputs.check_output_path):
      with pytest.raises(ValueError, match="the folder /proc is not writable"):
        check("/proc/dualpath_probe_test", "--out")


def test_a_failed_figure_save_keeps_the_old_png(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  path = tmp_path / "plot.png"
  path.write_bytes(b"old")

  class Broken:
    def savefig(self, *args, **kwargs):
      raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    outputs.save_figure(Broken(), str(path))
  assert path.read_bytes() == b"old"
  assert sorted(os.listdir(tmp_path)) == ["plot.png"]
  fig = plt.figure()
  outputs.save_figure(fig, str(path))
  plt.close(fig)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_spare_what_the_run_reads_or_keeps(tmp_path):
  """A report over a cold tier's key file made every sealed block
  unreadable, one named index.sqlite inside the cold tier lost the store,
  one inside a checkpoint folder the model: refused now, also through a
  symlink. A keyword source (random:...) or a file input that does not
  exist names nothing; a folder input does, existing or not."""
  key = tmp_path / "key"
  key.write_text("00" * 32)
  store = tmp_path / "store"
  store.mkdir()
  checkpoint = tmp_path / "ckpt"
  checkpoint.mkdir()
  inputs = [("--cold_tier_key_file", str(key), "file"),
            ("--cold_tier", str(store), "dir"),
            ("--model", str(checkpoint), "any"),
            ("--trace", str(tmp_path / "absent.jsonl"), "file"),
            ("--tokenizer", "bytes", "file"),
            ("--plans", str(tmp_path / "new_dir"), "dir")]
  ok = [("--report", str(tmp_path / "r.json")),
        ("--plot", str(tmp_path / "r.png"))]
  outputs.check_output_paths(ok, inputs=inputs)
  (tmp_path / "link").symlink_to(key)
  for out, match in (
      (key, "--cold_tier_key_file and --report are the same file"),
      (tmp_path / "link", "--cold_tier_key_file and --report are the same"),
      (store / "index.sqlite", "--report .* lies inside --cold_tier"),
      (store, "--cold_tier and --report are the same file"),
      (checkpoint / "dualpath_model.json", "lies inside --model"),
      (tmp_path / "new_dir" / "r.json", "lies inside --plans")):
    with pytest.raises(ValueError, match=match):
      outputs.check_outputs_spare_inputs([("--report", str(out))], inputs)
  model_file = tmp_path / "m.gguf"
  model_file.write_bytes(b"GGUF")
  with pytest.raises(ValueError, match="--model and --out are the same"):
    outputs.check_outputs_spare_inputs(
        [("--out", str(model_file))], [("--model", str(model_file), "any")])
  outputs.check_outputs_spare_inputs(
      [("--out", str(tmp_path / "random:tiny-test"))],
      [("--model", "random:tiny-test", "any"), ("--trace", None, "file")])


def test_a_write_the_os_refuses_is_one_line_and_keeps_the_old_file(
    tmp_path, capsys):
  """A full disk at the report ended a finished run in a traceback; the
  launchers' wrapper prints it as one line and exits 1 now, the previous
  report whole and no temporary file left."""
  import errno  # pylint: disable=g-import-not-at-top
  from dualpath_jax.interrupts import ctrl_c_ends_quietly  # pylint: disable=g-import-not-at-top
  path = tmp_path / "r.json"
  outputs.write_json({"old": 1}, str(path))

  def full_disk(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("{")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  with pytest.raises(outputs.OutputWriteError) as err:
    outputs.replace_atomically(str(path), full_disk)
  assert err.value.errno == errno.ENOSPC
  assert err.value.strerror == (f"cannot write {path}: No space left on "
                                "device (the previous file is kept)")
  assert json.loads(path.read_text()) == {"old": 1}
  assert os.listdir(tmp_path) == ["r.json"]

  def main(argv):
    del argv
    outputs.replace_atomically(str(tmp_path / "new.json"), full_disk)

  with pytest.raises(SystemExit) as done:
    ctrl_c_ends_quietly(main, "agent_eval")([])
  assert done.value.code == 1
  assert capsys.readouterr().err == (
      f"agent_eval: cannot write {tmp_path / 'new.json'}: No space left on "
      "device\n")
  assert os.listdir(tmp_path) == ["r.json"]
