"""Block index: block identity -> storage slot, in a SQLite database beside the store.

Why SQLite: it is in the standard library, its transactions are atomic and
durable across a crash (WAL journal, `synchronous=FULL`), and several processes
may open one database at once (readers never block; writers take turns). The
index is the only thing that makes a block visible, so the store's crash safety
reduces to the order "bytes durable, then index commit":

  1. `reserve`  (one transaction) allocates slots and inserts rows in state
     PENDING, owned by this process's writer lease. Readers never see them.
  2. the store writes the chunks and makes them durable: through TensorStore
     (which fsyncs), or on a local store with its own writer
     (`storage/chunk_writer.py`: one `syncfs` per batch, or an fsync per
     chunk), which returns only once every chunk of the batch is durable.
  3. `commit`   (one transaction) flips the rows to READY.

A row is deleted in the same two-step way: state DELETING (invisible), bytes
deleted, then the row and its slot are freed. A process that dies between the
steps leaves PENDING or DELETING rows owned by a lease that nobody holds any
more; `dead_owner_rows` finds them (a `flock` on the lease file succeeds only
when its owner is gone) and the store deletes their bytes and frees them.

A delete (`mark_deleting_where`) never takes a PENDING row from its writer,
who may still be writing into the slot: freeing the slot then would let the
late write land on the next block put there. It marks the row DOOMED
instead; `commit` leaves DOOMED rows alone and hands them back, and the
writer deletes its own bytes and frees the row (a dead writer's DOOMED rows
are recovered like its PENDING ones).

Every allocation bumps a generation counter stored with the row; a reader
re-checks (id, slot, generation) after its read (`touch`), so a slot that was
evicted and reused while it was being read is a miss, never someone else's
bytes served under this id.

Capacity is a number of slots. When all are used, `reserve` evicts the least
recently used READY blocks (their slots are reused at once). TensorStore
replaces a chunk atomically; the local writer rewrites it in place, so a
reader racing the rewrite may see a half-written chunk: it is served only if
its CRC32C checks and, after the read, this index still has the block at
that slot and generation (`touch`), so the race is a miss, never another
block's bytes (`storage/chunk_writer.py`, "Why in place is safe"). Admission rules (`always`, `second_put`,
`session_continues`) decide whether a put block is written at all.

Tables: `blocks` (id, slot, gen, state, owner, tenant, session, last_access,
hits), `refs` (which tenant/session put which block, for deletion),
`free_slots`, `seen` (ids put once, for `second_put`), `sessions` (puts per
session, for `session_continues`) and `meta` (layout, counters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from typing import Callable, Iterator, Sequence

PENDING, READY, DELETING, DOOMED = 0, 1, 2, 3

_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
  id BLOB PRIMARY KEY, slot INTEGER NOT NULL UNIQUE, gen INTEGER NOT NULL,
  state INTEGER NOT NULL, owner TEXT NOT NULL, tenant TEXT NOT NULL,
  session TEXT NOT NULL, last_access REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS blocks_lru ON blocks (state, last_access);
CREATE INDEX IF NOT EXISTS blocks_owner ON blocks (owner, state);
CREATE TABLE IF NOT EXISTS refs (
  id BLOB NOT NULL, tenant TEXT NOT NULL, session TEXT NOT NULL,
  PRIMARY KEY (tenant, session, id));
CREATE INDEX IF NOT EXISTS refs_id ON refs (id);
CREATE TABLE IF NOT EXISTS free_slots (slot INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS seen (id BLOB PRIMARY KEY, t REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
  tenant TEXT NOT NULL, session TEXT NOT NULL, puts INTEGER NOT NULL,
  PRIMARY KEY (tenant, session));
"""

# Statuses of a block in a put.
WRITE = "write"  # slot reserved: the caller writes the bytes, then commits
PRESENT = "present"  # already stored (READY)
IN_FLIGHT = "in_flight"  # another writer is storing it right now
DEFERRED = "deferred"  # refused by the admission rule this time
NO_SPACE = "no_space"  # every slot is held by an in-flight write


def damaged_error(path: str, err: sqlite3.DatabaseError) -> ValueError:
  """The error for an index file that SQLite cannot read (`path`)."""
  return ValueError(
      f"cold tier index {path} cannot be read ({err}): it is not a block "
      "index or it is damaged; move the directory aside and start a new "
      "one (its blocks cannot be found without their index)")


@dataclasses.dataclass(frozen=True)
class SlotRef:
  """Where one block lives: its identity, slot and the slot's generation."""

  block_id: bytes
  slot: int
  gen: int


@dataclasses.dataclass
class Reservation:
  """Outcome of `reserve`: one status per requested id, slots to write."""

  statuses: list[str]
  to_write: list[SlotRef]  # in request order, only ids with status WRITE
  evicted: int = 0


class BlockIndex:
  """The SQLite index of one store (thread-safe; one instance per process)."""

  def __init__(self, directory: str, layout: dict, num_slots: int,
               admission: str = "always", *,
               normalize: Callable[[dict], dict] | None = None):
    """Opens or creates the index in `directory`.

    Args:
      directory: local directory for `index.sqlite` and the `owners/` leases.
      layout: JSON-able description of the block layout; must equal the one
        the index was created with.
      num_slots: capacity in blocks.
      admission: "always", "second_put" or "session_continues".
      normalize: applied to the recorded layout before the comparison (the
        block store's: an older index's form of the same layout).
    """
    if num_slots <= 0:
      raise ValueError(f"num_slots must be positive, got {num_slots}")
    os.makedirs(os.path.join(directory, "owners"), exist_ok=True)
    self.directory = directory
    self.num_slots = int(num_slots)
    self.admission = admission
    self._lock = threading.Lock()
    self._closed = False
    path = os.path.join(directory, "index.sqlite")
    self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None,
                               check_same_thread=False)
    try:
      self._db.execute("PRAGMA journal_mode=WAL")
      self._db.execute("PRAGMA synchronous=FULL")
      for statement in _SCHEMA.strip().split(";"):
        if statement.strip():
          self._db.execute(statement)
    except sqlite3.DatabaseError as err:
      self._db.close()
      raise damaged_error(path, err) from None
    self.made_layout = False  # whether this open wrote the layout
    try:
      self._check_layout(layout, normalize)
    except sqlite3.DatabaseError as err:
      self._db.close()
      if isinstance(err, sqlite3.OperationalError):  # locked, disk full: not damage
        raise
      # A damaged page the schema statements did not read (the layout's).
      raise damaged_error(path, err) from None
    except BaseException:
      self._db.close()
      raise
    self.owner, self._lease_path, self._lease_fd = self._take_lease()

  def _take_lease(self) -> tuple[str, str, int]:
    """(owner, path, fd) of a new lease file, created and locked.

    Another process's `_remove_dead_leases` may find the file between its
    creation and the `flock` and unlink it as a dead writer's; a lease that
    is no longer the file at its path is dropped and taken again.
    """
    while True:
      owner = uuid.uuid4().hex
      path = os.path.join(self.directory, "owners", owner + ".lock")
      fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
          return owner, path, fd
      except (BlockingIOError, FileNotFoundError):
        pass  # a sweep holds it, or has unlinked it
      os.close(fd)

  # -- plumbing --------------------------------------------------------------

  @contextlib.contextmanager
  def _transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
    """A write transaction (BEGIN IMMEDIATE), serialized with other processes.

    `durable=False` commits without syncing the WAL (`synchronous=NORMAL`):
    still atomic, and never lost when only the process dies, but a power loss
    may roll it back. Only for rows whose loss is harmless (LRU times, hit
    counts); the next durable commit syncs it along with its own.
    """
    with self._lock:
      self._check_open()
      if not durable:
        self._db.execute("PRAGMA synchronous=NORMAL")
      try:
        self._db.execute("BEGIN IMMEDIATE")
        try:
          yield self._db
          self._db.execute("COMMIT")
        except BaseException:
          if self._db.in_transaction:  # a failed COMMIT may have ended it
            with contextlib.suppress(sqlite3.Error):
              self._db.execute("ROLLBACK")
          raise
      finally:
        if not durable:
          self._db.execute("PRAGMA synchronous=FULL")

  @contextlib.contextmanager
  def _read(self) -> Iterator[sqlite3.Connection]:
    with self._lock:
      self._check_open()
      yield self._db

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError(f"the cold tier index in {self.directory} is closed")

  def _check_layout(self, layout: dict,
                    normalize: Callable[[dict], dict] | None) -> None:
    text = json.dumps(layout, sort_keys=True)
    with self._transaction() as db:
      row = db.execute("SELECT value FROM meta WHERE key='layout'").fetchone()
      if row is None:
        self.made_layout = True
        db.execute("INSERT INTO meta VALUES ('layout', ?)", (text,))
        db.execute("INSERT INTO meta VALUES ('next_slot', '0')")
        db.execute("INSERT INTO meta VALUES ('gen', '0')")
      elif row[0] != text and not (normalize and _as_layout(row[0], normalize)
                                   == text):
        raise ValueError(
            f"cold tier index in {self.directory} was made for layout {row[0]}, "
            f"not {text}; use another directory or the same model/cache/codec")

  def forget_layout(self) -> bool:
    """Removes the layout this open wrote, so that the directory takes
    another, as a fresh one would; True if it did.

    For an open that fails after the index is made (the block array cannot
    be opened): its layout must not hold the directory. Only when this open
    wrote the layout, no block row exists and no other process holds a
    lease.
    """
    if not self.made_layout:
      return False
    owners_dir = os.path.join(self.directory, "owners")
    if any(self._lease_alive(name.removesuffix(".lock"))
           for name in os.listdir(owners_dir) if name != self.owner + ".lock"):
      return False
    with self._transaction() as db:
      if db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]:
        return False
      db.execute("DELETE FROM meta")
    self.made_layout = False
    return True

  @staticmethod
  def _counter(db: sqlite3.Connection, key: str) -> int:
    return int(db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

  @staticmethod
  def _set_counter(db: sqlite3.Connection, key: str, value: int) -> None:
    db.execute("UPDATE meta SET value=? WHERE key=?", (str(value), key))

  def close(self) -> None:
    """Closes the database and releases (and removes) this process's lease.
    A second call does nothing: the lease's descriptor number may belong to
    another file by then."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      self._db.close()
    try:
      os.unlink(self._lease_path)
    except FileNotFoundError:
      pass
    os.close(self._lease_fd)

  # -- writes ----------------------------------------------------------------

  def _admit(self, db: sqlite3.Connection, block_id: bytes, repeat_session: bool, now: float) -> bool:
    if self.admission == "always":
      return True
    if self.admission == "session_continues":
      return repeat_session
    seen = db.execute("SELECT 1 FROM seen WHERE id=?", (block_id,)).fetchone()
    if seen:
      db.execute("DELETE FROM seen WHERE id=?", (block_id,))
      return True
    db.execute("INSERT INTO seen VALUES (?, ?)", (block_id, now))
    return False

  def _prune_seen(self, db: sqlite3.Connection) -> None:
    limit = 4 * self.num_slots
    count = db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
    if count > limit:
      db.execute("DELETE FROM seen WHERE id IN (SELECT id FROM seen ORDER BY t LIMIT ?)",
                 (count - limit,))

  def _allocate(self, db: sqlite3.Connection, protect: set[bytes]) -> tuple[int | None, bool]:
    """A free slot (reusing an LRU victim's if needed) and whether it evicted."""
    row = db.execute("SELECT slot FROM free_slots LIMIT 1").fetchone()
    if row is not None:
      db.execute("DELETE FROM free_slots WHERE slot=?", row)
      return row[0], False
    next_slot = self._counter(db, "next_slot")
    if next_slot < self.num_slots:
      self._set_counter(db, "next_slot", next_slot + 1)
      return next_slot, False
    for victim_id, slot in db.execute(
        "SELECT id, slot FROM blocks WHERE state=? ORDER BY last_access LIMIT ?",
        (READY, len(protect) + 1)).fetchall():
      if victim_id in protect:
        continue
      db.execute("DELETE FROM blocks WHERE id=?", (victim_id,))
      db.execute("DELETE FROM refs WHERE id=?", (victim_id,))
      return slot, True
    return None, False

  def reserve(self, ids: Sequence[bytes], tenant: str, session: str,
              admitted: bool = False) -> Reservation:
    """Decides, in one transaction, what happens to each block of a put.

    `admitted`: the blocks passed an admission rule already (copied from
    another store, `storage.clone`): the rule is not asked again. The put
    still counts for its session (`session_continues`)."""
    now = time.time()
    statuses, to_write, evicted = [], [], 0
    with self._transaction() as db:
      row = db.execute("SELECT puts FROM sessions WHERE tenant=? AND session=?",
                       (tenant, session)).fetchone()
      repeat_session = row is not None and row[0] > 0
      db.execute(
          "INSERT INTO sessions VALUES (?, ?, 1) ON CONFLICT (tenant, session) "
          "DO UPDATE SET puts = puts + 1", (tenant, session))
      gen = self._counter(db, "gen")
      protect = set(ids)
      for block_id in ids:
        existing = db.execute("SELECT state FROM blocks WHERE id=?", (block_id,)).fetchone()
        if existing is not None:
          statuses.append(PRESENT if existing[0] == READY else IN_FLIGHT)
          if existing[0] in (READY, PENDING):  # this session's delete takes it too
            db.execute("INSERT OR IGNORE INTO refs VALUES (?, ?, ?)", (block_id, tenant, session))
          if existing[0] == READY:
            db.execute("UPDATE blocks SET last_access=? WHERE id=?", (now, block_id))
          continue
        if not admitted and not self._admit(db, block_id, repeat_session, now):
          statuses.append(DEFERRED)
          continue
        slot, was_evicted = self._allocate(db, protect)
        if slot is None:
          statuses.append(NO_SPACE)
          continue
        evicted += was_evicted
        gen += 1
        db.execute("INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                   (block_id, slot, gen, PENDING, self.owner, tenant, session, now))
        db.execute("INSERT OR IGNORE INTO refs VALUES (?, ?, ?)", (block_id, tenant, session))
        statuses.append(WRITE)
        to_write.append(SlotRef(block_id, slot, gen))
      self._set_counter(db, "gen", gen)
      if self.admission == "second_put":
        self._prune_seen(db)
    return Reservation(statuses, to_write, evicted)

  def commit(self, refs: Sequence[SlotRef]) -> tuple[list[SlotRef], list[SlotRef]]:
    """Makes written blocks visible (their bytes must already be durable).

    Returns (committed, doomed). Doomed rows were deleted while being
    written (`mark_deleting_where`): the caller deletes their bytes and
    `release`s them. Any other row is no longer this writer's (recovered
    as a dead writer's): its slot is not touched.
    """
    committed, doomed = [], []
    with self._transaction() as db:
      for r in refs:
        cur = db.execute(
            "UPDATE blocks SET state=? WHERE id=? AND gen=? AND owner=? AND state=?",
            (READY, r.block_id, r.gen, self.owner, PENDING))
        if cur.rowcount:
          committed.append(r)
        elif db.execute("SELECT 1 FROM blocks WHERE id=? AND gen=? AND owner=? AND state=?",
                        (r.block_id, r.gen, self.owner, DOOMED)).fetchone():
          doomed.append(r)
    return committed, doomed

  def release(self, refs: Sequence[SlotRef]) -> None:
    """Frees rows this process marked PENDING/DELETING whose bytes are gone."""
    with self._transaction() as db:
      for r in refs:
        cur = db.execute("DELETE FROM blocks WHERE id=? AND gen=? AND owner=? AND state!=?",
                         (r.block_id, r.gen, self.owner, READY))
        if cur.rowcount:
          db.execute("DELETE FROM refs WHERE id=?", (r.block_id,))
          db.execute("INSERT OR IGNORE INTO free_slots VALUES (?)", (r.slot,))

  def mark_deleting(self, refs: Sequence[SlotRef]) -> list[SlotRef]:
    """Hides READY blocks (e.g. found corrupt); returns those this call hid."""
    hidden = []
    with self._transaction() as db:
      for r in refs:
        cur = db.execute("UPDATE blocks SET state=?, owner=? WHERE id=? AND gen=? AND state=?",
                         (DELETING, self.owner, r.block_id, r.gen, READY))
        if cur.rowcount:
          hidden.append(r)
    return hidden

  def mark_deleting_where(self, tenant: str, session: str | None) -> list[SlotRef]:
    """Hides every block a tenant (or one of its sessions) put; returns them."""
    with self._transaction() as db:
      if session is None:
        ids = db.execute("SELECT DISTINCT id FROM refs WHERE tenant=?", (tenant,)).fetchall()
        db.execute("DELETE FROM sessions WHERE tenant=?", (tenant,))
      else:
        ids = db.execute("SELECT id FROM refs WHERE tenant=? AND session=?",
                         (tenant, session)).fetchall()
        db.execute("DELETE FROM sessions WHERE tenant=? AND session=?", (tenant, session))
      hidden = []
      for (block_id,) in ids:
        row = db.execute("SELECT slot, gen, state FROM blocks WHERE id=?", (block_id,)).fetchone()
        if row is None:
          continue
        if row[2] == PENDING:  # its writer deletes it (see the module docstring)
          db.execute("UPDATE blocks SET state=? WHERE id=?", (DOOMED, block_id))
        elif row[2] == READY:
          db.execute("UPDATE blocks SET state=?, owner=? WHERE id=?",
                     (DELETING, self.owner, block_id))
          hidden.append(SlotRef(block_id, row[0], row[1]))
        # DELETING or DOOMED: another delete has it already
    return hidden

  def dead_owner_rows(self) -> list[SlotRef]:
    """PENDING/DELETING rows of dead writers, taken over by this process."""
    with self._read() as db:
      owners = [o for (o,) in db.execute(
          "SELECT DISTINCT owner FROM blocks WHERE state!=?", (READY,)).fetchall()]
    dead = [o for o in owners if o != self.owner and not self._lease_alive(o)]
    taken = []
    for owner in dead:
      with self._transaction() as db:
        rows = db.execute("SELECT id, slot, gen FROM blocks WHERE owner=? AND state!=?",
                          (owner, READY)).fetchall()
        db.execute("UPDATE blocks SET owner=?, state=? WHERE owner=? AND state!=?",
                   (self.owner, DELETING, owner, READY))
      taken += [SlotRef(bytes(i), s, g) for i, s, g in rows]
    self._remove_dead_leases()
    return taken

  def _lease_alive(self, owner: str) -> bool:
    path = os.path.join(self.directory, "owners", owner + ".lock")
    try:
      fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
      return False
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
    finally:
      os.close(fd)
    return False

  def _remove_dead_leases(self) -> None:
    """Unlinks lease files nobody holds, each while holding its lock: a
    process that has just created its lease and not yet locked it locks it
    after the unlink, sees it gone and takes another (`_take_lease`)."""
    owners_dir = os.path.join(self.directory, "owners")
    for name in os.listdir(owners_dir):
      if name == self.owner + ".lock":
        continue
      path = os.path.join(owners_dir, name)
      try:
        fd = os.open(path, os.O_RDWR)
      except FileNotFoundError:
        continue
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        continue  # alive
      try:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
      finally:
        os.close(fd)

  # -- reads -----------------------------------------------------------------

  def lookup(self, ids: Sequence[bytes]) -> list[SlotRef | None]:
    """READY location of each id (None when absent or not yet committed)."""
    out = []
    with self._read() as db:
      for block_id in ids:
        row = db.execute("SELECT slot, gen FROM blocks WHERE id=? AND state=?",
                         (block_id, READY)).fetchone()
        out.append(None if row is None else SlotRef(block_id, row[0], row[1]))
    return out

  def touch(self, refs: Sequence[SlotRef]) -> list[bool]:
    """After a read: True where the block still sits there; bumps its LRU time.

    Not synced to disk (see `_transaction`): the check runs inside the
    transaction either way, and a lost LRU update after a power loss only
    ages a block a little. Syncing it cost every read batch a WAL fsync that
    queued behind the disk's data writes, under the index lock.
    """
    now = time.time()
    valid = []
    try:
      with self._transaction(durable=False) as db:
        for r in refs:
          cur = db.execute(
              "UPDATE blocks SET last_access=?, hits=hits+1 WHERE id=? AND slot=? AND gen=? "
              "AND state=?", (now, r.block_id, r.slot, r.gen, READY))
          valid.append(cur.rowcount == 1)
      return valid
    except sqlite3.OperationalError as err:  # e.g. the disk is full
      _log.warning("cold tier index %s: cannot record reads (%s); checking "
                   "them without", self.directory, err)
    with self._read() as db:  # the same check, read only
      return [db.execute(
          "SELECT 1 FROM blocks WHERE id=? AND slot=? AND gen=? AND state=?",
          (r.block_id, r.slot, r.gen, READY)).fetchone() is not None for r in refs]

  def contains(self, ids: Sequence[bytes]) -> list[bool]:
    return [r is not None for r in self.lookup(ids)]

  def session_ids(self, tenant: str, session: str) -> list[bytes]:
    """The ids of the blocks a session put (whatever their state)."""
    with self._read() as db:
      return [bytes(i) for (i,) in db.execute(
          "SELECT id FROM refs WHERE tenant=? AND session=?",
          (tenant, session)).fetchall()]

  def next_fresh_slot(self) -> int:
    """The slot a put takes once the free list is empty and before evicting."""
    with self._read() as db:
      return self._counter(db, "next_slot")

  def counts(self) -> dict[str, int]:
    """Blocks per state and free capacity."""
    with self._read() as db:
      by_state = dict(db.execute("SELECT state, COUNT(*) FROM blocks GROUP BY state").fetchall())
    return {"ready": by_state.get(READY, 0),
            "pending": by_state.get(PENDING, 0) + by_state.get(DOOMED, 0),
            "deleting": by_state.get(DELETING, 0), "slots": self.num_slots}

  def owners(self, ids: Sequence[bytes]) -> list[list[tuple[str, str]]]:
    """The (tenant, session) pairs that put each block (what deletes go by)."""
    with self._read() as db:
      return [[(t, s) for t, s in db.execute(
          "SELECT tenant, session FROM refs WHERE id=? ORDER BY tenant, session",
          (block_id,)).fetchall()] for block_id in ids]

  def all_ready(self) -> list[SlotRef]:
    """Every READY block (for tests and the crash checker)."""
    with self._read() as db:
      rows = db.execute("SELECT id, slot, gen FROM blocks WHERE state=?", (READY,)).fetchall()
    return [SlotRef(bytes(i), s, g) for i, s, g in rows]


def _as_layout(recorded: str, normalize: Callable[[dict], dict]) -> str | None:
  """`recorded` (an index's layout JSON) normalized and dumped as
  `_check_layout` dumps a layout; None if it is not a JSON object."""
  try:
    value = json.loads(recorded)
  except ValueError:
    return None
  if not isinstance(value, dict):
    return None
  return json.dumps(normalize(value), sort_keys=True)

