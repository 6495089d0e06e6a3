from sabot.ext._protocols import FetchedColumns

def parse_record_batches(data: bytes, fetch_offset: int, join_values: bool = ...,
                         check_crcs: bool = ...) -> FetchedColumns: ...
