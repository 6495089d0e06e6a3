"""The ``sabot`` command."""

from __future__ import annotations

import logging
import sys

import click

from sabot import __version__
from sabot.errors import SabotError

logger = logging.getLogger(__name__)

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


@click.group()
@click.version_option(__version__, prog_name="sabot")
def main() -> None:
    """Sabot: Kafka-native stream processing on Arrow record batches."""


@main.command()
@click.option("-A", "--app", "app_path", required=True, metavar="MODULE[:ATTR]",
              help="The app to run: a module in the current folder, with the Sabot "
                   "object's name after a colon (default 'app').")
@click.option("--broker", metavar="URL", default=None,
              help="Broker URL kafka://host:port[,host:port]; overrides the app's.")
@click.option("--loglevel", "-l", type=LOG_LEVELS, default="info", show_default=True,
              help="Log level of the sabot loggers.")
@click.option("--agents", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes of this app to run on this machine, each a "
                   "member of the app's consumer group.")
def worker(app_path: str, broker: str | None, loglevel: str, agents: int) -> None:
    """Run an app's dataflows until SIGINT or SIGTERM."""
    from sabot.log import configure_logging

    configure_logging(loglevel)
    if agents > 1:
        from sabot.agents.supervisor import supervise_workers

        sys.exit(supervise_workers(app_path, broker, loglevel, agents))
    sys.exit(run_worker(app_path, broker))


def run_worker(app_path: str, broker: str | None) -> int:
    """Load and run one worker; return the process exit status."""
    from sabot.app.loader import load_app
    from sabot.kafka.urls import parse_broker_url

    try:
        app = load_app(app_path)
        if broker:
            app.broker = broker
            app.bootstrap_servers = parse_broker_url(broker)
    except SabotError as exc:
        click.echo(f"error: {exc}", err=True)
        if exc.__cause__ is not None and "failed to import" in str(exc):
            import traceback

            traceback.print_exception(exc.__cause__)
        return 2
    try:
        app.main()
    except (SabotError, OSError) as exc:
        logger.error("worker for app %s stopped: %s", app.id, exc)
        return 1
    return 0


def _bootstrap(broker: str | None) -> str:
    from sabot.kafka.urls import parse_broker_url, resolve_broker

    return parse_broker_url(resolve_broker(broker))


@main.command()
@click.argument("topic")
@click.option("--broker", metavar="URL", default=None,
              help="Broker URL; default $SABOT_BROKER, else kafka://localhost:9092.")
@click.option("--key-field", metavar="NAME", default=None,
              help="Use this field of each JSON line as the message key.")
@click.option("--partitions", type=click.IntRange(min=1), default=8, show_default=True,
              help="Partitions of the topic if it has to be created.")
def send(topic: str, broker: str | None, key_field: str | None, partitions: int) -> None:
    """Send each line of standard input to TOPIC as one message."""
    import asyncio

    from sabot.kafka.console import send_lines

    try:
        sent = asyncio.run(send_lines(_bootstrap(broker), topic, sys.stdin.buffer,
                                      key_field, partitions))
    except SabotError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"sent {sent} message{'' if sent == 1 else 's'} to {topic}", err=True)


@main.command()
@click.argument("topic")
@click.option("--broker", metavar="URL", default=None,
              help="Broker URL; default $SABOT_BROKER, else kafka://localhost:9092.")
@click.option("--count", "-n", type=click.IntRange(min=1), default=None,
              help="Stop after this many messages.")
@click.option("--idle-timeout", type=float, default=None, metavar="SECONDS",
              help="Stop after this many seconds without a message.")
@click.option("--new-only", is_flag=True,
              help="Print only messages that arrive from now on.")
@click.option("--headers", is_flag=True,
              help="Add each message's headers as a fifth field (name=value; ...), "
                   "for instance a dead letter's sabot.error.")
def tail(topic: str, broker: str | None, count: int | None, idle_timeout: float | None,
         new_only: bool, headers: bool) -> None:
    """Print TOPIC's messages as: partition, offset, key, value (tab-separated)."""
    import asyncio

    from sabot.kafka.console import tail_topic

    try:
        asyncio.run(tail_topic(_bootstrap(broker), topic, from_beginning=not new_only,
                               count=count, idle_timeout=idle_timeout, headers=headers))
    except KeyboardInterrupt:
        pass
    except SabotError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option("--port", type=click.IntRange(0, 65535), default=9092, show_default=True,
              help="TCP port on 127.0.0.1; 0 picks a free one.")
@click.option("--loglevel", "-l", type=LOG_LEVELS, default="info", show_default=True)
def broker(port: int, loglevel: str) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) until Ctrl-C."""
    import signal
    import time

    from sabot.kafka.broker import EmbeddedBroker, free_port
    from sabot.log import configure_logging

    configure_logging(loglevel)
    instance = EmbeddedBroker(port=port or free_port())
    try:
        instance.start()
    except SabotError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"broker listening on {instance.url} (data is kept in memory); "
               f"Ctrl-C stops it", err=False)
    received: list[int] = []
    # Explicit handlers, because a shell starts a background job with
    # SIGINT ignored, and Python's KeyboardInterrupt would then never come.
    # They only append to a list: a threading.Event set from a handler can
    # deadlock against the main thread's wait() on the same Event.
    signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _: received.append(signum))
    try:
        while not received and instance.process and instance.process.poll() is None:
            time.sleep(0.2)
    finally:
        exited = instance.process is not None and instance.process.poll() is not None
        instance.stop()
    if exited:
        click.echo("error: the broker process exited unexpectedly", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
