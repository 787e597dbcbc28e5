"""A corpus of bad requests across every RPC: never UNKNOWN or INTERNAL, never a traceback.

A real server on 127.0.0.1, port 0. The corpus (built deterministically, at
least 500 requests) holds raw bytes that are no protobuf message, huge and
negative numbers, overflowing integers, NaN and infinities, Unicode and long
strings, path traversal, a symbolic link out of the data directory, an .npz
whose header declares (10^11, 784), and a data set with NaN values for
Evaluate; GetJobLogs and DownloadModel with bad ids and offsets; names and
labels (10^5 entries, megabyte keys and values, Unicode, invalid keys) on
SubmitJob and ListJobs. Every request but the NaN data set is refused before
any worker starts; one tiny job is trained first so that Evaluate and Predict have a
model to be refused against. Afterwards the server must answer Health.Check
SERVING and GetServerInfo, must have stored no job of the corpus, and its log
must hold no traceback. The counts per status code are printed (`-s`).
"""

from __future__ import annotations

import collections
import io
import logging
import math
import random
import time
import zipfile

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ntrain.v1 import training_pb2 as pb
from service_harness import RunningServer, job_spec, layers

from naive_model.data import host_memory_bytes

pytestmark = pytest.mark.slow

SERVICE = "/ntrain.v1.TrainingService/"
UNARY = ("SubmitJob", "GetJob", "ListJobs", "CancelJob", "Evaluate", "Predict", "GetServerInfo")
STREAMS = (
    SERVICE + "WatchJob",
    SERVICE + "GetJobLogs",
    SERVICE + "DownloadModel",
    "/grpc.health.v1.Health/Watch",
)
CORPUS_SECONDS = 600  # the whole corpus; each call has its own deadline too
CALL_TIMEOUT = 60


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """20 features and 3 classes; a NaN copy, a huge header, a link out, non-data files."""
    directory = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)

    def save(name, **arrays):
        splits = {
            "x_train": rng.random((64, 20), dtype=np.float32),
            "y_train": rng.integers(0, 3, 64),
            "x_test": rng.random((16, 20), dtype=np.float32),
            "y_test": rng.integers(0, 3, 16),
        }
        np.savez(directory / name, **{**splits, **arrays})

    save("small.npz")
    nan_test = rng.random((16, 20), dtype=np.float32)
    nan_test[5, 7] = np.nan
    save("nan.npz", x_test=nan_test)
    save("objects.npz", x_train=np.array([object()] * 64 * 20, dtype=object).reshape(64, 20))
    save("mismatch.npz", y_train=rng.integers(0, 3, 63))
    with zipfile.ZipFile(directory / "huge.npz", "w") as archive:
        for key, shape in {"x_train": (10**11, 784), "y_train": (10**11,)}.items():
            header = io.BytesIO()
            descr = "<f4" if key.startswith("x") else "<i8"
            np.lib.format.write_array_header_1_0(
                header, {"descr": descr, "fortran_order": False, "shape": shape}
            )
            archive.writestr(f"{key}.npy", header.getvalue() + b"\0" * 64)
        for key in ("x_test", "y_test"):
            stream = io.BytesIO()
            np.save(stream, np.zeros((4, 784) if key == "x_test" else 4, np.float32))
            archive.writestr(f"{key}.npy", stream.getvalue())
    (directory / "notes.txt").write_text("not a data set")
    (directory / "broken.npz").write_bytes(b"PK\x03\x04 truncated zip")
    (directory / "folder.npz").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    save("kept-out.npz")
    (directory / "kept-out.npz").rename(outside / "kept-out.npz")
    (directory / "escape.npz").symlink_to(outside / "kept-out.npz")
    (directory / "loop.npz").symlink_to(directory / "loop.npz")
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    running = RunningServer(
        tmp_path_factory.mktemp("state"), data_dir=data_dir, warm_worker=False, max_queue=2
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def trained_job(server) -> str:
    spec = job_spec(dataset="small.npz", layers=layers((8, "relu"), (3, "softmax")), batch_size=16)
    job = server.submit(spec, request_id="fuzz-model")
    assert server.wait_for(job.job_id).state == pb.JOB_STATE_SUCCEEDED
    return job.job_id


# -- the corpus ----------------------------------------------------------------------


def raw_byte_strings(rng: random.Random) -> list[bytes]:
    """Bytes that are no valid message of any type (and some that parse as unknown fields)."""
    crafted = [
        b"\xff",
        b"\x80",
        b"\x0a",  # a tag with nothing after it
        b"\x0a\xff\xff\xff\xff\x0f",  # a length of 4 GiB
        b"\x08" + b"\xff" * 11,  # a varint longer than 10 bytes
        b"\x0b",  # a group start
        b"\x0c",  # a group end
        b"\x0f",  # wire type 7
        b"\x00\x00",  # field number 0
        b"\x12\x05ab",  # truncated
        b"\x0a\x02\xc3\x28",  # invalid UTF-8 in a string field
        b"\x0a\x04\xed\xa0\x80x",  # a UTF-16 surrogate in UTF-8
        bytes(range(256)),
        b"\x0a\x7f" * 64,
        b"\x1a\x02\x08" * 100,
        b"\x00" * 100_000,
        bytes(rng.getrandbits(8) for _ in range(1 << 20)),  # a megabyte of noise
    ]
    noise = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(5)]
    return crafted + noise


BAD_JOB_IDS = [
    "",
    "../x",
    "job-../../etc",
    "/etc/passwd",
    "JOB-ABCDEF",
    "job-\u00b2\u00b3",
    "job-\uff11\uff12",
    "job-1\n",
    "job-1\x00",
    "j" * 65,
    "j" * 100_000,
    "'; DROP TABLE jobs; --",
    "job-%s%s%n",
    "\U0001f600",
    " job-1",
    "job-000000000000",  # well formed, no such job
    "job-ffffffffffff",
]


BAD_NAMES = ("n" * 129, "n" * 1_000_000, "line\nbreak", "\x00", "\u200b" * 10, "\U0001f600" * 200)


def bad_labels() -> list[dict[str, str]]:
    """Label maps no job may carry: too many, too long, not label names, Unicode."""
    return [
        {f"k{index}": "v" for index in range(100_000)},
        {f"k{index}": "v" for index in range(33)},
        {"k": "v" * 1_000_000},
        {"k" * 1_000_000: "v"},
        {"k" * 64: "v"},
        {"k": "v" * 64},
        {"": "v"},
        {"-k": "v"},
        {"k-": "v"},
        {"../k": "v"},
        {"/k": "v"},
        {"Example.COM/k": "v"},
        {"a" * 254 + "/k": "v"},
        {"k": "has space"},
        {"k": "\x00"},
        {"\u043a\u043b\u044e\u0447": "v"},
        {"k": "\u00e9" * 1000},
        {"k\n": "v"},
        {"\U0001f600": "\U0001f600"},
    ]


def submit_cases(rng: random.Random) -> list[pb.SubmitJobRequest]:
    """Each mutation alone makes the spec invalid; a case applies one to three of them."""
    big_model_host = host_memory_bytes()
    # (No layers is no mutation: an unset field takes the server's default.)
    mutations = [
        {"layers": layers((0, "relu"), (10, "softmax"))},
        {"layers": layers((-1, "relu"), (10, "softmax"))},
        {"layers": layers((2**31 - 1, "relu"), (10, "softmax"))},
        {"layers": layers((-(2**31), "relu"), (10, "softmax"))},
        {"layers": layers((64, "gelu"), (10, "softmax"))},
        {"layers": layers((64, ""), (10, "softmax"))},
        {"layers": layers((64, "relu\x00"), (10, "softmax"))},
        {"layers": layers((64, "\uff52\uff45\uff4c\uff55"), (10, "softmax"))},
        {"layers": layers((64, "r" * 1_000_000), (10, "softmax"))},
        {"layers": layers(*[(8, "relu")] * 64, (10, "softmax"))},
        {"layers": layers(*[(1, "relu")] * 100_000)},
        {"layers": layers((64, "relu"), (7, "softmax"))},
        {"layers": layers((1_000_000, "relu"), (1_000_000, "relu"), (10, "softmax"))},
        {"initializer": "zeros"},
        {"initializer": "i" * 100_000},
        {"initializer": "\u0000"},
        {"optimizer": pb.OptimizerSpec(name="adamw", learning_rate=1e-3)},
        {"optimizer": pb.OptimizerSpec(name="SGD", learning_rate=1e-3)},
        {"optimizer": pb.OptimizerSpec(name="o" * 100_000, learning_rate=1e-3)},
        *(
            {"optimizer": pb.OptimizerSpec(name="sgd", learning_rate=value)}
            for value in (0.0, -1.0, math.nan, math.inf, -math.inf, 1e39, 1.8e308, -5e-324)
        ),
        *(
            {"optimizer": pb.OptimizerSpec(name="momentum", learning_rate=0.1, momentum=value)}
            for value in (-0.1, 1.0, 1e300, math.nan, math.inf, -math.inf)
        ),
        *({"batch_size": value} for value in (0, -1, -(2**31), 2**31 - 1, 4096)),
        *({"epochs": value} for value in (0, -1, -(2**31), 2**31 - 1)),
        *(
            {"dataset": name}
            for name in (
                "",
                "../etc/passwd",
                "/etc/passwd",
                "a/b.npz",
                "..",
                ".hidden",
                "small.npz/",
                "small.npz\x00",
                "\\windows",
                "x" * 256,
                "x" * 1_000_000,
                "absent.npz",
                "\uff4d\uff4e\uff49\uff53\uff54",
                "notes.txt",
                "broken.npz",
                "folder.npz",
                "objects.npz",
                "mismatch.npz",
                "huge.npz",
                "escape.npz",
                "loop.npz",
            )
        ),
        *(
            {"strategy": pb.StrategySpec(name=name, device_count=count)}
            for name, count in (
                ("tpu", 0),
                ("multi_worker", 0),
                ("gpu", 0),
                ("s" * 100_000, 0),
                ("mirrored", 17),
                ("mirrored", -1),
                ("mirrored", 2**31 - 1),
                ("mirrored", 3),  # 128 does not divide over 3 replicas
                ("cpu", 2),
                ("auto", -(2**31)),
            )
        ),
        *({"steps_per_execution": value} for value in (-1, -(2**31))),
        *({"seed": value} for value in (-1, 2**31, 2**63 - 1, -(2**63))),
        *({"checkpoint_every_epochs": value} for value in (-1, -(2**31))),
        *(
            {"max_runtime_seconds": value}
            for value in (-1.0, math.nan, math.inf, -math.inf, 1e9, 1.8e308)
        ),
        *({"max_restarts": value} for value in (-1, 101, 2**31 - 1, -(2**31))),
        *({"name": value} for value in BAD_NAMES),
        *({"labels": value} for value in bad_labels()),
    ]
    # A model only the memory check refuses, while this host cannot hold it.
    wide = job_spec(
        layers=layers((650_000, "relu"), (10, "softmax")),
        optimizer=pb.OptimizerSpec(name="sgd", learning_rate=0.01),
    )
    wide.strategy.CopyFrom(pb.StrategySpec(name="mirrored", device_count=16))
    if big_model_host < 100 * 1024**3:
        cases = [pb.SubmitJobRequest(spec=wide, request_id="fuzz-too-wide")]
    else:
        cases = []
    for index, mutation in enumerate(mutations):  # each alone
        cases.append(pb.SubmitJobRequest(spec=job_spec(**mutation), request_id=f"fuzz-{index}"))
    for index in range(150):  # and two or three at once
        chosen = rng.sample(mutations, rng.randint(2, 3))
        fields = {key: value for mutation in chosen for key, value in mutation.items()}
        request_id = f"fuzz-combined-{index}"
        cases.append(pb.SubmitJobRequest(spec=job_spec(**fields), request_id=request_id))
    for request_id in ("r" * 129, "r" * 1_000_000, "tab\there", "new\nline", "\x00", "\u200b"):
        cases.append(pb.SubmitJobRequest(spec=job_spec(), request_id=request_id))
    return cases


def page_tokens() -> list[str]:
    return [
        "\u00b2",
        "\u0661\u0662",  # Arabic-Indic digits
        "\uff11\uff12\uff13",
        "12345",
        "-1",
        "9" * 19,
        "9" * 10_000,
        "abc",
        "AAAAAAAAAAAAAAAAAAAA",
        "AQAAAAAAADA5XKBS5Gn=",
        "////////////////////",
        "\x00" * 20,
        "t" * 1_000_000,
        "\U0001f600" * 5,
    ]


def corpus(job_id: str, rng: random.Random) -> list[tuple[str, object]]:
    """(method path, request message or raw bytes) for every RPC of the service."""
    cases: list[tuple[str, object]] = []
    for blob in raw_byte_strings(rng):
        for method in UNARY:
            cases.append((SERVICE + method, blob))
        for method in (*STREAMS, "/grpc.health.v1.Health/Check"):
            cases.append((method, blob))
    cases += [(SERVICE + "SubmitJob", request) for request in submit_cases(rng)]
    for bad in BAD_JOB_IDS:
        cases += [
            (SERVICE + "GetJob", pb.GetJobRequest(job_id=bad)),
            (SERVICE + "CancelJob", pb.CancelJobRequest(job_id=bad)),
            (SERVICE + "WatchJob", pb.WatchJobRequest(job_id=bad)),
            (SERVICE + "Evaluate", pb.EvaluateRequest(job_id=bad, use_checkpoint=True)),
            (SERVICE + "Predict", pb.PredictRequest(job_id=bad, inputs=[pb.Example(values=[0])])),
            (SERVICE + "GetJobLogs", pb.GetJobLogsRequest(job_id=bad)),
            (SERVICE + "GetJobLogs", pb.GetJobLogsRequest(job_id=bad, follow=True)),
            (SERVICE + "DownloadModel", pb.DownloadModelRequest(job_id=bad)),
        ]
    for offset in (-1, -(2**63), 2**31, 2**62, 2**63 - 1):
        for follow in (False, True):
            request = pb.GetJobLogsRequest(job_id=job_id, offset=offset, follow=follow)
            cases.append((SERVICE + "GetJobLogs", request))
    for labels in bad_labels():
        cases.append((SERVICE + "ListJobs", pb.ListJobsRequest(labels=labels)))
    for after in (-1, -(2**63), -(2**31)):
        cases.append(
            (SERVICE + "WatchJob", pb.WatchJobRequest(job_id=job_id, after_sequence=after))
        )
    cases.append(
        (SERVICE + "WatchJob", pb.WatchJobRequest(job_id=job_id, after_sequence=2**63 - 1))
    )
    for token in page_tokens():
        cases.append((SERVICE + "ListJobs", pb.ListJobsRequest(page_token=token)))
    for size in (-1, 1001, 2**31 - 1, -(2**31)):
        cases.append((SERVICE + "ListJobs", pb.ListJobsRequest(page_size=size)))
    for states in ([0], [8], [-1], [2**31 - 1], [3] * 65, [3] * 250_000, list(range(-5, 20))):
        cases.append((SERVICE + "ListJobs", pb.ListJobsRequest(states=states)))
    for name in (
        "../small.npz",
        "/etc/passwd",
        "x" * 1_000_000,
        "absent.npz",
        "notes.txt",
        "broken.npz",
        "folder.npz",
        "objects.npz",
        "mismatch.npz",
        "huge.npz",
        "escape.npz",
        "loop.npz",
        "synthetic",  # 784 features; the model takes 20
        "mnist",
        "nan.npz",  # loaded in a worker: FAILED_PRECONDITION naming the NaN
    ):
        cases.append((SERVICE + "Evaluate", pb.EvaluateRequest(job_id=job_id, dataset=name)))
    for inputs in (
        [],
        [pb.Example(values=[])],
        [pb.Example(values=[0.5] * 19)],
        [pb.Example(values=[0.5] * 21)],
        [pb.Example(values=[0.5] * 20), pb.Example(values=[0.5] * 784)],
        [pb.Example(values=[math.nan] * 20)],
        [pb.Example(values=[math.inf] + [0.0] * 19)],
        [pb.Example(values=[-math.inf] * 20)],
        [pb.Example(values=[3e38] * 19 + [math.nan])],
        [pb.Example(values=[0.5] * 20)] * 10_001,
        [pb.Example(values=[0.0] * 1)] * 200_000,
        [pb.Example(values=[0.0] * 1_000_000)],
    ):
        cases.append((SERVICE + "Predict", pb.PredictRequest(job_id=job_id, inputs=inputs)))
    for tensor in bad_tensors():
        cases.append((SERVICE + "Predict", pb.PredictRequest(job_id=job_id, tensor=tensor)))
    return cases


def bad_tensors() -> list[pb.Tensor]:
    """Tensors the model (20 features) cannot take: bad dtypes, shapes, byte counts, values."""
    f32, u8 = pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_UINT8
    nan_row = np.full((1, 20), np.nan, dtype="<f4").tobytes()
    return [
        pb.Tensor(),
        pb.Tensor(dtype=f32),
        pb.Tensor(dtype=u8, shape=[0, 20]),
        *(pb.Tensor(dtype=d, shape=[1, 20], content=bytes(20)) for d in (-1, 0, 3, 2**31 - 1)),
        pb.Tensor(dtype=f32, shape=[1, 20], content=bytes(79)),
        pb.Tensor(dtype=f32, shape=[1, 20], content=bytes(81)),
        pb.Tensor(dtype=u8, shape=[1, 20], content=bytes(80)),
        pb.Tensor(dtype=u8, shape=[20], content=bytes(20)),
        pb.Tensor(dtype=u8, shape=[1, 1, 20], content=bytes(20)),
        pb.Tensor(dtype=u8, shape=[1, 21], content=bytes(21)),
        pb.Tensor(dtype=u8, shape=[-1, -20], content=bytes(20)),
        pb.Tensor(dtype=u8, shape=[2**62, 2**62], content=bytes(20)),
        pb.Tensor(dtype=u8, shape=[-(2**63), 2**63 - 1], content=b""),
        pb.Tensor(dtype=u8, shape=[1] * 10_000 + [20], content=bytes(20)),
        pb.Tensor(dtype=u8, shape=[10_001, 20], content=bytes(10_001 * 20)),
        pb.Tensor(dtype=f32, shape=[1, 20], content=nan_row),
        pb.Tensor(dtype=f32, shape=[1, 20], content=np.full(20, np.inf, "<f4").tobytes()),
    ]


# -- sending it ----------------------------------------------------------------------


def send(channel: grpc.Channel, method: str, request) -> grpc.StatusCode:
    """The status of one call; a stream counts as OK once it answers or ends cleanly."""
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        if method in STREAMS:
            stream = channel.unary_stream(method)(payload, timeout=CALL_TIMEOUT)
            try:
                next(stream, None)  # Health.Watch answers once and then waits for changes
            finally:
                stream.cancel()
        else:
            channel.unary_unary(method)(payload, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_corpus_of_bad_requests_never_gets_unknown_or_internal(server, trained_job, caplog):
    caplog.set_level(logging.INFO)
    cases = corpus(trained_job, random.Random(12))
    assert len(cases) >= 500
    counts: collections.Counter[str] = collections.Counter()
    failures = []
    start = time.monotonic()
    for method, request in cases:
        assert time.monotonic() - start < CORPUS_SECONDS, f"the corpus ran past {CORPUS_SECONDS} s"
        code = send(server.channel, method, request)
        counts[code.name] += 1
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            shown = request if isinstance(request, bytes) else str(request)
            failures.append((method, code.name, repr(shown)[:200]))
    seconds = time.monotonic() - start
    print(f"\nfuzz: {len(cases)} requests in {seconds:.1f} s: {dict(sorted(counts.items()))}")

    assert not failures, failures[:20]
    assert counts["UNKNOWN"] == 0 and counts["INTERNAL"] == 0
    health = health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert server.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).version
    assert server.stored_job_count() == 1  # the trained job; nothing of the corpus was taken
    assert "Traceback" not in caplog.text, caplog.text[-3000:]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
