"""GET /metrics: the server's numbers in Prometheus text format.

Two sources, one registry per server (so tests can run several servers):

* `EngineCollector` turns the engine loop's latest snapshot (taken in the
  loop thread after every step) into gauges and counters at scrape time:
  queue depths, running sequences, KV blocks, prefix-cache query and hit
  tokens, evictions, preemptions.
* `ServerMetrics` holds what the HTTP side observes when a request ends:
  requests by finish reason, prompt / generated / cached tokens, and the
  TTFT, TPOT and end-to-end latency histograms.

Tiers and load paths. Prefix-cache hits carry a `tier` label:
`tier="device"` (found in an engine's page pool), with a hot tier
`tier="hot"` (loaded back from host DRAM) and with a cold tier
`tier="cold"` (loaded back from TensorStore). On a prefill/decode cluster,
`dualpath_load_path_bytes_total{path="hot"|"path1"|"path2"|"free"}` counts
loaded bytes by path ("hot": from a prefill engine's hot tier), and per engine `dualpath_engine_queued_turns`,
`dualpath_storage_nic_backlog_bytes` and `dualpath_storage_nic_bytes_total`
show where work and reads pile up. With a prefetcher,
`dualpath_prefetch_blocks_total{outcome="read"|"used"|"evicted_unused"}`
counts the blocks it read, those a turn then read from the hot tier, and
those evicted before any did.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "dualpath"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# Seconds; spans a 135M model on a CPU to large models on accelerators.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
               160.0, 320.0, 640.0)


class EngineCollector(prometheus_client.registry.Collector):
  """Exports `snapshot()` (see `LocalEngineHandle.snapshot`) at scrape time."""

  def __init__(self, snapshot: Callable[[], dict[str, Any]]):
    self._snapshot = snapshot

  def collect(self) -> Iterator[prometheus_client.Metric]:
    s = self._snapshot()
    yield GaugeMetricFamily(f"{PREFIX}_num_requests_waiting",
                            "Turns queued for admission (preempted included).",
                            value=s["num_waiting"])
    yield GaugeMetricFamily(f"{PREFIX}_num_requests_running",
                            "Sequences admitted (prefilling or decoding).",
                            value=s["num_running"])
    blocks = GaugeMetricFamily(
        f"{PREFIX}_kv_blocks", "KV pool blocks by state (referenced by a "
        "running sequence, cached and evictable, never used).",
        labels=["state"])
    total = s["kv_blocks_total"]
    referenced, cached = s["kv_blocks_referenced"], s["kv_blocks_cached"]
    blocks.add_metric(["referenced"], referenced)
    blocks.add_metric(["cached"], cached)
    blocks.add_metric(["empty"], total - referenced - cached)
    yield blocks
    yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio",
                            "Fraction of KV blocks referenced by sequences.",
                            value=referenced / total if total else 0.0)
    yield CounterMetricFamily(
        f"{PREFIX}_prefix_cache_query_tokens",
        "Context tokens looked up in the prefix cache at admission.",
        value=s["prefix_cache_query_tokens"])
    hits = CounterMetricFamily(
        f"{PREFIX}_prefix_cache_hit_tokens",
        "Context tokens found cached, by the tier that held them.",
        labels=["tier"])
    for tier, n in sorted(s["prefix_cache_hit_tokens"].items()):
      hits.add_metric([tier], n)
    yield hits
    path_bytes = CounterMetricFamily(
        f"{PREFIX}_load_path_bytes",
        "KV bytes loaded from the storage tiers, by DualPath load path "
        "(hot: a prefill engine's host-DRAM hot tier).",
        labels=["path"])
    for path, n in sorted(s["path_bytes"].items()):
      path_bytes.add_metric([path], n)
    yield path_bytes
    if "prefetch_blocks" in s:
      prefetch = CounterMetricFamily(
          f"{PREFIX}_prefetch_blocks",
          "Blocks the prefetcher read into hot tiers, by outcome (read; "
          "used by the turn they were for; evicted unused).",
          labels=["outcome"])
      for outcome, n in sorted(s["prefetch_blocks"].items()):
        prefetch.add_metric([outcome], n)
      yield prefetch
    engines = s.get("engines", {})
    queued = GaugeMetricFamily(
        f"{PREFIX}_engine_queued_turns",
        "Turns placed on each prefill/decode engine and not finished there.",
        labels=["engine", "role"])
    backlog = GaugeMetricFamily(
        f"{PREFIX}_storage_nic_backlog_bytes",
        "Bytes queued or planned on each engine's (emulated) storage NIC.",
        labels=["engine"])
    nic_bytes = CounterMetricFamily(
        f"{PREFIX}_storage_nic_bytes",
        "Cold-tier bytes read through each engine's storage NIC.",
        labels=["engine"])
    for name, e in sorted(engines.items()):
      queued.add_metric([name, e["role"]], e["queued_turns"])
      backlog.add_metric([name], e["nic_backlog_bytes"])
      nic_bytes.add_metric([name], e["nic_bytes"])
    yield queued
    yield backlog
    yield nic_bytes
    yield CounterMetricFamily(f"{PREFIX}_kv_evicted_blocks",
                              "Cached blocks evicted to make room.",
                              value=s["evicted_blocks"])
    engine = s["engine"]
    yield CounterMetricFamily(f"{PREFIX}_preemptions",
                              "Sequences preempted for lack of KV blocks.",
                              value=engine["preemptions"])
    computed = CounterMetricFamily(
        f"{PREFIX}_computed_tokens", "Tokens run through the model, by phase.",
        labels=["phase"])
    computed.add_metric(["prefill"], engine["prefill_tokens"])
    computed.add_metric(["decode"], engine["decode_tokens"])
    yield computed


class ServerMetrics:
  """Request-level metrics, observed by the HTTP side when a request ends."""

  def __init__(self, snapshot: Callable[[], dict[str, Any]]):
    # No `*_created` series (as vLLM); this switch is process-wide.
    prometheus_client.disable_created_metrics()
    self.registry = prometheus_client.CollectorRegistry()
    self.registry.register(EngineCollector(snapshot))
    kw = {"registry": self.registry}
    self.requests = prometheus_client.Counter(
        f"{PREFIX}_requests", "Finished requests by endpoint and finish "
        "reason (stop, length, abort = client went away, error = the "
        "generation or another choice of its request failed).",
        ["endpoint", "finish_reason"], **kw)
    self.rejected = prometheus_client.Counter(
        f"{PREFIX}_rejected_requests", "Requests refused with an HTTP error.",
        ["status"], **kw)
    self.prompt_tokens = prometheus_client.Counter(
        f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", **kw)
    self.cached_tokens = prometheus_client.Counter(
        f"{PREFIX}_cached_prompt_tokens",
        "Prompt tokens of finished requests served from the prefix cache.",
        **kw)
    self.generation_tokens = prometheus_client.Counter(
        f"{PREFIX}_generation_tokens", "Tokens generated for finished "
        "requests.", **kw)
    self.ttft = prometheus_client.Histogram(
        f"{PREFIX}_time_to_first_token_seconds",
        "Arrival to first generated token.", buckets=TTFT_BUCKETS, **kw)
    self.tpot = prometheus_client.Histogram(
        f"{PREFIX}_time_per_output_token_seconds",
        "Mean time between generated tokens after the first, per request.",
        buckets=TPOT_BUCKETS, **kw)
    self.e2e = prometheus_client.Histogram(
        f"{PREFIX}_e2e_request_latency_seconds",
        "Arrival to last generated token.", buckets=E2E_BUCKETS, **kw)

  def observe_finished(self, endpoint: str, finish_reason: str, *,
                       prompt_tokens: int, cached_tokens: int,
                       generated_tokens: int, arrival_s: float,
                       first_token_s: float, finish_s: float) -> None:
    """Records one completed generation (engine clock seconds)."""
    self.requests.labels(endpoint, finish_reason).inc()
    self.prompt_tokens.inc(prompt_tokens)
    self.cached_tokens.inc(cached_tokens)
    self.generation_tokens.inc(generated_tokens)
    self.ttft.observe(max(0.0, first_token_s - arrival_s))
    self.e2e.observe(max(0.0, finish_s - arrival_s))
    if generated_tokens > 1:
      self.tpot.observe(
          max(0.0, (finish_s - first_token_s) / (generated_tokens - 1)))

  def render(self) -> bytes:
    return prometheus_client.generate_latest(self.registry)
