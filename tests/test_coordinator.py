"""UnifiedCoordinator: pooled jobs, the fast path, stateful partitioning, SQL."""

from __future__ import annotations

import asyncio
import doctest
import os
import zlib

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sabot import AgentError, DataflowError, SchemaError, Stream, UnifiedCoordinator
from sabot.agents import coordinator as coordinator_module
from sabot.agents import jobs
from sabot.stream import operators as ops


@pytest.fixture(scope="module")
def flights() -> pa.Table:
    from sabot.datasets import load_flights

    return load_flights(limit=30_000)


def with_pid(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Tag each row with the pid of the process that ran the pipeline."""
    return batch.append_column("pid", pa.array([os.getpid()] * batch.num_rows, pa.int64()))


def delayed_flights(table: pa.Table) -> Stream:
    return (Stream.from_table(table, batch_size=4_096)
            .filter(lambda b: pc.greater(b["dep_delay"], 60))
            .with_columns(delay_hours=lambda b: pc.divide(b["dep_delay"], 60.0))
            .select("carrier", "flight", "origin", "dep_delay", "delay_hours"))


class KeyCounter(ops.Operator):
    """A stateful test operator: counts rows per ``_key`` and emits the counts on flush."""

    name = "key_counter"
    stateful = True

    def __init__(self):
        self.counts: dict = {}

    def process(self, batch):
        for key in batch.column(ops.KEY_COLUMN).to_pylist():
            self.counts[key] = self.counts.get(key, 0) + 1
        return []

    def flush(self):
        if not self.counts:
            return []
        keys = list(self.counts)
        return [pa.record_batch({
            "key": pa.array(keys),
            "rows": pa.array([self.counts[k] for k in keys], pa.int64()),
            "pid": pa.array([os.getpid()] * len(keys), pa.int64()),
        })]


class RowCounter(ops.Operator):
    """A stateful test operator without a key: counts every row it receives."""

    name = "row_counter"
    stateful = True

    def __init__(self):
        self.rows = 0

    def process(self, batch):
        self.rows += batch.num_rows
        return []

    def flush(self):
        return [pa.record_batch({"rows": pa.array([self.rows], pa.int64()),
                                 "pid": pa.array([os.getpid()], pa.int64())})]


# -- results ---------------------------------------------------------------------------

def test_docstring_example_runs():
    result = doctest.testmod(coordinator_module)
    assert result.attempted > 0
    assert result.failed == 0


async def test_pooled_result_equals_collect(flights):
    stream = delayed_flights(flights)
    async with UnifiedCoordinator(num_local_agents=2, small_job_rows=0) as coordinator:
        result = await coordinator.execute(stream)
    expected = stream.collect()
    assert result.schema == expected.schema
    assert result.num_rows == expected.num_rows
    assert result.equals(expected)


async def test_pooled_job_uses_every_agent_in_order(flights):
    table = flights.select(["year", "month", "day", "flight"])
    stream = Stream.from_table(table, batch_size=1_000).map(with_pid)
    async with UnifiedCoordinator(num_local_agents=2, small_job_rows=0) as coordinator:
        result = await coordinator.execute(stream)
        agents = set(coordinator.agent_pids)
    pids = result.column("pid").to_pylist()
    assert set(pids) == agents
    assert os.getpid() not in pids
    # Agent 0 got the first half of the rows and agent 1 the second, in order.
    changes = [i for i in range(1, len(pids)) if pids[i] != pids[i - 1]]
    assert changes == [len(pids) // 2]
    assert result.drop_columns(["pid"]).equals(table)


async def test_fast_path_equals_pooled_path(flights):
    table = flights.slice(0, 12_000)
    stream = delayed_flights(table)
    # The same job just below and at the threshold.
    async with UnifiedCoordinator(2, small_job_rows=table.num_rows + 1) as fast, \
            UnifiedCoordinator(2, small_job_rows=table.num_rows) as pooled:
        in_process = await fast.execute(stream)
        on_agents = await pooled.execute(stream)
        fast_pids = set((await fast.execute(stream.map(with_pid))).column("pid").to_pylist())
        pool_pids = set((await pooled.execute(stream.map(with_pid))).column("pid").to_pylist())
        pooled_agents = set(pooled.agent_pids)
    assert fast_pids == {os.getpid()}
    assert pool_pids
    assert pool_pids <= pooled_agents
    assert in_process.schema == on_agents.schema
    assert in_process.equals(on_agents)
    assert in_process.num_rows > 0


async def test_default_threshold_is_ten_thousand_rows():
    coordinator = UnifiedCoordinator(num_local_agents=1)
    assert coordinator.small_job_rows == 10_000
    table = pa.table({"n": pa.array(range(10_000), pa.int64())})
    async with coordinator:
        below = await coordinator.execute(Stream.from_table(table.slice(0, 9_999)).map(with_pid))
        at = await coordinator.execute(Stream.from_table(table).map(with_pid))
        agents = coordinator.agent_pids
    assert set(below.column("pid").to_pylist()) == {os.getpid()}
    assert set(at.column("pid").to_pylist()) == set(agents)


async def test_empty_result_keeps_schema(flights):
    stream = (Stream.from_table(flights.slice(0, 500))
              .filter(lambda b: pc.less(b["month"], 0))
              .select("carrier", "flight"))
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        result = await coordinator.execute(stream)
    expected = stream.collect()
    assert result.num_rows == 0
    assert result.schema == expected.schema
    assert result.schema.names == ["carrier", "flight"]


async def test_closure_defined_after_start():
    table = pa.table({"n": pa.array(range(1_000), pa.int64())})
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        for threshold in (10, 500, 990):
            stream = Stream.from_table(table).filter(
                lambda b, limit=threshold: pc.greater_equal(b["n"], limit))
            result = await coordinator.execute(stream)
            assert result.num_rows == 1_000 - threshold
            assert result.column("n")[0].as_py() == threshold


async def test_concurrent_jobs_all_correct():
    table = pa.table({"n": pa.array(range(2_000), pa.int64())})
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        streams = [Stream.from_table(table).with_columns(m=lambda b, k=k: pc.multiply(b["n"], k))
                   for k in range(12)]
        results = await asyncio.gather(*(coordinator.execute(s) for s in streams))
    for k, result in enumerate(results):
        assert result.column("m").to_pylist() == [n * k for n in range(2_000)]


async def test_agent_can_run_its_own_event_loop():
    def through_asyncio(batch):
        async def identity():
            return batch

        return asyncio.run(identity())

    table = pa.table({"n": pa.array(range(100), pa.int64())})
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        result = await coordinator.execute(Stream.from_table(table).map(through_asyncio))
    assert result.equals(table)


async def test_spawn_start_method_runs_jobs(flights):
    stream = delayed_flights(flights.slice(0, 5_000))
    async with UnifiedCoordinator(2, small_job_rows=0, start_method="spawn") as coordinator:
        result = await coordinator.execute(stream)
    assert result.equals(stream.collect())


# -- errors from user code -------------------------------------------------------------

@pytest.mark.parametrize("small_job_rows", [0, 1_000_000], ids=["pooled", "fast-path"])
async def test_user_error_keeps_its_type(small_job_rows):
    table = pa.table({"n": pa.array(range(100), pa.int64())})

    def divide(batch):
        return 1 // 0

    async with UnifiedCoordinator(2, small_job_rows=small_job_rows) as coordinator:
        agents = coordinator.agent_pids
        with pytest.raises(ZeroDivisionError):
            await coordinator.execute(Stream.from_table(table).map(divide))
        with pytest.raises(SchemaError, match="'missing' not found"):
            await coordinator.execute(Stream.from_table(table).select("missing"))
        # The same agents still run jobs afterwards.
        assert (await coordinator.execute(Stream.from_table(table))).equals(table)
        assert coordinator.agent_pids == agents
        assert coordinator.replacements == 0


async def test_agent_traceback_is_the_cause():
    table = pa.table({"n": pa.array(range(10), pa.int64())})

    def fail_in_agent(batch):
        raise ValueError("bad batch")

    async with UnifiedCoordinator(1, small_job_rows=0) as coordinator:
        with pytest.raises(ValueError, match="bad batch") as info:
            await coordinator.execute(Stream.from_table(table).map(fail_in_agent))
    assert "fail_in_agent" in str(info.value.__cause__)


# -- stateful operators ----------------------------------------------------------------

async def test_stateful_rows_of_a_key_meet(flights):
    stream = (Stream.from_table(flights, batch_size=2_048)
              .filter(lambda b: pc.is_valid(b["dep_delay"]))
              .key_by("tailnum")
              .then(KeyCounter))
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        result = await coordinator.execute(stream)
        agents = set(coordinator.agent_pids)
    expected = stream.collect()
    keys = result.column("key").to_pylist()
    # A key split between agents would appear once per agent.
    assert len(keys) == len(set(keys))
    expected_counts = dict(zip(expected.column("key").to_pylist(),
                               expected.column("rows").to_pylist(), strict=True))
    assert dict(zip(keys, result.column("rows").to_pylist(), strict=True)) == expected_counts
    assert set(result.column("pid").to_pylist()) == agents


async def test_window_aggregation_matches_collect(flights):
    from sabot import tumbling

    # Sorted by event time, so no record is late in either path.
    ordered = flights.sort_by("sched_dep")
    stream = (Stream.from_table(ordered, batch_size=4_096)
              .filter(lambda b: pc.is_valid(b["dep_delay"]))
              .key_by("origin")
              .window(tumbling(hours=6), time="sched_dep")
              .agg(flights=("flight", "count"), mean_delay=("dep_delay", "mean")))
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        result = await coordinator.execute(stream)
    expected = stream.collect()
    order = [("origin", "ascending"), ("window_start", "ascending")]
    assert result.schema == expected.schema
    assert result.num_rows == expected.num_rows
    assert result.sort_by(order).equals(expected.sort_by(order))


async def test_stateful_column_only_prefix_runs_locally():
    operators = [ops.Select(["a", "b"]), ops.KeyBy("a"), KeyCounter()]
    assert jobs.plan_stages(operators, "a") == [jobs.Stage(0, 2, jobs.LOCAL),
                                                 jobs.Stage(2, 3, jobs.BY_KEY)]
    table = pa.table({"a": [i % 37 for i in range(3_000)], "b": list(range(3_000))})
    stream = Stream.from_table(table).select("a", "b").key_by("a").then(KeyCounter)
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        result = await coordinator.execute(stream)
    counts = dict(zip(result.column("key").to_pylist(), result.column("rows").to_pylist(),
                      strict=True))
    assert counts == {k: len(range(k, 3_000, 37)) for k in range(37)}


async def test_stateful_without_key_runs_on_one_agent():
    operators = [ops.Filter(lambda b: b["n"]), RowCounter()]
    assert jobs.plan_stages(operators, None) == [jobs.Stage(0, 2, jobs.SINGLE)]
    table = pa.table({"n": pa.array(range(20_000), pa.int64())})
    stream = Stream.from_table(table, batch_size=1_000).then(RowCounter)
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        result = await coordinator.execute(stream)
        agents = coordinator.agent_pids
    assert result.column("rows").to_pylist() == [20_000]
    assert result.column("pid")[0].as_py() in agents


def test_rekeyed_stateful_operator_starts_a_stage():
    operators = [ops.Filter(lambda b: b["x"]), ops.KeyBy("a"), KeyCounter(),
                 ops.KeyBy("key"), KeyCounter()]
    assert jobs.plan_stages(operators, "key") == [
        jobs.Stage(0, 2, jobs.SPLIT), jobs.Stage(2, 4, jobs.BY_KEY),
        jobs.Stage(4, 5, jobs.BY_KEY)]


def test_split_by_key_keeps_order_and_keys_together():
    keys = [f"k{zlib.crc32(str(i).encode()) % 50}" for i in range(5_000)]
    table = pa.table({"_key": keys, "i": list(range(5_000))})
    parts = jobs.split_by_key(table, "_key", 3, min_rows=1)
    assert len(parts) == 3
    seen: dict[str, int] = {}
    for index, part in enumerate(parts):
        rows = part.column("i").to_pylist()
        assert rows == sorted(rows)
        for key in part.column("_key").to_pylist():
            assert seen.setdefault(key, index) == index
    assert sum(part.num_rows for part in parts) == 5_000


def test_split_contiguous_covers_every_row():
    batches = pa.table({"i": list(range(1_003))}).to_batches(max_chunksize=100)
    runs = jobs.split_contiguous(batches, 4, min_rows=1)
    assert [sum(b.num_rows for b in run) for run in runs] == [251, 251, 251, 250]
    flat = [value for run in runs for batch in run for value in batch.column("i").to_pylist()]
    assert flat == list(range(1_003))
    assert jobs.split_contiguous(batches[:1], 200, min_rows=1)[0][0].num_rows == 1
    # Fewer rows than min_rows per part make fewer parts.
    assert len(jobs.split_contiguous(batches, 4, min_rows=400)) == 2
    assert len(jobs.split_contiguous(batches, 4)) == 1


# -- agent deaths ----------------------------------------------------------------------

def kill_self(batch):
    os.kill(os.getpid(), 9)


def crash_self(batch):
    import ctypes
    import faulthandler

    faulthandler.disable()  # pytest's handler would print every thread's stack
    ctypes.string_at(0)  # reads address 0: SIGSEGV


async def wait_for(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met within the timeout")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fn,signal_name", [(kill_self, "SIGKILL"), (crash_self, "SIGSEGV")])
async def test_agent_death_names_agent_and_signal(fn, signal_name):
    table = pa.table({"n": pa.array(range(10), pa.int64())})
    async with UnifiedCoordinator(1, small_job_rows=0) as coordinator:
        (before,) = coordinator.agent_pids
        with pytest.raises(AgentError) as info:
            await coordinator.execute(Stream.from_table(table).map(fn))
        message = str(info.value)
        assert f"agent 0 (pid {before})" in message
        assert signal_name in message
        assert "retriable=True" in message
        # The pool keeps working on a replacement agent.
        assert (await coordinator.execute(Stream.from_table(table))).equals(table)
        assert coordinator.agent_pids != [before]
        assert coordinator.replacements == 1


async def test_retriable_job_runs_again_once(tmp_path):
    marker = str(tmp_path / "died-once")
    table = pa.table({"n": pa.array(range(100), pa.int64())})

    def die_first_time(batch):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), 9)
        return batch

    async with UnifiedCoordinator(1, small_job_rows=0) as coordinator:
        result = await coordinator.execute(Stream.from_table(table).map(die_first_time),
                                           retriable=True)
        assert result.equals(table)
        with pytest.raises(AgentError, match="retried once already"):
            await coordinator.execute(Stream.from_table(table).map(kill_self), retriable=True)
        await wait_for(lambda: coordinator.replacements == 3)
        assert (await coordinator.execute(Stream.from_table(table))).equals(table)


async def test_idle_agent_killed_is_replaced():
    table = pa.table({"n": pa.array(range(20_000), pa.int64())})
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        victim, survivor = coordinator.agent_pids
        os.kill(victim, 9)
        await wait_for(lambda: victim not in coordinator.agent_pids
                       and len(coordinator.agent_pids) == 2)
        assert survivor in coordinator.agent_pids
        result = await coordinator.execute(Stream.from_table(table).map(with_pid))
        assert set(result.column("pid").to_pylist()) == set(coordinator.agent_pids)


async def test_fork_server_killed_pool_recovers():
    table = pa.table({"n": pa.array(range(1_000), pa.int64())})
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        before = set(coordinator.agent_pids)
        os.kill(coordinator._pool._server_pid, 9)
        await wait_for(lambda: len(coordinator.agent_pids) == 2
                       and not set(coordinator.agent_pids) & before)
        assert (await coordinator.execute(Stream.from_table(table))).equals(table)
    for pid in before:
        assert not process_alive(pid)


# -- lifecycle -------------------------------------------------------------------------

def child_pids() -> set[int]:
    pids: set[int] = set()
    for thread in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{thread}/children") as file:
            pids.update(int(pid) for pid in file.read().split())
    return pids


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting to be reaped counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


async def test_shutdown_leaves_no_process():
    before = child_pids()
    async with UnifiedCoordinator(2) as coordinator:
        agents = coordinator.agent_pids
        server = coordinator._pool._server_pid
        assert server in child_pids()
        assert all(process_alive(pid) for pid in agents)
    assert child_pids() == before
    assert not any(process_alive(pid) for pid in [*agents, server])


async def test_shutdown_when_body_raises():
    agents: list[int] = []
    with pytest.raises(RuntimeError, match="user code failed"):
        async with UnifiedCoordinator(2) as coordinator:
            agents.extend(coordinator.agent_pids)
            raise RuntimeError("user code failed")
    assert len(agents) == 2
    assert not any(process_alive(pid) for pid in agents)


async def test_shutdown_when_caller_cancelled(tmp_path):
    started = tmp_path / "started"
    table = pa.table({"n": pa.array(range(100), pa.int64())})
    agents: list[int] = []
    before = child_pids()

    def slow(batch):
        started.touch()
        import time

        time.sleep(60)
        return batch

    async def caller():
        async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
            agents.extend(coordinator.agent_pids)
            await coordinator.execute(Stream.from_table(table).map(slow))

    task = asyncio.create_task(caller())
    await wait_for(started.exists)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert child_pids() == before
    assert not any(process_alive(pid) for pid in agents)


async def test_cancelled_job_frees_its_agent(tmp_path):
    started = tmp_path / "started"
    table = pa.table({"n": pa.array(range(100), pa.int64())})

    def slow(batch):
        started.touch()
        import time

        time.sleep(600)
        return batch

    async with UnifiedCoordinator(1, small_job_rows=0) as coordinator:
        (busy,) = coordinator.agent_pids
        job = asyncio.create_task(coordinator.execute(Stream.from_table(table).map(slow)))
        await wait_for(started.exists)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        # With one agent, this job can run only on the replacement.
        assert (await coordinator.execute(Stream.from_table(table))).equals(table)
        assert coordinator.agent_pids != [busy]
    assert not process_alive(busy)


async def test_jobs_fail_when_coordinator_not_running():
    table = pa.table({"n": [1]})
    coordinator = UnifiedCoordinator(1)
    with pytest.raises(AgentError, match="await start"):
        await coordinator.execute(Stream.from_table(table))
    async with coordinator:
        with pytest.raises(AgentError, match="already running"):
            await coordinator.start()
    with pytest.raises(AgentError, match="stopped"):
        await coordinator.execute_sql("SELECT 1")
    await coordinator.shutdown()  # a second shutdown does nothing


@pytest.mark.parametrize("kwargs", [{"num_local_agents": 0}, {"num_local_agents": "2"},
                                    {"small_job_rows": -1}, {"start_method": "thread"}])
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        UnifiedCoordinator(**kwargs)


async def test_execute_rejects_unbounded_and_non_streams():
    async with UnifiedCoordinator(1) as coordinator:
        with pytest.raises(TypeError, match="sabot Stream"):
            await coordinator.execute(pa.table({"n": [1]}))
        with pytest.raises(ValueError, match="no source"):
            await coordinator.execute(Stream().select("n"))


# -- SQL ---------------------------------------------------------------------------------

async def test_execute_sql_group_by(flights):
    query = ("SELECT carrier, avg(dep_delay) AS mean_delay, count(*) AS n "
             "FROM flights GROUP BY carrier ORDER BY carrier")
    async with UnifiedCoordinator(2) as coordinator:
        result = await coordinator.execute_sql(query, tables={"flights": flights})
    expected = (flights.group_by("carrier")
                .aggregate([("dep_delay", "mean"), ([], "count_all")])
                .sort_by("carrier"))
    assert result.column("carrier").to_pylist() == expected.column("carrier").to_pylist()
    assert result.column("n").to_pylist() == expected.column("count_all").to_pylist()
    for got, want in zip(result.column("mean_delay").to_pylist(),
                         expected.column("dep_delay_mean").to_pylist(), strict=True):
        assert got == pytest.approx(want)


async def test_execute_sql_leaves_event_loop_free():
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    numbers = pa.table({"n": pa.array(range(4_000), pa.int64())})
    async with UnifiedCoordinator(1) as coordinator:
        task = asyncio.create_task(ticker())
        result = await coordinator.execute_sql(
            "SELECT count(*) AS c FROM numbers a, numbers b WHERE (a.n * b.n) % 7 = 1",
            tables={"numbers": numbers})
        done.set()
        await task
    assert result.column("c")[0].as_py() > 0
    # With the query on the event loop's thread, the ticker could not run.
    assert ticks > 10


async def test_execute_sql_error_names_query():
    async with UnifiedCoordinator(1) as coordinator:
        with pytest.raises(DataflowError, match="no_such_table"):
            await coordinator.execute_sql("SELECT * FROM no_such_table")
        # Python variables are not visible as tables.
        visible = pa.table({"n": [1]})  # noqa: F841
        with pytest.raises(DataflowError, match="visible"):
            await coordinator.execute_sql("SELECT * FROM visible")


async def test_execute_sql_cancel_interrupts_query():
    numbers = pa.table({"n": pa.array(range(100_000), pa.int64())})
    # One agent means one SQL thread: the second query can only run once the
    # first, which would take hours, has been interrupted.
    async with UnifiedCoordinator(1) as coordinator:
        endless = asyncio.create_task(coordinator.execute_sql(
            "SELECT count(*) FROM numbers a, numbers b, numbers c "
            "WHERE a.n + b.n + c.n = -1", tables={"numbers": numbers}))
        await asyncio.sleep(0.2)  # let the query start on its thread
        endless.cancel()
        with pytest.raises(asyncio.CancelledError):
            await endless
        result = await coordinator.execute_sql("SELECT 42 AS answer")
    assert result.column("answer").to_pylist() == [42]
