"""Reading a kernel's SASS without running it: its loops, its instruction
mix, and how many of its programs an SM holds.

`launch.kernel_sass` compiles the Pallas Triton kernels for Hopper on a
machine with no GPU and hands the disassembly (`nvdisasm -c`) and resource
usage (`cuobjdump --dump-resource-usage`) to the functions here. They are
plain text processing and arithmetic, tested on a stored excerpt
(tests/data/sass_loop_excerpt.txt), so that the numbers a report quotes do
not depend on a compiler being installed.

What the numbers mean: a decode kernel that reads its K/V at the copy
ceiling has to issue its instructions fast enough to keep up. The SM's four
schedulers issue at most one warp-instruction each per clock, so a loop
that needs `w` warp-instructions per KB of K/V cannot read faster than
`sms * 4 * clock / w` KB/s, and gets a fraction of that, smaller the fewer
warps each scheduler has to choose from (`occupancy`). A prefill kernel is
bound by its matmuls instead: what matters is how its issue time compares
with its tensor cores' (`HOPPER.tensor_flops_per_clock`).
"""

from __future__ import annotations

import collections
import dataclasses
import re

# An instruction line of `nvdisasm -c`: "/*0a30*/  @!P0 BRA `(.L_x_1) ;".
_INSTRUCTION = re.compile(
    r"^\s*/\*(?P<address>[0-9a-f]+)\*/\s+(?:@!?U?P[0-9T]+\s+)?"
    r"(?P<opcode>[A-Z][A-Z0-9_]*)(?P<rest>[^;]*);")
_LABEL = re.compile(r"^(?P<label>\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((?P<label>\.L_x_\d+)\)")


@dataclasses.dataclass(frozen=True)
class Instruction:
  address: int
  opcode: str  # without modifiers: "HMMA", not "HMMA.16816.F32.BF16"
  text: str


@dataclasses.dataclass(frozen=True)
class Loop:
  """A backward branch's body: from its label to the branch, inclusive."""

  label: str
  instructions: tuple[Instruction, ...]

  def mix(self) -> collections.Counter:
    """Instruction count per opcode."""
    return collections.Counter(i.opcode for i in self.instructions)


def parse(sass: str) -> tuple[list[Instruction], dict[str, int]]:
  """The instructions of one kernel's disassembly, and where each label
  stands (the index of the instruction after it)."""
  instructions: list[Instruction] = []
  labels: dict[str, int] = {}
  for line in sass.splitlines():
    label = _LABEL.match(line)
    if label:
      labels[label.group("label")] = len(instructions)
      continue
    m = _INSTRUCTION.match(line)
    if m:
      instructions.append(Instruction(int(m.group("address"), 16),
                                      m.group("opcode"), line.strip()))
  return instructions, labels


def loops(sass: str) -> list[Loop]:
  """Every loop of a disassembly (a branch back to a label before it),
  in address order. Nested loops each appear with their own body."""
  instructions, labels = parse(sass)
  found = []
  for index, ins in enumerate(instructions):
    if ins.opcode != "BRA":
      continue
    target = _BRANCH_TARGET.search(ins.text)
    if target is None or target.group("label") not in labels:
      continue
    start = labels[target.group("label")]
    if start <= index:
      found.append(Loop(target.group("label"),
                        tuple(instructions[start:index + 1])))
  return sorted(found, key=lambda lp: lp.instructions[0].address)


# Tensor-core instructions: Hopper's warpgroup `wgmma` (HGMMA) and the
# warp-level `mma.sync` of earlier GPUs (HMMA), which Hopper also runs.
TENSOR_OPS = ("HGMMA", "HMMA")


def matmul_loops(sass: str) -> list[Loop]:
  """The loops that run tensor-core instructions, in address order: a
  kernel's loops over K/V steps (the prefill kernel has two, unmasked
  and causal)."""
  return [lp for lp in loops(sass)
          if any(i.opcode in TENSOR_OPS for i in lp.instructions)]


def main_loop(sass: str) -> Loop:
  """The loop with the most instructions: a kernel's inner loop over its
  K/V steps. ValueError if the kernel has no loop."""
  found = loops(sass)
  if not found:
    raise ValueError("the disassembly has no loop (no backward branch)")
  return max(found, key=lambda lp: len(lp.instructions))


@dataclasses.dataclass(frozen=True)
class Resources:
  """A kernel's per-thread and per-program resources."""

  registers: int  # per thread
  static_shared: int  # bytes per program, besides the dynamic shared memory
  stack: int  # bytes per thread of stack frame: spilled registers
  local: int  # bytes per thread of other local memory

  @property
  def spilled(self) -> int:
    """Bytes per thread kept in (slow, off-chip) local memory."""
    return self.stack + self.local


def resources(resource_usage: str) -> Resources:
  """What `cuobjdump --dump-resource-usage` says of one kernel.
  ValueError if it names no register count."""
  def field(name):
    m = re.search(rf"\b{name}:(\d+)", resource_usage)
    return int(m.group(1)) if m else None
  regs = field("REG")
  if regs is None:
    raise ValueError("no REG: field in the resource usage")
  return Resources(regs, field("SHARED") or 0, field("STACK") or 0,
                   field("LOCAL") or 0)


@dataclasses.dataclass(frozen=True)
class SmLimits:
  """What one streaming multiprocessor holds and issues."""

  name: str
  sms: int
  clock_ghz: float  # the highest boost clock: the ceiling it gives is an
  #                   upper bound
  schedulers: int = 4  # warp-instructions issued per clock, at most
  tensor_flops_per_clock: int = 4096  # dense bf16/f16 matmul FLOPs
  registers: int = 65536
  register_unit: int = 8  # per-thread registers are allocated in 8s
  shared_bytes: int = 228 * 1024
  shared_reserved: int = 1024  # the driver's per-program reservation
  max_warps: int = 64
  max_programs: int = 32


# H100 SXM and H200: the same SM (sm_90), 132 of them, up to 1.98 GHz.
HOPPER = SmLimits(name="sm_90 (H100/H200 SXM)", sms=132, clock_ghz=1.98)


@dataclasses.dataclass(frozen=True)
class Occupancy:
  programs: int  # resident programs (CTAs) per SM
  warps: int  # resident warps per SM
  limited_by: str  # "registers", "shared memory", "warps" or "programs"


def occupancy(regs: int, shared: int, num_warps: int,
              sm: SmLimits = HOPPER) -> Occupancy:
  """How many programs of `num_warps` warps, `regs` registers a thread and
  `shared` bytes of shared memory one SM runs at once."""
  if regs < 1 or num_warps < 1 or shared < 0:
    raise ValueError(f"bad resources: regs={regs} warps={num_warps} "
                     f"shared={shared}")
  per_thread = -(-regs // sm.register_unit) * sm.register_unit
  by = {
      "registers": sm.registers // (per_thread * 32) // num_warps,
      "shared memory": sm.shared_bytes // (shared + sm.shared_reserved),
      "warps": sm.max_warps // num_warps,
      "programs": sm.max_programs,
  }
  limited_by = min(by, key=by.get)
  programs = by[limited_by]
  return Occupancy(programs, programs * num_warps, limited_by)


def issue_ceiling_tbps(warp_instructions_per_kb: float,
                       sm: SmLimits = HOPPER) -> float:
  """TB/s of K/V a loop could read if every scheduler of every SM issued
  one of its warp-instructions every clock at the top boost clock."""
  per_second = sm.sms * sm.schedulers * sm.clock_ghz * 1e9
  return per_second / warp_instructions_per_kb * 1024 / 1e12
