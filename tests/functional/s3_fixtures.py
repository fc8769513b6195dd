"""A real S3 endpoint for tests and the benchmark: moto's server in its own process, and an
HTTP relay in front of it that counts uploaded bytes and can inject faults.

Everything listens on 127.0.0.1 only.  Test modules load the fixtures with
``pytest_plugins = ["s3_fixtures"]`` and import names from here only under TYPE_CHECKING or
inside tests (an import at module level would come before pytest's assertion rewriting);
the benchmark imports the classes directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import pytest

from tests.support.net import free_port

if TYPE_CHECKING:
    from s3sync import RemoteStore, RetryPolicy

HOST = "127.0.0.1"
ACCESS_KEY = "AKIAPYVOLTESTKEY0000"
SECRET_KEY = "pyvol-test-secret-do-not-log-0123456789"


class MotoServer:
    """``python -m moto.server`` on a free port; stopped by its PID.

    ``auth_after``: enforce real signature checks (moto's IAM auth) after that many requests,
    so wrong credentials are refused as by AWS.
    """

    def __init__(self, log: Path, auth_after: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if auth_after is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
        self._log = open(log, "ab")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):  # noqa: S310
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start; see {log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> object:
        import boto3
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=access_key, aws_secret_access_key=secret_key)


Fault = Callable[[str, str], int | None]
"""(method, path) -> HTTP status to answer instead of forwarding, or None to forward."""


@dataclass
class Counters:
    body_bytes: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    downloaded: int = 0
    """Bytes of response bodies to GET requests (as framed on the wire)."""

    @property
    def uploaded(self) -> int:
        return sum(n for m, n in self.body_bytes.items() if m in ("PUT", "POST"))


class Relay:
    """An HTTP/1.1 relay ``127.0.0.1:port`` -> ``upstream``, one thread per connection.

    Counts request bodies by method; ``fault`` may answer a request with an error status;
    ``down`` makes it reset every new request (a store that died).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.counters = Counters()
        self.fault: Fault | None = None
        self.down = False
        self.strip_headers: tuple[str, ...] = ()
        """Lower-case names of request headers not passed on (an endpoint that ignores them)."""
        self._lock = threading.Lock()
        self._sock = socket.create_server((HOST, 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    def reset(self) -> Counters:
        with self._lock:
            old, self.counters = self.counters, Counters()
        return old

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _count(self, method: str, nbytes: int, request: bool) -> None:
        with self._lock:
            c = self.counters
            c.body_bytes[method] = c.body_bytes.get(method, 0) + nbytes
            if request:
                c.requests[method] = c.requests.get(method, 0) + 1

    def _serve(self, conn: socket.socket) -> None:
        up: socket.socket | None = None
        with contextlib.ExitStack() as stack:
            stack.callback(conn.close)
            cin = conn.makefile("rb", buffering=1 << 16)
            while True:
                head = _read_head(cin)
                if head is None:
                    return
                method, path = head[0].decode("latin-1").split(" ")[:2]
                headers = _headers(head)
                self._count(method, 0, True)
                if self.down:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    return
                status = self.fault(method, path) if self.fault else None
                if status is not None:
                    if "100-continue" not in headers.get("expect", "").lower():
                        _copy_body(cin, None, headers)
                    conn.sendall(f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml"
                                 f"\r\nContent-Length: {len(ERROR_BODY)}\r\nConnection: close"
                                 f"\r\n\r\n".encode() + ERROR_BODY)
                    return
                if up is None:
                    up = socket.create_connection((HOST, self.upstream))
                    stack.callback(up.close)
                    uin = up.makefile("rb", buffering=1 << 16)
                if self.strip_headers:
                    head = [head[0], *(line for line in head[1:] if line.decode("latin-1")
                                       .partition(":")[0].strip().lower()
                                       not in self.strip_headers)]
                up.sendall(b"".join(line + b"\r\n" for line in head) + b"\r\n")
                if "100-continue" in headers.get("expect", "").lower():
                    reply = _read_head(uin)
                    if reply is None:
                        return
                    if b" 100 " in reply[0] + b" ":
                        conn.sendall(b"".join(x + b"\r\n" for x in reply) + b"\r\n")
                    else:  # final answer without the body: pass it on and stop here
                        conn.sendall(b"".join(x + b"\r\n" for x in reply) + b"\r\n")
                        _copy_body(uin, conn, _headers(reply))
                        return
                sent = _copy_body(cin, up, headers)
                self._count(method, sent, False)
                reply = _read_head(uin)
                while reply is not None and b" 100 " in reply[0] + b" ":
                    reply = _read_head(uin)
                if reply is None:
                    return
                conn.sendall(b"".join(x + b"\r\n" for x in reply) + b"\r\n")
                rheaders = _headers(reply)
                if method != "HEAD":
                    got = _copy_body(uin, conn, rheaders, until_close=True)
                    if method == "GET":
                        with self._lock:
                            self.counters.downloaded += got
                if "close" in (rheaders.get("connection", "") + headers.get("connection", "")):
                    return


ERROR_BODY = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
              b"<Message>injected by the test relay</Message></Error>")


@contextlib.contextmanager
def workspace(prefix: str, where: str | None = None
              ) -> Iterator[tuple[Path, MotoServer, Relay]]:
    """For the benchmarks: a new temporary directory (under ``where``) with a moto server,
    logging into it, behind a :class:`Relay`; both stopped and the directory removed on exit."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    try:
        moto = MotoServer(work / "moto.log")
        try:
            relay = Relay(moto.port)
            try:
                yield work, moto, relay
            finally:
                relay.close()
        finally:
            moto.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_head(f: BinaryIO) -> list[bytes] | None:
    lines: list[bytes] = []
    while True:
        try:
            line = f.readline(1 << 16)
        except OSError:
            return None
        if not line:
            return None
        line = line.rstrip(b"\r\n")
        if not line:
            if lines:
                return lines
            continue
        lines.append(line)


def _headers(head: list[bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def _copy_body(src: BinaryIO, dst: socket.socket | None, headers: dict[str, str],
               until_close: bool = False) -> int:
    """Copy one message body; returns its size in bytes as framed on the wire."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = src.readline()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            total += len(size_line)
            if dst is not None:
                dst.sendall(size_line)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = src.readline()
                    total += len(trailer)
                    if dst is not None:
                        dst.sendall(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return total
            total += _copy_n(src, dst, size + 2)
    if "content-length" in headers:
        return _copy_n(src, dst, int(headers["content-length"]))
    if until_close:
        total = 0
        while chunk := src.read1(1 << 20):  # type: ignore[attr-defined]
            total += len(chunk)
            if dst is not None:
                dst.sendall(chunk)
        return total
    return 0


def _copy_n(src: BinaryIO, dst: socket.socket | None, n: int) -> int:
    left = n
    while left:
        chunk = src.read(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed mid-body")
        left -= len(chunk)
        if dst is not None:
            dst.sendall(chunk)
    return n


# -- pytest fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoServer, str, str]]:
    """A moto server that checks signatures, with one bucket and one IAM user's real keys."""
    import json

    import boto3

    # Requests before enforcement starts: create the bucket, the user, its policy, its key.
    server = MotoServer(tmp_path_factory.mktemp("moto-auth") / "moto.log", auth_after=4)
    try:
        kw = {"endpoint_url": server.url, "region_name": "us-east-1",
              "aws_access_key_id": "AKIABOOTSTRAP0000000", "aws_secret_access_key": "x"}
        boto3.client("s3", **kw).create_bucket(Bucket="authed")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="pyvol")
        iam.put_user_policy(UserName="pyvol", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="pyvol")["AccessKey"]
        yield server, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.stop()


@pytest.fixture
def relay(moto: MotoServer) -> Iterator[Relay]:
    r = Relay(moto.port)
    try:
        yield r
    finally:
        r.close()


_buckets = iter(range(1_000_000))


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    """A fresh, empty bucket for one test."""
    name = f"pyvol-test-{next(_buckets)}"
    moto.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
    return name


class MakeStore(Protocol):
    def __call__(self, url: str, bucket: str, cache: Path, *, key: str = ...,
                 secret: str = ..., retry: RetryPolicy | None = ..., workers: int = ...,
                 prefix: str = ..., passphrase: str | None = ...) -> RemoteStore: ...


@pytest.fixture
def make_store() -> MakeStore:
    """RemoteStore over a URL with the test credentials (or the ones given)."""
    from s3sync import RemoteStore, RetryPolicy, S3Config

    def make(url: str, bucket: str, cache: Path, *, key: str = ACCESS_KEY,
             secret: str = SECRET_KEY, retry: RetryPolicy | None = None, workers: int = 8,
             prefix: str = "vol", passphrase: str | None = None) -> RemoteStore:
        config = S3Config(endpoint_url=url, region="us-east-1", access_key_id=key,
                          secret_access_key=secret)
        return RemoteStore(config, bucket, prefix, cache, retry=retry or RetryPolicy(),
                           workers=workers, passphrase=passphrase)
    return make
