from collections.abc import Sequence

import numpy as np

def crc32c(data: bytes | bytearray | memoryview) -> int: ...
def encode_record_batch(keys: Sequence[bytes | None] | None, values: Sequence[bytes | None],
                        rows: np.ndarray | range | Sequence[int], timestamp_ms: int,
                        max_bytes: int) -> tuple[bytes, int]: ...
