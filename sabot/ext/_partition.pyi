from collections.abc import Sequence

import numpy as np
import pyarrow as pa

def murmur2(data: bytes | bytearray | memoryview) -> int: ...
def partitions_for_keys(keys: Sequence[bytes | None] | pa.Array,
                        num_partitions: int) -> np.ndarray: ...
