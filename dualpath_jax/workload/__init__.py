"""Agent workloads: the trace format, its loader, and synthetic generators."""

from dualpath_jax.workload.trace import (AgentSession, AgentTurn, TraceError,
                                         load_trace, save_trace)
from dualpath_jax.workload.synthetic import synthetic_agent_workload

__all__ = ["AgentSession", "AgentTurn", "TraceError", "load_trace",
           "save_trace", "synthetic_agent_workload"]
