"""Paged-attention kernels behind one API.

`paged_attention` dispatches on `implementation=` to the pure-jnp reference
(`"xla"`, always available) or to a Pallas kernel; `write_kv` scatters new
keys and values into the page pool. See `kernels/paged_attention.py`.
"""

from kernels.kv_write import write_kv
from kernels.paged_attention import IMPLEMENTATIONS, paged_attention
from kernels.paged_attention_ref import ref_paged_attention

__all__ = ["IMPLEMENTATIONS", "paged_attention", "ref_paged_attention",
           "write_kv"]
