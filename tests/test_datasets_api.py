"""Data sets as resources of the API: push, list, describe, delete, over a real server.

Each test starts a real server on port 0 (no warm worker) and talks to it
with the real client; conversions run in real conversion workers.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest
from ntrain.v1 import training_pb2 as pb
from service_harness import RunningServer
from test_dataset_formats import X, Y, write_csv, write_parquet

from naive_model.canonical import open_split
from ntrain.client import Client
from ntrain.client.exceptions import AlreadyExists, InvalidArgument, NotFound
from service.jobs.access import ADMIN, LOCAL, TRAINER, VIEWER, Principal
from service.jobs.dataset_store import DatasetStore
from service.jobs.datasets import lookup_dataset, resolve_dataset
from service.jobs.errors import FailedPrecondition as FailedPreconditionError
from service.jobs.errors import InvalidArgument as InvalidArgumentError
from service.jobs.errors import PermissionDenied


@pytest.fixture
def server(tmp_path):
    running = RunningServer(tmp_path / "state", warm_worker=False, max_dataset_bytes=2**20)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.server.port}") as connected:
        yield connected


def leftovers(server) -> list[str]:
    """What an upload may leave behind: temporary files, and folders nobody names."""
    root = server.config.state_dir / "datasets"
    named = {f"sha256-{version.digest}" for version in server.server._datasets.versions()}
    temporary = [path.name for path in (root / ".tmp").iterdir()]
    orphans = [path.name for path in root.glob("sha256-*") if path.name not in named]
    return temporary + orphans


def test_push_list_describe_and_delete(server, client, tmp_path):
    csv = write_csv(tmp_path / "iris.csv")
    pushed = client.push_dataset(csv, name="iris", label_column="label")
    digest = hashlib.sha256(csv.read_bytes()).hexdigest()
    assert pushed.digest == f"sha256:{digest}" and pushed.format == "csv"
    assert (pushed.num_train, pushed.num_test, pushed.input_size) == (900, 100, 5)
    assert pushed.num_classes == 3 and pushed.feature_dtype == "float32"
    assert pushed.size_bytes == csv.stat().st_size
    assert [d.name for d in client.datasets()] == ["iris"]
    assert client.dataset("iris") == pushed
    assert client.dataset(f"iris@sha256:{digest}") == pushed
    # A second version under the same name becomes its newest.
    parquet = write_parquet(tmp_path / "iris.parquet", X[:500], Y[:500])
    newer = client.push_dataset(parquet, name="iris", label_column="label")
    assert client.dataset("iris").digest == newer.digest
    assert client.dataset(f"iris@sha256:{digest}").num_train == 900
    assert [d.digest for d in client.datasets("iris")] == [newer.digest, pushed.digest]
    # Deleting one version leaves the other; deleting the name, the rest.
    (gone,) = client.delete_dataset(f"iris@sha256:{digest}")
    assert gone.digest == pushed.digest
    assert [d.digest for d in client.datasets()] == [newer.digest]
    assert [d.digest for d in client.delete_dataset("iris")] == [newer.digest]
    with pytest.raises(NotFound, match="iris"):
        client.dataset("iris")
    assert list((server.config.state_dir / "datasets").glob("sha256-*")) == []


def test_the_same_bytes_again_are_stored_once_and_need_not_be_sent(server, client, tmp_path):
    csv = write_csv(tmp_path / "a.csv")
    first = client.push_dataset(csv, name="first", label_column="label")
    second = client.push_dataset(csv, name="second", label_column="label")
    assert first.digest == second.digest
    assert len(list((server.config.state_dir / "datasets").glob("sha256-*"))) == 1
    # A header alone names the stored version: the server reads no bytes.
    header = pb.DatasetUpload(
        name="third",
        size_bytes=csv.stat().st_size,
        sha256=first.digest.removeprefix("sha256:"),
        format="csv",
        label_column="label",
    )
    third = server.stub.UploadDataset(iter([pb.UploadDatasetRequest(header=header)]), timeout=30)
    assert third.digest == first.digest and third.name == "third"
    # Deleting one name keeps the folder the others name.
    client.delete_dataset("first")
    assert client.dataset("second").num_train == 900
    # Other conversion options for the same bytes are refused, not silently ignored.
    with pytest.raises(AlreadyExists, match="test fraction"):
        client.push_dataset(csv, name="other", label_column="label", test_fraction=0.5)


def test_a_pushed_mnist_keeps_its_pixels_uint8(tmp_path, mnist_path):
    running = RunningServer(tmp_path / "state", warm_worker=False)
    try:
        with Client(f"127.0.0.1:{running.server.port}") as client:
            pushed = client.push_dataset(mnist_path, name="digits")
        assert (pushed.num_train, pushed.num_test, pushed.feature_dtype) == (60000, 10000, "uint8")
        version = running.server._datasets.resolve("digits")
        x_train, _ = open_split(version.folder, "train")
        assert x_train.dtype == np.uint8
    finally:
        running.stop()


def _upload(server, header: pb.DatasetUpload, data: bytes, chunk: int = 2**16):
    requests = [pb.UploadDatasetRequest(header=header)] + [
        pb.UploadDatasetRequest(chunk=data[start : start + chunk])
        for start in range(0, len(data), chunk)
    ]
    return server.stub.UploadDataset(iter(requests), timeout=60)


def _violation(error: grpc.RpcError) -> tuple[str, str]:
    from ntrain.client.exceptions import field_violations

    (violation,) = field_violations(error)
    return violation.field, violation.description


def _header(data: bytes, **overrides) -> pb.DatasetUpload:
    fields = {
        "name": "bad",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": "csv",
        "label_column": "y",
        **overrides,
    }
    return pb.DatasetUpload(**fields)


BAD_UPLOADS = [
    # (case, the file's bytes, header fields that differ from the truth, field, words)
    ("non-numeric feature", b"a,b,y\n1,2,0\n3,x,1\n", {}, "file.rows[1].b", "not a number"),
    ("NaN", b"a,b,y\n1,2,0\n3,nan,1\n", {}, "file.rows[1].b", "finite"),
    ("label not an integer", b"a,b,y\n1,2,0\n3,4,2.5\n", {}, "file.rows[1].y", "integer"),
    ("ragged rows", b"a,b,y\n1,2,0\n3,4\n", {}, "file.rows[1]", "fields"),
    ("missing label column", b"a,b\n1,2\n", {}, "header.label_column", "not a column"),
    ("empty file", b"", {}, "header.size_bytes", "empty"),
    (
        "corrupt zip",
        b"PK\x03\x04" + bytes(200),
        {"format": "npz", "label_column": ""},
        "file",
        "zip",
    ),
    ("size does not match", b"a,b,y\n1,2,0\n", {"size_bytes": 99}, "header.size_bytes", "came"),
    ("digest does not match", b"a,b,y\n1,2,0\n", {"sha256": "0" * 64}, "header.sha256", "hash"),
    (
        "over --max-dataset-bytes",
        b"a,b,y\n1,2,0\n",
        {"size_bytes": 2**20 + 1},
        "header.size_bytes",
        "max-dataset-bytes",
    ),
    ("unknown format", b"a,b,y\n1,2,0\n", {"format": "xlsx"}, "header.format", "one of"),
    ("built-in name", b"a,b,y\n1,2,0\n", {"name": "mnist"}, "header.name", "built-in"),
]


@pytest.mark.parametrize(
    ("data", "overrides", "field", "words"),
    [case[1:] for case in BAD_UPLOADS],
    ids=[case[0] for case in BAD_UPLOADS],
)
def test_bad_uploads_are_invalid_argument_naming_the_place_and_leave_nothing(
    server, data, overrides, field, words
):
    with pytest.raises(grpc.RpcError) as refused:
        _upload(server, _header(data, **overrides), data)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation_field, description = _violation(refused.value)
    assert violation_field == field and words in description
    assert leftovers(server) == [] and server.server._datasets.versions() == []


def test_the_header_must_come_first(server):
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.UploadDataset(iter([pb.UploadDatasetRequest(chunk=b"x")]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violation(refused.value)[0] == "header"


def test_a_client_gone_mid_upload_leaves_nothing(server, tmp_path):
    data = bytes(600_000)
    sent_some, release = threading.Event(), threading.Event()

    def requests():
        yield pb.UploadDatasetRequest(header=_header(data))
        yield pb.UploadDatasetRequest(chunk=data[:100_000])
        sent_some.set()
        release.wait(30)  # the client hangs mid-upload, then goes away

    call = server.stub.UploadDataset.future(requests(), timeout=60)
    assert sent_some.wait(30)
    temp = server.config.state_dir / "datasets" / ".tmp"
    deadline = time.monotonic() + 10
    while not list(temp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(temp.iterdir())  # the server was writing the upload
    call.cancel()
    release.set()
    deadline = time.monotonic() + 10
    while leftovers(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(server) == [] and server.server._datasets.versions() == []


def test_a_restart_removes_what_a_killed_server_left(server, client, tmp_path):
    kept = client.push_dataset(write_csv(tmp_path / "a.csv"), name="kept", label_column="label")
    root = server.config.state_dir / "datasets"
    server.stop()
    (root / ".tmp" / "upload-cut-off").write_bytes(b"half a file")
    (root / ".tmp" / "convert-cut-off").mkdir()
    (root / f"sha256-{'a' * 64}").mkdir()  # renamed into place, its name never written
    server.start()
    assert sorted(path.name for path in root.iterdir() if path.is_dir()) == [
        ".tmp",
        f"sha256-{kept.digest.removeprefix('sha256:')}",
    ]
    assert list((root / ".tmp").iterdir()) == []
    assert server.server._datasets.resolve("kept").manifest.num_train == 900


def test_the_command_line_pushes_lists_describes_and_removes(server, tmp_path, capsys):
    from service.cli.app import main

    address = ["--address", f"127.0.0.1:{server.server.port}"]
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x, X)
    np.save(y, Y)
    assert main(["data", "push", str(x), str(y), "--name", "pairs", *address]) == 0
    pushed = capsys.readouterr().out
    assert pushed.startswith("pairs@sha256:") and "900 train, 100 test" in pushed
    assert main(["data", "ls", *address]) == 0
    assert "pairs" in capsys.readouterr().out
    assert main(["data", "describe", "pairs", *address]) == 0
    assert "5 float32" in capsys.readouterr().out
    csv = tmp_path / "bad.csv"
    csv.write_text("a,b,y\n1,2,0\n3,x,1\n")
    assert main(["data", "push", str(csv), "--name", "bad", "--label-column", "y", *address]) == 1
    assert "rows[1].b (line 3) is 'x'" in capsys.readouterr().err
    assert main(["data", "rm", "pairs", *address]) == 0
    assert capsys.readouterr().out.startswith("deleted pairs@sha256:")


# -- the store, and names resolved for jobs (no server) ---------------------------------


def _csv_upload(tmp_path, name: str):
    """A CSV file's bytes and the header that declares them truly."""
    from service.jobs.dataset_uploads import UploadHeader

    data = write_csv(tmp_path / "a.csv").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    header = UploadHeader(
        name=name, size_bytes=len(data), sha256=digest, format="csv", label_column="label"
    )
    return data, header


def _stored(tmp_path, users_of=lambda digest: []) -> tuple[DatasetStore, str]:
    from service.jobs.dataset_uploads import DatasetUploads

    store = DatasetStore(tmp_path, users_of=users_of)
    data, header = _csv_upload(tmp_path, "table")
    owner = Principal(name="alice", role=TRAINER)
    DatasetUploads(store).upload(header, iter([data]), principal=owner)
    return store, header.sha256


def test_job_names_resolve_to_the_converted_folder(tmp_path):
    store, digest = _stored(tmp_path)
    for name in ("table", f"table@sha256:{digest}"):
        resolved = resolve_dataset(name, None, datasets=store)
        assert resolved.version is not None and resolved.version.folder == store.folder(digest)
        assert (resolved.info.input_size, resolved.info.num_classes) == (5, 3)
    assert lookup_dataset("table", None, datasets=store).num_train == 900
    with pytest.raises(InvalidArgumentError, match="not on this server"):
        lookup_dataset(f"table@sha256:{'0' * 64}", None, datasets=store)
    with pytest.raises(InvalidArgumentError, match="must be NAME or NAME@sha256"):
        lookup_dataset("table@sha256:abc", None, datasets=store)
    # The built-ins keep their meaning.
    assert resolve_dataset("synthetic", None, datasets=store).version is None


def test_deleting_a_version_a_job_uses_is_refused_naming_the_job(tmp_path):
    store, digest = _stored(tmp_path, users_of=lambda digest: ["job-7"])
    with pytest.raises(FailedPreconditionError, match="job-7"):
        store.delete("table", principal=Principal(name="alice", role=TRAINER))
    assert store.folder(digest).is_dir()


def test_only_the_owner_or_an_admin_deletes_and_a_viewer_pushes_nothing(tmp_path):
    store, _ = _stored(tmp_path)
    with pytest.raises(PermissionDenied, match="owned by 'alice'"):
        store.delete("table", principal=Principal(name="bob", role=TRAINER))
    with pytest.raises(PermissionDenied, match="may not delete data sets"):
        store.delete("table", principal=Principal(name="vera", role=VIEWER))
    from service.jobs.dataset_uploads import DatasetUploads, UploadHeader

    header = UploadHeader(name="x", size_bytes=1, sha256="0" * 64, format="npz")
    with pytest.raises(PermissionDenied, match="may not push data sets"):
        DatasetUploads(store).upload(header, iter([]), principal=Principal(name="v", role=VIEWER))
    assert store.delete("table", principal=Principal(name="root", role=ADMIN))


def test_a_digest_alone_names_stored_bytes_only_for_one_who_pushed_them(tmp_path):
    from service.jobs.dataset_uploads import DatasetUploads

    store, digest = _stored(tmp_path)  # alice pushed them as "table"
    uploads = DatasetUploads(store)
    data, header = _csv_upload(tmp_path, "mine")
    alice, bob = Principal(name="alice", role=TRAINER), Principal(name="bob", role=TRAINER)
    # Alice again: her header names them at once, no byte sent.
    assert uploads.upload(header, iter([]), principal=alice).digest == digest
    # Bob must send the bytes: a header alone, or other bytes, is refused.
    bobs = replace(header, name="bobs")
    with pytest.raises(InvalidArgumentError, match="0 bytes came"):
        uploads.upload(bobs, iter([]), principal=bob)
    junk = b"x" * len(data)
    with pytest.raises(InvalidArgumentError, match="hash to"):
        uploads.upload(bobs, iter([junk]), principal=bob)
    # A size other than the stored bytes' is refused for anyone, and never recorded.
    with pytest.raises(InvalidArgumentError, match=f"are {len(data)} bytes long"):
        uploads.upload(replace(header, size_bytes=5), iter([b"junk!"]), principal=alice)
    assert [version.name for version in store.versions()] == ["mine", "table"]
    # With the bytes, Bob names them too (stored once), and they show their true size.
    named = uploads.upload(bobs, iter([data[:100], data[100:]]), principal=bob)
    assert named.digest == digest and named.owner == "bob" and named.size_bytes == len(data)
    assert len(list(store.folder(digest).parent.glob("sha256-*"))) == 1


def test_client_errors_are_typed(client):
    with pytest.raises(InvalidArgument):
        client.dataset("no/such")
    with pytest.raises(NotFound, match="absent"):
        client.dataset("absent")


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from service.jobs.dataset_uploads import DatasetUploads
    from service.jobs.errors import ResourceExhausted

    store = DatasetStore(tmp_path)
    data, header = _csv_upload(tmp_path, "t")
    # No room for it: refused before a byte is written.
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, len(data)))
        with pytest.raises(ResourceExhausted, match="bytes free"):
            DatasetUploads(store).upload(header, iter([data]), principal=LOCAL)

    # The disk fills up while the file is converted.
    def full(task):
        (task.folder).mkdir()
        (task.folder / "x_train.npy").write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ResourceExhausted, match="filled up"):
        DatasetUploads(store, convert=full).upload(header, iter([data]), principal=LOCAL)
    assert list(store.temp_dir.iterdir()) == [] and store.versions() == []


def test_a_job_on_a_pushed_name_is_pinned_to_its_version_and_holds_it_while_it_runs(
    server, client, tmp_path
):
    """Push CSV and Parquet under one name; jobs train on each version; rm waits for them."""
    first = client.push_dataset(write_csv(tmp_path / "iris.csv"), name="iris", label_column="label")
    layers = [{"units": 16, "activation": "relu"}, {"units": 3, "activation": "softmax"}]
    long = client.submit({"dataset": "iris", "epochs": 100_000, "batchSize": 32, "layers": layers})
    reference = f"iris@{first.digest}"
    assert client.get(long.job_id).dataset_version == reference
    # A newer version under the name changes nothing for the job, which holds its own.
    second = client.push_dataset(
        write_parquet(tmp_path / "iris.parquet"), name="iris", label_column="label"
    )
    assert second.digest != first.digest
    with pytest.raises(grpc.RpcError) as refused:
        client._stub.DeleteDataset(pb.DeleteDatasetRequest(dataset=reference), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert long.job_id in refused.value.details()
    # The newest version is free to go: no job uses it.
    client.delete_dataset(f"iris@{second.digest}")
    client.cancel(long.job_id)
    # A finished job no longer holds its version; a rerun names it exactly.
    short = client.submit({"dataset": reference, "epochs": 1, "batchSize": 32, "layers": layers})
    done = client.wait(short.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.dataset_version == reference and done.result.test_accuracy > 0
    assert client.get(short.job_id).model.dataset == reference
    assert client.evaluate(short.job_id).examples == first.num_test
    client.delete_dataset("iris")
    assert client.datasets() == []
