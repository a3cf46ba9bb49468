"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

`create_app(handle, tokenizer, ServerConfig(...))` builds the app; the
launcher is `python -m launch.serve`; docs/server.md describes the API.
"""

from dualpath_jax.server.app import ServerConfig, create_app
from dualpath_jax.server.background import BackgroundServer, serve_in_thread
from dualpath_jax.server.engine_loop import (EngineHandle, EngineLoop,
                                             LocalEngineHandle)

__all__ = ["BackgroundServer", "EngineHandle", "EngineLoop",
           "LocalEngineHandle", "ServerConfig", "create_app",
           "serve_in_thread"]
