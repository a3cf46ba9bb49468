r"""OpenAI-compatible HTTP server over the multi-turn engine.

    python -m launch.serve                              # embedded SmolLM2, 127.0.0.1:8000
    python -m launch.serve --port=8080 --num_blocks=4096 --max_context=8192
    python -m launch.serve --model=random:llama3-8b-shape:layers=2 --tokenizer=embedded
    python -m launch.serve --mesh=1P2D --cold_tier=/tmp/kv --policy=dualpath

Then point any OpenAI client at http://127.0.0.1:8000/v1 (see
docs/server.md). It binds to loopback unless `--host` says otherwise: the
server has no authentication. The address is bound before the model
loads, so a port in use or a host that does not resolve is refused at
once, and `--port=0` prints the port it got before the load.
"""

from __future__ import annotations

import socket
import sys

from absl import app, flags, logging

from dualpath_jax.interrupts import ctrl_c_ends_quietly
from dualpath_jax.utils import listen_socket
from launch import (cluster_flags, distributed_flags, engine_flags, float_flags,
                    key_flags)

FLAGS = flags.FLAGS
flags.DEFINE_string("host", "127.0.0.1", "address to bind (loopback by "
                    "default; the server has no authentication)")
flags.DEFINE_integer("port", 8000, "TCP port (0 = any free port)",
                     lower_bound=0, upper_bound=65535)
flags.DEFINE_string("model", None, "model source: None = embedded SmolLM2 "
                    "GGUF, a .gguf path, an Orbax dir from launch.convert, or "
                    "random:<preset>")
flags.DEFINE_string("tokenizer", None, "GGUF whose tokenizer to use when the "
                    "model has none (random weights); 'embedded' = SmolLM2's")
flags.DEFINE_list("served_model_name", None, "model id(s) clients must send; "
                  "default: the model config's name")
engine_flags.define(max_context_help="longest context of one request "
                    "(prompt + completion); reported as max_model_len")
float_flags.define_float("default_temperature", 1.0, "temperature of requests that "
                         "do not set one (OpenAI's default is 1.0)")
flags.DEFINE_bool("warmup", False, "compile every shape bucket up to "
                  "--max_context before serving (slow start, steady latency)")
flags.DEFINE_integer("seed", 0, "sampling seed of requests without `seed`", lower_bound=0)
flags.DEFINE_enum("log_level", "info",
                  ["critical", "error", "warning", "info", "debug", "trace"],
                  "uvicorn log level")
float_flags.define_float("max_request_mb", 32.0, "largest request body, MiB "
                         "(larger ones get 413 before they are read)",
                         lower_bound=0.001)
cluster_flags.define()  # --mesh=1P2D --cold_tier=DIR: serve on a P/D cluster


def _tokenizer(model_tokenizer):
  """`--tokenizer`'s tokenizer, or the model's own (`model_tokenizer`)."""
  from dualpath_jax.model import Tokenizer, gguf_loader
  if FLAGS.tokenizer is None:
    return model_tokenizer
  if FLAGS.tokenizer == "bytes":
    raise ValueError("--tokenizer=bytes (agent_eval's one-token-per-byte "
                     "stand-in for load tests) decodes no text, so it cannot "
                     "serve; give a GGUF path or 'embedded'")
  path = (gguf_loader.find_smollm2_gguf() if FLAGS.tokenizer == "embedded"
          else FLAGS.tokenizer)
  return Tokenizer.from_gguf(path)


def main(argv):
  del argv
  try:
    multi = distributed_flags.requested()
  except ValueError as e:
    sys.exit(f"serve: {e}")
  if multi:
    sys.exit("serve: the serving loop is single-controller; multi-process "
             "runs are not supported yet (the transfer layer is: see "
             "docs/pod_launch.md)")
  try:  # what needs only the flags, the config and the tokenizer: a bad
    # value must not cost JAX's import, let alone a model load
    config, model_tokenizer = engine_flags.describe_model(FLAGS.model)
    cache, engine_cfg = engine_flags.configs(FLAGS.seed)
    engine_flags.check_pool_holds(FLAGS.max_context)
    mesh = cluster_flags.mesh_config()
    cold = cluster_flags.cold_tier_config()
    tokenizer = _tokenizer(model_tokenizer)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"serve: {e}")
  if tokenizer is None:
    sys.exit("serve: the model has no tokenizer (random weights); pass "
             "--tokenizer=embedded or a GGUF path")
  if tokenizer.vocab_size > config.vocab_size:
    from dualpath_jax.config import MODEL_PRESETS
    fits = sorted(f"random:{name}" for name, c in MODEL_PRESETS.items()
                  if c.vocab_size >= tokenizer.vocab_size)
    sys.exit(f"serve: the tokenizer has {tokenizer.vocab_size} tokens but the "
             f"model only {config.vocab_size}, so its ids would not fit; "
             f"random models whose vocabulary holds it: {', '.join(fits)}")
  try:
    engine_flags.check_model_context(config)
    server_cfg = _server_config(config.name)
  except ValueError as e:
    sys.exit(f"serve: {e}")
  try:  # before the load: a port in use must not cost one
    listener = listen_socket(FLAGS.host, FLAGS.port)
  except ValueError as e:
    sys.exit(f"serve: {e}")
  try:  # Ctrl-C from here on, even just after the line below, ends quietly
    print(f"bound to {FLAGS.host}:{listener.getsockname()[1]}; loading the "
          "model ...", flush=True)
    _load_and_serve(listener, cache, engine_cfg, mesh, cold, tokenizer,
                    server_cfg)
  except KeyboardInterrupt:
    # Ctrl-C while loading, or while serving: uvicorn has then shut down
    # and re-raised it (through the signal, or from asyncio's runner).
    # Exit as Ctrl-C does, without a traceback.
    print("serve: stopped", file=sys.stderr)
    sys.exit(130)


def _server_config(model_name: str):
  """The server's settings of the flags (`--served_model_name`, default:
  the model's name; `--default_temperature`); ValueError for values it
  refuses. JAX-free, so that it runs before the load."""
  from dualpath_jax.server.app import ServerConfig
  if FLAGS.served_model_name is not None and not all(FLAGS.served_model_name):
    raise ValueError(f"--served_model_name: an empty name in "
                     f"{','.join(FLAGS.served_model_name)!r}")
  return ServerConfig(
      model_names=tuple(FLAGS.served_model_name or (model_name,)),
      default_temperature=FLAGS.default_temperature,
      max_request_bytes=max(1, int(FLAGS.max_request_mb * (1 << 20))))


def _load_and_serve(listener: socket.socket, cache, engine_cfg, mesh, cold,
                    tokenizer, server_cfg) -> None:
  """Loads the model, builds the engine and serves on `listener` (bound)."""
  from dualpath_jax.compile_cache import enable_compilation_cache
  enable_compilation_cache()
  import jax
  import uvicorn

  from dualpath_jax.server import LocalEngineHandle, create_app
  from dualpath_jax.server.background import AnsweringServer

  try:
    loaded = engine_flags.load_model(FLAGS.model)
    engine = cluster_flags.make(loaded, cache, engine_cfg, mesh, cold)
  except ValueError as e:
    sys.exit(f"serve: {e}")
  if FLAGS.warmup:
    print("compiling shape buckets ...", flush=True)
    engine.warmup()
    print(f"  {engine.stats.compiled_shapes} shapes in "
          f"{engine.stats.warmup_s:.1f} s", flush=True)
  logging.info("serving %s as %s on %s (%s), max_model_len %d",
               loaded.source, list(server_cfg.model_names),
               jax.devices()[0].device_kind, jax.default_backend(),
               FLAGS.max_context)
  application = create_app(LocalEngineHandle(engine), tokenizer, server_cfg)
  server = AnsweringServer(uvicorn.Config(
      application, host=FLAGS.host, port=FLAGS.port,
      log_level=FLAGS.log_level, timeout_graceful_shutdown=30))
  # uvicorn announces an address only when it binds the socket itself; the
  # line comes once it accepts connections (a client may connect at once).
  host = f"[{FLAGS.host}]" if ":" in FLAGS.host else FLAGS.host
  server.run_announcing(
      [listener], f"serving on http://{host}:{listener.getsockname()[1]}/v1 "
      "(Ctrl-C to stop)")


if __name__ == "__main__":
  key_flags.list_shared_flags_in_help()
  app.run(ctrl_c_ends_quietly(main, "serve"))
