"""Suite-wide fixtures: real servers started by the tests themselves (moto S3 in server mode on 127.0.0.1)."""

from __future__ import annotations

import os
import socket

import pytest
import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gloo(rank: int, world: int, folder: str) -> None:
    """Join a ``world``-process gloo group that meets at a file in ``folder`` (the test's own tmp folder).

    A file store, not a TCP port: a port found free by one process can be taken by another before rank 0 binds
    it (two test runs on one machine), and then the group never forms. Collectives time out after 60 s, so a
    mismatch fails the test instead of hanging the run.
    """
    import datetime

    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))  # as torchrun sets them
    store = f"file://{os.path.join(folder, 'gloo_store')}"
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timeout)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server over real HTTP on 127.0.0.1, for the whole session.

    Yields a dict with ``endpoint_url`` and ``storage_options`` (fsspec/s3fs keyword arguments).
    The credentials are dummies set in the environment too, so subprocesses and Dask workers that
    inherit the environment can reach the same server.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage_options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    try:
        yield {"endpoint_url": endpoint, "storage_options": storage_options}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the session's moto server; yields ``s3://<bucket>``."""
    import boto3

    # boto3 rather than s3fs.mkdir: s3fs sends LocationConstraint=us-east-1, which S3 (and moto) reject.
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1")
    name = "flexast-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where no CUDA device exists (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: a folder named gpu matches
            item.add_marker(skip)
