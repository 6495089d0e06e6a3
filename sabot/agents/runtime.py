"""The worker: consume, decode, run the operators, send, commit.

One worker is one consumer-group member. It has one consumer subscribed to
the source topics of every dataflow of the app and one shared producer.
Each fetch is processed under a lock:

    fetch ──> per partition: decode ──> each dataflow's pipeline ──> sink
                                 └──> dead-letter topic (bad values)
          ──> await every send's acknowledgement ──> commit offsets

Without stateful dataflows, the last step of fetch N runs as a task while
fetch N+1 is processed. Fetch N+1 waits for that task before starting its
own last step, so commits stay in order and at most one fetch is
unacknowledged.

The fetch is the consumer's ``getmany`` (``fetcher="aiokafka"``) or the
:class:`~sabot.kafka.fetch.ArrowFetcher` (``fetcher="arrow"``), which reads
record batches into Arrow columns while the consumer keeps the group.

The rebalance listener takes the same lock before partitions are revoked,
so a revoked partition's in-flight batch is sent and committed first.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, KafkaError

from sabot import ext
from sabot.agents.records import build_batch
from sabot.agents.sink import TopicSink
from sabot.codecs import JsonCodec
from sabot.errors import DataflowError, SabotError
from sabot.kafka.admin import ensure_topics
from sabot.kafka.fetch import ArrowFetcher
from sabot.state.manager import StateManager
from sabot.stream.core import Pipeline

logger = logging.getLogger(__name__)


def format_tp(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


@dataclass
class Stats:
    """Counters of one worker, updated after every committed fetch."""

    consumed: int = 0
    produced: int = 0
    dead_letters: int = 0
    #: Records of windowed dataflows that arrived after their windows closed.
    late: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    #: time.monotonic() of the first non-empty fetch and of the last commit.
    first_fetch: float | None = None
    last_commit: float | None = None
    lag: int = 0


class DataflowAgent:
    """Runs one dataflow: a pipeline per assigned source partition, and its sink."""

    def __init__(self, flow, sink: TopicSink | None):
        self.flow = flow
        self.stream = flow.build()
        self.sink = sink
        self.pipelines: dict[TopicPartition, Pipeline] = {}

    def pipeline(self, tp: TopicPartition) -> Pipeline:
        pipeline = self.pipelines.get(tp)
        if pipeline is None:
            pipeline = self.pipelines[tp] = self.stream.compile()
        return pipeline

    async def emit(self, batches) -> list[asyncio.Future]:
        futures: list[asyncio.Future] = []
        sink = self.flow.sink
        if sink is None:
            return futures
        for batch in batches:
            if self.sink is not None:
                futures.extend(await self.sink.send(batch))
            else:
                result = sink(batch)
                if inspect.isawaitable(result):
                    await result
        return futures


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, worker: Worker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        # Wait for the fetch in flight to be sent and committed.
        async with self.worker.lock:
            try:
                await self.worker._drain()
            except Exception as exc:
                self.worker.failure = self.worker.failure or exc
                self.worker._stopping = True
                logger.exception("sends or commit before the rebalance failed; stopping")
            for agent in self.worker.agents:
                for tp in revoked:
                    agent.pipelines.pop(tp, None)
            self.worker.state.revoke(revoked)
            if self.worker.fetcher is not None:
                self.worker.fetcher.revoke(revoked)
        if revoked:
            logger.info("partitions revoked: %s", _tps(revoked))

    async def on_partitions_assigned(self, assigned):
        logger.info("partitions assigned: %s", _tps(assigned) or "none")
        fetcher = self.worker.fetcher
        if fetcher is not None:
            # The consumer's own fetcher stays idle, and the Arrow fetcher reads them.
            self.worker.consumer.pause(*assigned)
            fetcher.assign(assigned)
        self.worker.assigned.set()


def isolate_failures(process, batch: pa.RecordBatch):
    """Run ``process`` over halves of ``batch`` until each failing row is isolated.

    ``process`` already raised on the whole batch. Returns the outputs of
    the parts that passed, in row order, and ``(row, exception)`` for each
    row that raises by itself.
    """
    outputs: list[pa.RecordBatch] = []
    failed: list[tuple[int, Exception]] = []

    def run(start: int, part: pa.RecordBatch) -> None:
        try:
            outputs.extend(process(part))
        except Exception as exc:  # noqa: BLE001 - any dataflow error is isolated
            if part.num_rows <= 1:
                failed.append((start, exc))
                return
            half = part.num_rows // 2
            run(start, part.slice(0, half))
            run(start + half, part.slice(half))

    half = batch.num_rows // 2
    run(0, batch.slice(0, half))
    run(half, batch.slice(half))
    return outputs, failed


def _tps(tps) -> str:
    return ", ".join(sorted(format_tp(tp) for tp in tps))


class Worker:
    """The consume-process-produce loop of one app instance."""

    def __init__(self, app):
        self.app = app
        self.settings = app.settings
        self.lock = asyncio.Lock()
        self.stats = Stats()
        self.agents: list[DataflowAgent] = []
        self.by_topic: dict[str, list[DataflowAgent]] = defaultdict(list)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.fetcher: ArrowFetcher | None = None
        self.assigned = asyncio.Event()
        self.failure: BaseException | None = None
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._progress_task: asyncio.Task | None = None
        self._dead_letters_logged = 0
        #: The previous fetch's acknowledgement-and-commit task (stateless apps).
        self._pending: asyncio.Task | None = None
        self.positions: dict[TopicPartition, int] = {}
        self.state = StateManager(self)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        app, settings = self.app, self.settings
        bootstrap = app.bootstrap_servers
        flows = list(app.dataflows.values())
        for flow in flows:
            flow.build()

        sources = sorted({t for flow in flows for t in flow.topics})
        sinks = sorted({flow.sink for flow in flows if isinstance(flow.sink, str)})
        wanted = {name: settings.topic_partitions
                  for name in [*sources, *sinks, app.dead_letter_topic]}
        await ensure_topics(bootstrap, wanted,
                            replication_factor=settings.topic_replication_factor)

        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=f"{app.id}-producer",
            acks=settings.acks,
            linger_ms=settings.linger_ms,
            max_batch_size=settings.max_batch_size,
            compression_type=settings.compression_type,
        )
        await self.producer.start()

        for flow in flows:
            sink = None
            if isinstance(flow.sink, str):
                partitions = await self.producer.partitions_for(flow.sink)
                sink = TopicSink(self.producer, flow.sink, flow.sink_codec, len(partitions))
            agent = DataflowAgent(flow, sink)
            self.agents.append(agent)
            for topic in flow.topics:
                self.by_topic[topic].append(agent)
        await self.state.start(self.agents)

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=app.group_id,
            client_id=f"{app.id}-consumer-{os.getpid()}",
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(100, settings.session_timeout_ms // 3),
            max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
            fetch_max_bytes=settings.fetch_max_bytes,
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        if settings.fetcher == "arrow":
            self.fetcher = self._make_fetcher(sources)
            await self.fetcher.start()
        # Logged before the group join, which logs the first assignment.
        self._log_banner(sources, sinks)
        self.consumer.subscribe(sources, listener=_RebalanceListener(self))
        await self.consumer.start()
        self.stats = Stats()
        self._task = asyncio.create_task(self._consume_loop(), name=f"sabot-{app.id}")
        if settings.progress_interval:
            self._progress_task = asyncio.create_task(self._report_progress())

    def _make_fetcher(self, sources) -> ArrowFetcher:
        settings = self.settings
        json_topics = frozenset(topic for agent in self.agents
                                if isinstance(agent.flow.codec, JsonCodec)
                                for topic in agent.flow.topics)
        return ArrowFetcher(
            self.consumer, self.app.bootstrap_servers, topics=sources,
            client_id=f"{self.app.id}-fetcher-{os.getpid()}",
            auto_offset_reset=settings.auto_offset_reset,
            max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
            fetch_max_bytes=settings.fetch_max_bytes,
            check_crcs=settings.check_crcs, join_topics=json_topics)

    def _log_banner(self, sources, sinks) -> None:
        app = self.app
        logger.info(
            "worker starting: app=%s broker=%s group=%s sources=%s sinks=%s dlq=%s "
            "guarantee=at-least-once dataflows=%s pid=%d fetcher=%s cython_kernels=%s",
            app.id, app.broker, app.group_id, ",".join(sources), ",".join(sinks) or "-",
            app.dead_letter_topic, ",".join(app.dataflows), os.getpid(),
            self.settings.fetcher,
            "loaded" if ext.USING_EXTENSIONS else "not loaded (pure-Python twins)",
        )
        if not ext.USING_EXTENSIONS and not os.environ.get("SABOT_NO_EXTENSIONS"):
            logger.warning("the Cython kernels are not compiled; running on the "
                           "pure-Python twins. Reinstall with a C compiler for full speed.")

    async def wait(self, stop: asyncio.Event | None = None) -> None:
        """Return when ``stop`` is set or the consume loop has ended."""
        waiters = [self._task]
        stop_task = None
        if stop is not None:
            stop_task = asyncio.create_task(stop.wait())
            waiters.append(stop_task)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if stop_task is not None:
                stop_task.cancel()

    async def wait_assigned(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.assigned.wait(), timeout)

    async def stop(self) -> None:
        """Finish the fetch in flight, flush, commit, leave the group."""
        self._stopping = True
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.settings.stop_timeout)
            except asyncio.TimeoutError:
                logger.error("in-flight batch did not finish within %.0f s; stopping anyway",
                             self.settings.stop_timeout)
                self._task.cancel()
        if self._progress_task is not None:
            self._progress_task.cancel()
        await self.state.stop()
        if self.producer is not None:
            try:
                await self.producer.flush()
            finally:
                await self.producer.stop()
        if self.fetcher is not None:
            await self.fetcher.close()
            self.fetcher = None
        if self.consumer is not None:
            await self.consumer.stop()  # leaves the group
        if self.consumer is not None or self.producer is not None:
            self._log_progress(final=True)
            logger.info("worker stopped: app=%s", self.app.id)
        self.consumer = None
        self.producer = None

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    # -- the loop ---------------------------------------------------------------------

    async def _fetch(self) -> dict:
        """Return the next records of the assigned partitions, by partition."""
        if self.fetcher is None:
            return await self.consumer.getmany(timeout_ms=200,
                                               max_records=self.settings.max_records)
        # Every assigned partition is paused, so this returns no records. It
        # raises the group's errors, waits out a rebalance, and counts as the
        # poll that max_poll_interval_ms expects.
        await self.consumer.getmany(timeout_ms=0)
        return await self.fetcher.fetch(0.2, self.settings.max_records)

    async def _consume_loop(self) -> None:
        try:
            await self._consume()
        finally:
            async with self.lock:
                try:
                    await self._drain()
                except Exception as exc:
                    self.failure = self.failure or exc
                    logger.exception("the last fetch's sends or commit failed")

    async def _consume(self) -> None:
        while not self._stopping:
            try:
                fetched = await self._fetch()
            except (KafkaError, SabotError) as exc:
                if not exc.retriable:
                    self.failure = exc
                    logger.exception("fetch failed with a non-retriable error")
                    return
                logger.warning("fetch failed, retrying: %r", exc)
                await asyncio.sleep(0.5)
                continue
            if not fetched:
                continue
            if self.stats.first_fetch is None:
                self.stats.first_fetch = time.monotonic()
            async with self.lock:
                if self.fetcher is not None:
                    # Partitions revoked while this fetch waited for the lock.
                    fetched = {tp: records for tp, records in fetched.items()
                               if self.fetcher.is_assigned(tp)}
                    if not fetched:
                        continue
                try:
                    await self._process(fetched)
                except DataflowError as exc:
                    self.failure = exc
                    logger.error("%s; stopping without committing this batch\n%s", exc,
                                 "".join(traceback.format_exception(exc.__cause__ or exc)))
                    return
                except Exception as exc:
                    self.failure = exc
                    logger.exception("processing failed; stopping without committing")
                    return

    async def _process(self, fetched) -> None:
        futures: list[asyncio.Future] = []
        commits: dict[TopicPartition, int] = {}
        consumed = dead = produced = 0
        for tp, records in fetched.items():
            agents = self.by_topic.get(tp.topic, ())
            decoded_by_codec: dict[int, tuple] = {}
            for agent in agents:
                codec = agent.flow.codec
                cached = decoded_by_codec.get(id(codec))
                if cached is None:
                    cached = build_batch(records, tp.partition, codec)
                    decoded_by_codec[id(codec)] = cached
                    batch, decoded, _ = cached
                    if decoded.errors:
                        dead += len(decoded.errors)
                        futures.extend(await self._dead_letter(tp, records, decoded.errors,
                                                               codec.name))
                pipeline = await self.state.open(agent, tp)
                batch = self.state.skip_applied(agent, tp, cached[0])
                try:
                    outputs = pipeline.process(batch)
                except Exception as exc:
                    if (self.settings.dataflow_errors != "dead-letter"
                            or agent.flow.name in self.state.stores):
                        raise DataflowError(
                            f"dataflow {agent.flow.name!r} raised {type(exc).__name__}: "
                            f"{exc} on {format_tp(tp)} offsets "
                            f"{records[0].offset}..{records[-1].offset}"
                        ) from exc
                    outputs, errors = self._isolate_failures(agent, tp, pipeline, batch,
                                                             cached[1].rows_from, exc)
                    dead += len(errors)
                    futures.extend(await self._dead_letter(tp, records, errors,
                                                           codec.name, agent.flow.name))
                sent = await agent.emit(outputs)
                produced += sum(b.num_rows for b in outputs) if sent else 0
                futures.extend(sent)
                futures.extend(await self.state.write(agent, tp, records[-1].offset))
            consumed += len(records)
            commits[tp] = records[-1].offset + 1

        finish = self._finish(futures, commits, consumed, dead, produced)
        if self.state.stores:
            # Stateful dataflows write their markers per fetch, so each fetch
            # is acknowledged and committed before the next one is processed.
            await finish
            return
        # Stateless: this fetch was processed while the previous one's sends
        # were in flight. Commit the previous one before handing this one on,
        # so commits stay in order and at most one fetch is unacknowledged.
        await self._drain()
        self._pending = asyncio.create_task(finish)

    async def _drain(self) -> None:
        """Wait until the fetch whose sends are in flight is acknowledged and committed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def _finish(self, futures, commits, consumed: int, dead: int,
                      produced: int) -> None:
        """Await a fetch's sends, then write state markers and commit its offsets."""
        if futures:
            await asyncio.gather(*futures)
        # State markers go out only after every send above was acknowledged.
        await self.state.mark()
        await self._commit(commits)
        self.positions.update(commits)
        # Counted once acknowledged and committed, like the consumed records.
        self.stats.consumed += consumed
        self.stats.produced += produced
        self.stats.dead_letters += dead
        self.stats.batches += 1
        self.stats.last_commit = time.monotonic()
        logger.debug("committed %d records from %d partitions", consumed, len(commits))

    async def _commit(self, commits: dict[TopicPartition, int]) -> None:
        for attempt in range(1, 6):
            try:
                await self.consumer.commit(commits)
                return
            except CommitFailedError as exc:
                # The group rebalanced: the partitions' new owner replays
                # from the last committed offset (at-least-once).
                logger.warning("commit of %s failed after a rebalance: %s",
                               _tps(commits), exc)
                return
            except KafkaError as exc:
                if not exc.retriable or attempt == 5:
                    raise
                logger.warning("commit of %s failed (attempt %d), retrying: %r",
                               _tps(commits), attempt, exc)
                await asyncio.sleep(0.2 * attempt)

    def _isolate_failures(self, agent, tp, pipeline, batch: pa.RecordBatch,
                          rows_from: np.ndarray, first: Exception):
        """Find the records of ``batch`` that make the dataflow raise alone.

        Returns the outputs of the other records and ``(record index, reason)``
        for each failing one. The dataflow has no state, so running its
        records again gives the same result.
        """
        outputs, failed = isolate_failures(pipeline.process, batch)
        offsets = batch.column("_offset")
        logger.warning(
            "dataflow %r raised %s: %s on %s; %d of its %d records fail alone "
            "(offsets %s) and go to %s", agent.flow.name, type(first).__name__, first,
            format_tp(tp), len(failed), batch.num_rows,
            ", ".join(str(offsets[row].as_py()) for row, _ in failed[:10])
            + (", ..." if len(failed) > 10 else ""), self.app.dead_letter_topic)
        errors = [(int(rows_from[row]),
                   f"dataflow {agent.flow.name!r} raised {type(exc).__name__}: {exc}")
                  for row, exc in failed]
        return outputs, errors

    async def _dead_letter(self, tp, records, errors, codec_name,
                           dataflow: str | None = None) -> list[asyncio.Future]:
        topic = self.app.dead_letter_topic
        futures = []
        for index, reason in errors:
            record = records[index]
            headers = [
                ("sabot.error", reason.encode()),
                ("sabot.codec", codec_name.encode()),
                ("sabot.topic", tp.topic.encode()),
                ("sabot.partition", str(tp.partition).encode()),
                ("sabot.offset", str(record.offset).encode()),
            ]
            if dataflow is not None:
                headers.append(("sabot.dataflow", dataflow.encode()))
            futures.append(await self.producer.send(
                topic, value=record.value, key=record.key, headers=headers))
        logger.debug("sent %d dead letters from %s to %s", len(errors), format_tp(tp), topic)
        return futures

    # -- progress ---------------------------------------------------------------------

    async def _report_progress(self) -> None:
        last = (time.monotonic(), 0, 0)
        while True:
            await asyncio.sleep(self.settings.progress_interval)
            last = self._log_progress(last)

    def _log_progress(self, last=None, final: bool = False):
        now = time.monotonic()
        stats = self.stats
        lag = self._estimate_lag()
        stats.lag = lag
        if final:
            elapsed = max(now - stats.started, 1e-9)
            logger.info(
                "totals: consumed %d, produced %d, dead letters %d in %.1f s (%.0f msgs/s)",
                stats.consumed, stats.produced, stats.dead_letters, elapsed,
                stats.consumed / elapsed)
            return None
        then, consumed_before, produced_before = last
        elapsed = max(now - then, 1e-9)
        logger.info(
            "consumed %d (%.0f/s), produced %d (%.0f/s), dead letters %d, lag ~%s",
            stats.consumed, (stats.consumed - consumed_before) / elapsed,
            stats.produced, (stats.produced - produced_before) / elapsed,
            stats.dead_letters, "?" if lag < 0 else lag)
        if stats.dead_letters > self._dead_letters_logged:
            logger.warning("dead letters so far: %d (messages that could not be decoded "
                           "or processed, in %s)", stats.dead_letters,
                           self.app.dead_letter_topic)
            self._dead_letters_logged = stats.dead_letters
        return now, stats.consumed, stats.produced

    def _estimate_lag(self) -> int:
        """Sum of highwater minus position over assigned partitions; -1 if unknown.

        An estimate: some brokers (Tansu 0.6) report a highwater below what a
        partition holds, so lag is never used to decide that work is done.
        """
        consumer = self.consumer
        if consumer is None:
            return -1
        total = 0
        for tp in consumer.assignment():
            if self.fetcher is not None:
                highwater = self.fetcher.highwater(tp)
            else:
                highwater = consumer.highwater(tp)
            position = self.positions.get(tp)
            if highwater is None or position is None:
                continue
            total += max(0, highwater - position)
        return total
