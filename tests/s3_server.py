"""A real S3 API for the tests: moto's server mode on loopback, started and stopped by the tests.

``moto_s3()`` yields the endpoint URL of a ``ThreadedMotoServer`` bound to ``127.0.0.1`` on a
free port, with fake credentials in the environment (restored afterwards). ``upload_tree``
copies a local folder into a bucket with boto3 (as a data provider would).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """Start moto's S3 server on loopback; yield its endpoint URL; stop it afterwards."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*FAKE_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_CREDENTIALS)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_fsspec_cache()


def _clear_fsspec_cache() -> None:
    """Forget cached s3fs instances (they hold connections to the stopped server)."""
    with contextlib.suppress(Exception):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


def client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def make_bucket(endpoint: str, bucket: str, public: bool = False) -> None:
    """Create a bucket; ``public`` adds an anonymous-read policy (like the Cell Painting Gallery)."""
    import json

    c = client(endpoint)
    c.create_bucket(Bucket=bucket)
    if public:
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"], "Resource": f"arn:aws:s3:::{bucket}/*"},
                {"Effect": "Allow", "Principal": "*", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{bucket}"},
            ],
        }
        c.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def upload_tree(local: Path, endpoint: str, bucket: str, prefix: str) -> int:
    """Upload every file under ``local`` to ``s3://bucket/prefix/<relative path>``."""
    c = client(endpoint)
    n = 0
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            key = f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}"
            c.upload_file(str(path), bucket, key)
            n += 1
    return n


def free_port() -> int:
    """A loopback port with nothing listening (for the unreachable-endpoint test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
