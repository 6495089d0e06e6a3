"""Topic administration: create the topics a worker needs when missing."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

logger = logging.getLogger(__name__)


async def ensure_topics(bootstrap: str, topics: Mapping[str, int],
                        configs: Mapping[str, Mapping[str, str]] | None = None,
                        replication_factor: int = 1) -> list[str]:
    """Create each missing topic with its partition count; return those created.

    Existing topics are left as they are, whatever their partition count.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in topics if name not in existing]
        if not missing:
            return []
        new = [NewTopic(name, topics[name], replication_factor,
                        topic_configs=dict((configs or {}).get(name, {})))
               for name in missing]
        try:
            await admin.create_topics(new)
        except TopicAlreadyExistsError:
            # Another worker of the same app created them first.
            logger.debug("topics %s were created concurrently", missing)
        for name in missing:
            logger.info("created topic %s with %d partitions", name, topics[name])
        return missing
    finally:
        await admin.close()
