"""``UnifiedCoordinator``: bounded jobs on a warm pool of local agent processes.

>>> import asyncio, pyarrow as pa
>>> from sabot import Stream, UnifiedCoordinator
>>> async def main():
...     async with UnifiedCoordinator(num_local_agents=2) as coordinator:
...         table = pa.table({"id": [1, 2, 3]})
...         return await coordinator.execute(Stream.from_table(table).select("id"))
>>> asyncio.run(main()).column("id").to_pylist()
[1, 2, 3]
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from sabot.agents import jobs, protocol
from sabot.agents.pool import AgentPool, Task
from sabot.errors import AgentError, ConfigError, DataflowError, require
from sabot.stream.core import Stream

logger = logging.getLogger(__name__)

NEW, RUNNING, STOPPED = "new", "running", "stopped"

_job_ids = itertools.count(1)


class UnifiedCoordinator:
    """Run bounded Stream jobs and SQL queries on agent processes started once.

    :param num_local_agents: agent processes to keep running; default
        ``os.cpu_count()``.
    :param small_job_rows: a job whose input has fewer rows runs in the
        calling process, without IPC; default 10,000. 0 sends every job to
        the agents.
    :param start_method: ``"fork"`` (default) forks the fork server from
        this process, so agents start in milliseconds with every module
        already imported. ``"spawn"`` starts it as a new interpreter, about
        0.2 s slower, sharing nothing with this process.

    ``start()`` starts the agents, ``shutdown()`` stops them; ``async with``
    does both. Agents are forked when ``start()`` runs, so start the
    coordinator before creating threads of your own. An agent that dies is
    replaced, and the job it was running fails with AgentError naming the
    agent and the signal, unless the job is retriable.
    """

    def __init__(self, num_local_agents: int | None = None, small_job_rows: int = 10_000,
                 start_method: str = "fork"):
        if num_local_agents is None:
            num_local_agents = os.cpu_count() or 1
        if isinstance(num_local_agents, bool) or not isinstance(num_local_agents, int) \
                or num_local_agents < 1:
            raise ConfigError(f"num_local_agents must be an integer of at least 1, "
                              f"got {num_local_agents!r}")
        if isinstance(small_job_rows, bool) or not isinstance(small_job_rows, int) \
                or small_job_rows < 0:
            raise ConfigError(f"small_job_rows must be an integer of at least 0, "
                              f"got {small_job_rows!r}")
        self.num_local_agents = num_local_agents
        self.small_job_rows = small_job_rows
        self._pool = AgentPool(num_local_agents, start_method)
        self._state = NEW
        self._sql_executor: ThreadPoolExecutor | None = None
        self._sql_connection: Any = None
        self._sql_lock = threading.Lock()
        self._sql_cursors: set[Any] = set()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the agent processes and return when every one is ready. Called once."""
        if self._state != NEW:
            raise AgentError(f"this coordinator is already {self._state}; a coordinator "
                             f"starts once, so create a new one")
        # The agents are forked with these modules loaded, so that no job
        # pays for importing them.
        import cloudpickle  # noqa: F401

        import sabot.agents.agent  # noqa: F401

        self._state = RUNNING
        try:
            await self._pool.start()
        except BaseException:
            self._state = STOPPED
            raise

    async def shutdown(self) -> None:
        """Stop every agent and wait for the processes to exit. Safe to call twice.

        Jobs still running or queued fail with AgentError. No child process
        is left behind, also when this coroutine is cancelled.
        """
        if self._state == STOPPED:
            return
        self._state = STOPPED
        try:
            await self._pool.shutdown()
        finally:
            self._pool.kill()
            self._close_sql()

    async def __aenter__(self) -> UnifiedCoordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.shutdown()

    @property
    def agent_pids(self) -> list[int]:
        """Process ids of the running agents, in agent index order."""
        return self._pool.pids

    @property
    def replacements(self) -> int:
        """Number of agents started to replace agents that died."""
        return self._pool.replacements

    def _require_running(self) -> None:
        if self._state != RUNNING:
            raise AgentError(
                f"this coordinator is {self._state}; use 'async with "
                f"UnifiedCoordinator(...) as coordinator', or await start() before "
                f"running jobs"
            )

    # -- Stream jobs ------------------------------------------------------------------

    async def execute(self, stream: Stream, *, retriable: bool = False) -> pa.Table:
        """Run a bounded Stream and return its output rows as one table.

        A job with fewer than ``small_job_rows`` input rows runs here, in
        this process. A larger one is split into at most one partition per
        agent, of at least ``jobs.MIN_ROWS_PER_PARTITION`` rows each, and the
        outputs are concatenated in input order. Stateful operators get
        every row of a key on one agent. Either way the result has the same
        rows, order and schema as ``stream.collect()``, with two exceptions
        for keyed stateful jobs: rows of different keys can come in another
        order, and event-time windows can drop fewer late records (see
        :mod:`sabot.agents.jobs`). An exception that the pipeline raises
        reaches the caller with its type intact.

        ``retriable=True`` runs a partition again, once, on another agent if
        the agent running it dies. Leave it False for pipelines with side
        effects. Cancelling the caller kills the agents running the job.
        """
        if not isinstance(stream, Stream):
            raise TypeError(f"execute() needs a sabot Stream, got {type(stream).__name__}; "
                            f"use execute_sql() for SQL")
        self._require_running()
        batches = jobs.materialize(stream)
        rows = sum(batch.num_rows for batch in batches)
        if rows < self.small_job_rows:
            return Stream(source=batches, steps=stream._steps, key=stream.key).collect()
        if not batches:
            return pa.table({})
        return await self._execute_pooled(stream, batches, rows, retriable)

    async def _execute_pooled(self, stream: Stream, batches: list[pa.RecordBatch], rows: int,
                              retriable: bool) -> pa.Table:
        job_id = next(_job_ids)
        steps = stream._steps
        operators = [factory() for factory in steps]
        stages = jobs.plan_stages(operators, stream.key)
        logger.debug("job %d: %d rows in %d batches, stages %s", job_id, rows, len(batches),
                     [(s.start, s.end, s.partitioning) for s in stages])
        jobs.check_same_schema(batches)
        result: pa.Table | None = None
        for stage in stages:
            stage_steps = steps[stage.start:stage.end]
            if stage.partitioning == jobs.LOCAL:
                result = Stream(source=batches, steps=stage_steps).collect()
            else:
                parts = self._partition(stage, batches, stream.key)
                pickled = _pickle_steps(operators[stage.start:stage.end], stage_steps)
                tables = await self._run_tasks(job_id, pickled, parts, retriable)
                result = jobs.combine(tables)
            batches = _to_batches(result)
        return result

    def _partition(self, stage: jobs.Stage, batches: list[pa.RecordBatch],
                   stream_key: str | None) -> list[list[pa.RecordBatch]]:
        agents = self.num_local_agents
        if stage.partitioning == jobs.SPLIT:
            return jobs.split_contiguous(batches, agents)
        if stage.partitioning == jobs.BY_KEY and batches:
            column = jobs.find_key_column(batches[0].schema, stream_key)
            if column is not None:
                table = pa.Table.from_batches(batches)
                return [part.to_batches() or [batches[0].slice(0, 0)]
                        for part in jobs.split_by_key(table, column, agents)]
        return [batches]

    async def _run_tasks(self, job_id: int, steps: bytes,
                         parts: list[list[pa.RecordBatch]], retriable: bool) -> list[pa.Table]:
        loop = asyncio.get_running_loop()
        tasks = []
        for index, part in enumerate(parts):
            if not part:
                continue
            payload = protocol.encode_batches(part[0].schema, part)
            tasks.append(Task(job_id, index, steps, payload, retriable, loop.create_future()))
        if not tasks:
            return [pa.table({})]
        for task in tasks:
            self._pool.submit(task)
        try:
            bodies = await asyncio.gather(*(task.future for task in tasks))
        except asyncio.CancelledError:
            self._pool.cancel(tasks, kill_running=True)
            raise
        except BaseException:
            # Partitions already running finish and their results are dropped.
            self._pool.cancel(tasks, kill_running=False)
            raise
        return [protocol.decode_table(body) for body in bodies]

    # -- SQL --------------------------------------------------------------------------

    async def execute_sql(self, query: str,
                          tables: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a DuckDB SQL query over Arrow tables in a worker thread; return a table.

        ``tables`` maps the names used in the query to pyarrow Tables,
        RecordBatches or RecordBatchReaders (or anything else DuckDB can
        register). The query runs on a thread, and DuckDB releases the GIL
        while it works, so the event loop keeps serving other tasks.
        Cancelling the caller interrupts the query. DuckDB is imported on
        the first call. Raises DataflowError when the query fails.
        """
        self._require_running()
        if not isinstance(query, str) or not query.strip():
            raise ConfigError(f"execute_sql() needs a non-empty SQL string, got {query!r}")
        tables = dict(tables or {})
        for name in tables:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"table names must be non-empty strings, got {name!r}")
        if self._sql_executor is None:
            self._sql_executor = ThreadPoolExecutor(
                max_workers=self.num_local_agents, thread_name_prefix="sabot-sql")
        call = _SqlCall()
        done = self._sql_executor.submit(self._run_sql, query, tables, call)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            call.cancelled = True
            _interrupt_until_done(asyncio.get_running_loop(), done, call)
            raise

    def _run_sql(self, query: str, tables: dict[str, Any], call: _SqlCall) -> pa.Table:
        """Run one query on its own DuckDB cursor; called on an executor thread."""
        duckdb = require("duckdb", "sql")
        with self._sql_lock:
            if self._sql_connection is None:
                self._sql_connection = duckdb.connect(":memory:")
            cursor = self._sql_connection.cursor()
            self._sql_cursors.add(cursor)
        call.cursor = cursor
        try:
            if call.cancelled:
                raise DataflowError("SQL query cancelled before it started")
            # Without this, DuckDB would also resolve table names against
            # Python variables in the calling frames.
            cursor.execute("SET python_enable_replacements = false")
            for name, table in tables.items():
                cursor.register(name, table)
            relation = cursor.sql(query)
            if relation is None:  # a statement without a result, such as CREATE
                return pa.table({})
            to_arrow = getattr(relation, "to_arrow_table", None) or relation.arrow
            return to_arrow()
        except duckdb.Error as exc:
            excerpt = query if len(query) <= 200 else query[:200] + "..."
            raise DataflowError(f"SQL query failed: {exc}\nquery: {excerpt}") from exc
        finally:
            with self._sql_lock:
                self._sql_cursors.discard(cursor)
            cursor.close()

    def _close_sql(self) -> None:
        with self._sql_lock:
            for cursor in self._sql_cursors:
                cursor.interrupt()
            busy = bool(self._sql_cursors)
        if self._sql_executor is not None:
            self._sql_executor.shutdown(wait=False, cancel_futures=True)
            self._sql_executor = None
        if self._sql_connection is not None and not busy:
            self._sql_connection.close()
            self._sql_connection = None

    def __repr__(self) -> str:
        return (f"<UnifiedCoordinator {self._state} agents={self.num_local_agents} "
                f"small_job_rows={self.small_job_rows}>")


def _to_batches(table: pa.Table) -> list[pa.RecordBatch]:
    """Return a stage's output as the next stage's input; an empty batch keeps the schema."""
    batches = table.to_batches()
    if batches or table.num_columns == 0:
        return batches
    return [pa.RecordBatch.from_pylist([], schema=table.schema)]


def _pickle_steps(operators: list, factories: tuple) -> bytes:
    """Pickle a stage's fresh operators, or its factories if an operator will not pickle.

    Pickling the operators is about four times faster: each factory is a
    closure that cloudpickle serialises by value, scanning sys.modules for
    every module it refers to.
    """
    import cloudpickle

    try:
        return cloudpickle.dumps((protocol.OPERATORS, operators))
    except Exception as exc:  # noqa: BLE001 - any operator state may refuse pickling
        logger.debug("operators do not pickle (%s: %s); sending their factories",
                     type(exc).__name__, exc)
        return cloudpickle.dumps((protocol.FACTORIES, factories))


class _SqlCall:
    """Cancellation state of one query on an executor thread: its cursor, once
    created, and whether the caller cancelled."""

    def __init__(self):
        self.cursor: Any = None
        self.cancelled = False


def _interrupt_until_done(loop: asyncio.AbstractEventLoop, done: Future, call: _SqlCall,
                          interval: float = 0.05) -> None:
    """Interrupt a cancelled query until its thread returns.

    DuckDB (checked with 2.0.1) ignores an interrupt that arrives before the
    query has begun, so a single call can be lost. Repeating it every
    ``interval`` seconds reaches the query whenever it starts.
    """
    if done.done():
        return
    if call.cursor is not None:
        call.cursor.interrupt()
    loop.call_later(interval, _interrupt_until_done, loop, done, call, interval)
