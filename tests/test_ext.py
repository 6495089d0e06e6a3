"""The kernels in sabot.ext: selection, the partitioner, and the build.

Every kernel test runs on both implementations through the ``kernels``
fixture; the property tests compare the compiled kernels with the twins.
The encoders are tested in test_ext_encode.py, the records kernel in
test_ext_records.py, the record batch kernel in test_fetch.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sabot import ext
from sabot.ext import _twins

ROOT = Path(__file__).resolve().parent.parent
NO_EXTENSIONS = bool(os.environ.get("SABOT_NO_EXTENSIONS"))
SKIP_COMPILED = "SABOT_NO_EXTENSIONS is set: only the pure-Python twins are tested"


def _compiled_module():
    # An ImportError here fails the test: only SABOT_NO_EXTENSIONS skips it.
    from sabot.ext import _compiled

    return _compiled


@pytest.fixture(params=["compiled", "twin"])
def kernels(request):
    """Each implementation in turn: the compiled kernels, then the twins."""
    if request.param == "twin":
        return _twins
    if NO_EXTENSIONS:
        pytest.skip(SKIP_COMPILED)
    return _compiled_module()


@pytest.fixture(scope="module")
def compiled():
    """The compiled kernels, for comparing them with the twins."""
    if NO_EXTENSIONS:
        pytest.skip(SKIP_COMPILED)
    return _compiled_module()


# -- selection --------------------------------------------------------------------------


def test_selection_matches_environment():
    if NO_EXTENSIONS:
        assert ext.kernels is _twins
        assert not ext.USING_EXTENSIONS
    elif ext.USING_EXTENSIONS:
        assert ext.kernels is _compiled_module()
    assert ext.murmur2 is ext.kernels.murmur2
    assert ext.partitions_for_keys is ext.kernels.partitions_for_keys
    assert ext.encode_json_rows is ext.kernels.encode_json_rows
    assert ext.encode_msgpack_rows is ext.kernels.encode_msgpack_rows
    assert ext.record_columns is ext.kernels.record_columns
    assert ext.parse_record_batches is ext.kernels.parse_record_batches


def test_no_extensions_forces_twins():
    code = "from sabot import ext; print(ext.USING_EXTENSIONS, ext.kernels.__name__)"
    env = dict(os.environ, SABOT_NO_EXTENSIONS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == ["False", "sabot.ext._twins"]


def test_compiled_module_satisfies_protocol(compiled):
    for name in ("murmur2", "partitions_for_keys", "encode_json_rows",
                 "encode_msgpack_rows", "record_columns", "parse_record_batches"):
        assert callable(getattr(compiled, name)), name
        assert callable(getattr(_twins, name)), name
    assert compiled.__name__ == "sabot.ext._compiled"


# -- murmur2 ----------------------------------------------------------------------------

# Kafka's UtilsTest.testMurmur2 vectors (Java's signed int), as quoted in the
# kafka_ex client's test/kafka_ex/support/murmur_test.exs.
KAFKA_UTILS_TEST_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]

# librdkafka's src/rdmurmur2.c unit test: Java client results with the
# sign bit cleared (Utils.toPositive), as its partitioner uses them.
LIBRDKAFKA_POSITIVE_VECTORS = [
    (b"kafka", 1348980580),
    (b"amqp", 767747138),
    (b"giberish123456789", 257239820),
]


@pytest.mark.parametrize(("data", "expected"), KAFKA_UTILS_TEST_VECTORS)
def test_murmur2_java_vectors(kernels, data, expected):
    assert kernels.murmur2(data) == expected


@pytest.mark.parametrize(("data", "expected"), LIBRDKAFKA_POSITIVE_VECTORS)
def test_murmur2_librdkafka_vectors(kernels, data, expected):
    assert kernels.murmur2(data) & 0x7FFFFFFF == expected


def test_murmur2_every_tail_length(kernels):
    # Lengths 0..8 cover each of the 0-3 trailing bytes with and without a full block.
    data = b"\x00\x7f\x80\xff\x01\xfe\x10\xef"
    results = [kernels.murmur2(data[:n]) for n in range(len(data) + 1)]
    assert results == [_twins.murmur2(data[:n]) for n in range(len(data) + 1)]
    assert all(-(2**31) <= h < 2**31 for h in results)
    assert len(set(results)) == len(results)


def test_murmur2_accepts_bytes_like(kernels):
    assert kernels.murmur2(bytearray(b"foobar")) == -790332482
    assert kernels.murmur2(memoryview(b"foobar")) == -790332482


# -- partitions_for_keys ----------------------------------------------------------------


def test_partitions_match_java_formula(kernels):
    keys = [data for data, _ in KAFKA_UTILS_TEST_VECTORS]
    expected = [(h & 0x7FFFFFFF) % 7 for _, h in KAFKA_UTILS_TEST_VECTORS]
    partitions = kernels.partitions_for_keys(keys, 7)
    assert isinstance(partitions, np.ndarray)
    assert partitions.dtype == np.int64
    assert partitions.tolist() == expected


def test_partitions_null_key_is_minus_one(kernels):
    partitions = kernels.partitions_for_keys([None, b"foobar", None, b""], 50)
    assert partitions.tolist() == [-1, (-790332482 & 0x7FFFFFFF) % 50, -1,
                                   (275646681 & 0x7FFFFFFF) % 50]


def test_partitions_empty_input(kernels):
    assert kernels.partitions_for_keys([], 3).tolist() == []
    assert kernels.partitions_for_keys(pa.array([], pa.binary()), 3).tolist() == []


@pytest.mark.parametrize("arrow_type", [pa.binary(), pa.large_binary(), pa.string(),
                                        pa.large_string()])
def test_partitions_from_arrow_array(kernels, arrow_type):
    words = ["foobar", None, "21", "", "a-little-bit-long-string", None, "abc", "kafka"]
    array = pa.array(words, type=arrow_type)
    as_bytes = [None if w is None else w.encode() for w in words]
    expected = kernels.partitions_for_keys(as_bytes, 12).tolist()
    assert kernels.partitions_for_keys(array, 12).tolist() == expected
    # A slice starts inside the buffers: the array offset must be honoured.
    assert kernels.partitions_for_keys(array.slice(3, 4), 12).tolist() == expected[3:7]


def test_partitions_rejects_bad_arguments(kernels):
    with pytest.raises(ValueError, match="num_partitions"):
        kernels.partitions_for_keys([b"a"], 0)
    with pytest.raises(ValueError, match="num_partitions"):
        kernels.partitions_for_keys([b"a"], True)
    with pytest.raises(TypeError, match="bytes or None"):
        kernels.partitions_for_keys([b"a", "text"], 3)
    with pytest.raises(TypeError, match="binary or string array"):
        kernels.partitions_for_keys(pa.array([1, 2]), 3)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_murmur2_compiled_equals_twin(compiled, data):
    assert compiled.murmur2(data) == _twins.murmur2(data)


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=30),
       num_partitions=st.integers(1, 1000), start=st.integers(0, 5))
def test_partitions_compiled_equals_twin(compiled, keys, num_partitions, start):
    expected = _twins.partitions_for_keys(keys, num_partitions).tolist()
    assert compiled.partitions_for_keys(keys, num_partitions).tolist() == expected
    array = pa.array(keys, type=pa.binary()).slice(start)
    assert compiled.partitions_for_keys(array, num_partitions).tolist() == expected[start:]


# -- the build --------------------------------------------------------------------------


@pytest.mark.slow
def test_setup_py_builds_importable_kernels(tmp_path):
    """Build the kernels with setup.py into a scratch folder and import them there."""
    if NO_EXTENSIONS:
        pytest.skip(SKIP_COMPILED)
    build_lib = tmp_path / "lib"
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(build_lib),
         "--build-temp", str(tmp_path / "temp")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "could not compile" not in result.stderr, result.stderr
    built = sorted(p.name.split(".")[0] for p in (build_lib / "sabot" / "ext").glob("*.so"))
    sources = sorted(p.stem for p in (ROOT / "sabot" / "ext").glob("_*.pyx"))
    assert "_partition" in sources
    assert built == sources

    spec = importlib.util.spec_from_file_location(
        "sabot.ext._partition", next((build_lib / "sabot" / "ext").glob("_partition.*.so")))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.murmur2(b"21") == -973932308


@pytest.mark.slow
def test_setup_py_without_compiler_builds_nothing(tmp_path):
    """With no C compiler, setup.py still succeeds and prints that the twins will be used."""
    missing = tmp_path / "no-such-cc"
    env = dict(os.environ, CC=str(missing), LDSHARED=f"{missing} -shared")
    build_lib = tmp_path / "lib"
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(build_lib),
         "--build-temp", str(tmp_path / "temp")],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env,
    )

    assert result.returncode == 0, result.stderr
    assert "could not compile" in result.stderr
    assert "the pure-Python twin will be used" in result.stderr
    assert not list(build_lib.rglob("*.so"))


# The worker, started with one compiled kernel missing, as after an install
# without a compiler: sabot.ext falls back to every twin and the worker warns.
WORKER_WITHOUT_KERNELS = """
import asyncio, logging, sys
sys.modules["sabot.ext._json"] = None  # importing it now raises ImportError
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from sabot import Sabot, ext
assert not ext.USING_EXTENSIONS

app = Sabot("twins-warning", broker=sys.argv[1], session_timeout_ms=6000,
            progress_interval=0)

@app.dataflow(sys.argv[2], sink=sys.argv[2] + "-out")
def copy(stream):
    return stream

async def main():
    await app.start()
    await app.stop()

asyncio.run(main())
"""


@pytest.mark.broker
def test_worker_warns_once_without_kernels(broker_url, topic):
    env = {k: v for k, v in os.environ.items() if k != "SABOT_NO_EXTENSIONS"}
    result = subprocess.run([sys.executable, "-c", WORKER_WITHOUT_KERNELS, broker_url, topic],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)

    assert result.returncode == 0, result.stderr
    assert result.stderr.count("the Cython kernels are not compiled") == 1, result.stderr
