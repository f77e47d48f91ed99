"""The s3 backend against a real S3-compatible server: moto's server mode on 127.0.0.1, started here, with its
IAM signature checks on (so every request's SigV4 signature is verified); objects uploaded with boto3.

``nydus-erofs build`` → upload the blobs → ``nydus-erofs mount --backend s3`` equals the source; wrong
credentials are a one-line error at mount time (the daemon reads each blob's metadata before it mounts)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cachefilesd_py.backends import make_backend
from cachefilesd_py.backends.s3 import S3Backend, S3Options
from erofs.errors import BackendError
from tests.support.cli import CACHEFILESD, run
from tests.support.fstree import assert_same_tree
from tests.support.poll import wait_for
from tests.support.registry import Front, free_port

boto3 = pytest.importorskip("boto3")

pytestmark = pytest.mark.network

BUCKET = "nydus-blobs"
PREFIX = "blobs/sha256:"  # a prefix with a slash and a colon, like a registry's blob path
REGION = "eu-west-1"


@dataclass
class S3Server:
    endpoint: str
    port: int
    key_id: str
    secret: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret)  # fmt: skip

    def enforce_auth(self, on: bool) -> None:
        """moto's IAM checks: on (every request's signature and permissions checked) or off."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset-auth", body=b"0" if on else b"inf",
                         headers={"Content-Type": "text/plain"})  # fmt: skip
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        finally:
            conn.close()

    @contextlib.contextmanager
    def open_access(self) -> Iterator[None]:
        self.enforce_auth(False)
        try:
            yield
        finally:
            self.enforce_auth(True)

    def options(self, **extra: Any) -> dict[str, Any]:
        return {"bucket": BUCKET, "endpoint": self.endpoint, "region": REGION, "prefix": PREFIX,
                "access_key_id": self.key_id, "secret_access_key": self.secret, **extra}  # fmt: skip


def _up(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/moto-api/")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto on 127.0.0.1: an IAM user with an access key allowed s3:*, the bucket, then IAM checks on."""
    pytest.importorskip("moto.server")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or _up(port), "moto server did not start", 60)
        assert proc.poll() is None, log.read_text()
        endpoint = f"http://127.0.0.1:{port}"
        admin = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "admin",
                 "aws_secret_access_key": "admin"}  # fmt: skip
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(policy))
        server = S3Server(endpoint, port, key["AccessKeyId"], key["SecretAccessKey"])
        server.enforce_auth(True)
        server.client().create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _upload(s3: S3Server, data: bytes) -> str:
    blob_id = hashlib.sha256(data).hexdigest()
    s3.client().put_object(Bucket=BUCKET, Key=PREFIX + blob_id, Body=data)
    return blob_id


@pytest.fixture(scope="module")
def blob(s3: S3Server) -> tuple[str, bytes]:
    data = random.Random(5).randbytes((2 << 20) + 123)
    return _upload(s3, data), data


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No credentials from the host: empty environment, credential and config files that do not exist."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    return monkeypatch


# --- the backend ---------------------------------------------------------------------------------------------


def test_ranged_reads_and_stats(s3: S3Server, blob: tuple[str, bytes], aws_env: pytest.MonkeyPatch) -> None:
    blob_id, data = blob
    with make_backend("s3", **s3.options()) as b:
        assert isinstance(b, S3Backend) and b.key(blob_id) == PREFIX + blob_id
        assert b.size(blob_id) == len(data)
        rnd = random.Random(1)
        for _ in range(20):
            off = rnd.randrange(len(data))
            n = rnd.randrange(1, min(len(data) - off, 300_000) + 1)
            assert b.read(blob_id, off, n) == data[off : off + n]
        assert b.read(blob_id, 0, len(data)) == data
        b.stats.reset()
        assert b.read(blob_id, 4096, 8192) == data[4096 : 4096 + 8192]
        snap = b.stats.snapshot()
        assert snap.items() >= {"requests": 1, "bytes": 8192, "errors": 0, "retries": 0, "latency_count": 1}.items()
        assert 0 < snap["latency_max_ms"] <= snap["latency_sum_ms"] and snap["latency_le_10s"] == 1
        with pytest.raises(BackendError, match="past the end"):
            b.read(blob_id, len(data) - 10, 11)


def test_credentials_from_environment_and_profile(s3: S3Server, blob: tuple[str, bytes], aws_env: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:  # fmt: skip
    blob_id, data = blob
    base = {"bucket": BUCKET, "endpoint": s3.endpoint, "prefix": PREFIX}
    aws_env.setenv("AWS_REGION", REGION)
    with pytest.raises(BackendError, match="no credentials") as e:
        make_backend("s3", **base)
    assert "\n" not in str(e.value)
    aws_env.setenv("AWS_ACCESS_KEY_ID", s3.key_id)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    with make_backend("s3", **base) as b:
        assert b.read(blob_id, 7, 100) == data[7:107]
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = nobody\naws_secret_access_key = x\n\n"
                     f"[nydus]\naws_access_key_id = {s3.key_id}\naws_secret_access_key = {s3.secret}\n")  # fmt: skip
    aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    with make_backend("s3", **base, profile="nydus") as b:  # a profile given: the environment's keys are skipped
        assert b.read(blob_id, 0, 10) == data[:10]
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    aws_env.setenv("AWS_PROFILE", "nydus")
    with make_backend("s3", **base) as b:
        assert b.read(blob_id, 1, 10) == data[1:11]


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"secret_access_key": "wrong"}, "HTTP 403 .*SignatureDoesNotMatch"),
        ({"access_key_id": "AKIANOBODY"}, "HTTP 403 .*InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_are_one_line_naming_bucket_and_key(s3: S3Server, blob: tuple[str, bytes],
                                                              aws_env: pytest.MonkeyPatch, change: dict[str, str],
                                                              expect: str) -> None:  # fmt: skip
    blob_id, _ = blob
    with make_backend("s3", **s3.options(**change)) as b:
        with pytest.raises(BackendError, match=expect) as e:
            b.read(blob_id, 0, 100)
        msg = str(e.value)
        assert f"s3 bucket {BUCKET} key {PREFIX}{blob_id}: HTTP 403" in msg and "\n" not in msg
        assert b.stats.retries == 0  # not worth retrying
        with pytest.raises(BackendError, match=f"s3 bucket {BUCKET} key {PREFIX}{blob_id}: HTTP 403"):
            b.size(blob_id)


def test_missing_bucket_and_key(s3: S3Server, blob: tuple[str, bytes], aws_env: pytest.MonkeyPatch) -> None:
    blob_id, _ = blob
    with make_backend("s3", **s3.options(bucket="no-such-bucket")) as b:
        with pytest.raises(BackendError, match="s3 bucket no-such-bucket key .*HTTP 404 .*NoSuchBucket"):
            b.read(blob_id, 0, 1)
    missing = hashlib.sha256(b"never uploaded").hexdigest()
    with make_backend("s3", **s3.options()) as b:
        with pytest.raises(BackendError, match=f"key {PREFIX}{missing}: HTTP 404 .*NoSuchKey"):
            b.read(missing, 0, 1)


def test_5xx_and_throttling_are_retried(s3: S3Server, aws_env: pytest.MonkeyPatch) -> None:
    """Faults from a front server, which drops signatures: a public-read object, read anonymously, with moto's
    IAM checks off meanwhile."""
    data = random.Random(9).randbytes(100_000)
    blob_id = hashlib.sha256(data).hexdigest()
    s3.client().put_object(Bucket=BUCKET, Key=PREFIX + blob_id, Body=data, ACL="public-read")
    sleeps: list[float] = []
    with s3.open_access(), Front(upstream=s3.endpoint, match=f"/{BUCKET}/") as front:
        with make_backend("s3", **s3.options(endpoint=front.url, anonymous=True), sleep=sleeps.append) as b:
            front.inject("500", "503", "429")
            assert b.read(blob_id, 100, 1000) == data[100:1100]
            assert b.stats.retries == 3 and len(sleeps) == 3
            front.inject("500", "500", "500", "500")
            with pytest.raises(BackendError, match=r"HTTP 500 .*\(after 4 attempts\)"):
                b.read(blob_id, 0, 10)


def test_options() -> None:
    opts = S3Options(bucket="b", endpoint="minio.example:9000", region="r", anonymous=True)
    assert opts.base == "https://minio.example:9000/b"  # a bare host means https; any endpoint: path style
    virtual = S3Options(bucket="b", endpoint="http://minio.example:9000", addressing_style="virtual", anonymous=True)
    assert virtual.base == "http://b.minio.example:9000"
    assert S3Options(bucket="my-bucket", region="ap-south-1", anonymous=True).base == (
        "https://my-bucket.s3.ap-south-1.amazonaws.com"  # AWS: virtual-hosted for a DNS-safe name
    )
    assert S3Options(bucket="My_Bucket", region="r").base == "https://s3.r.amazonaws.com/My_Bucket"
    for bad, msg in [({}, "needs bucket"), ({"bucket": "a/b"}, "not valid"),
                     ({"bucket": "b", "addressing_style": "dns"}, "addressing_style"),
                     ({"bucket": "b", "endpoint": "ftp://x"}, "s3 endpoint")]:  # fmt: skip
        with pytest.raises(BackendError, match=msg):
            make_backend("s3", anonymous=True, **bad)
    with pytest.raises(BackendError, match="go together"):
        make_backend("s3", bucket="b", access_key_id="x")
    b = make_backend("s3", bucket="b", anonymous="true", retry_limit="1", proxy="http://127.0.0.1:1")
    assert b.retry_policy.attempts == 2 and b.transport.proxy is not None  # text options typed; proxy applies
    b.close()


def test_without_botocore_one_line() -> None:
    code = ("import sys; sys.modules['botocore'] = None\n"
            "from cachefilesd_py.backends import make_backend\n"
            "try:\n    make_backend('s3', bucket='b')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.stdout.startswith("BackendError backend s3 needs botocore") and "nydus-erofs[s3]" in out.stdout
    assert out.stdout.count("\n") == 1, out.stdout + out.stderr


# --- nydus-erofs build → upload → mount --backend s3 ----------------------------------------------------------


def _tree(root: Path) -> Path:
    rnd = random.Random(3)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "big.bin").write_bytes(rnd.randbytes(3 << 20))
    (root / "small.txt").write_text("a small file\n" * 50)
    (root / "dir" / "empty").write_bytes(b"")
    (root / "dir" / "link").symlink_to("../small.txt")
    for i in range(20):
        (root / "dir" / f"f{i}.dat").write_bytes(rnd.randbytes(rnd.randrange(1, 200_000)))
    return root


@pytest.fixture(scope="module")
def image(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source tree, image dir) built with nydus-erofs, its blobs uploaded to the bucket."""
    base = tmp_path_factory.mktemp("s3img")
    src = _tree(base / "src")
    out = base / "out"
    r = run("build", src, "--output-dir", out, "--compressor", "zstd")
    assert r.returncode == 0, r.stderr
    blobs = sorted((out / "blobs").iterdir())
    assert blobs
    for path in blobs:
        assert _upload(s3, path.read_bytes()) == path.name
    return src, out


def _mount(s3: S3Server, boot: Path, mp: Path, tmp: Path, env: dict[str, str],
           **extra: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    config = {"endpoint": s3.endpoint, "bucket": BUCKET, "region": REGION, "prefix": PREFIX, **extra}
    return run("mount", boot, mp, "--cache-dir", tmp / "cache", "--mode", "fanotify", "--backend", "s3",
               "--backend-config", ",".join(f"{k}={v}" for k, v in config.items()), env=env, timeout=120)  # fmt: skip


@pytest.fixture
def cli_env(tmp_path: Path, aws_env: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = {**os.environ, "NYDUS_EROFS_RUN_DIR": str(tmp_path / "run")}
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        yield env
    finally:
        if os.path.ismount(mp):
            r = run("umount", mp, env=env, timeout=60)
            if os.path.ismount(mp):
                subprocess.run(["umount", "-l", str(mp)], check=False)
            assert r.returncode == 0, r.stderr


@pytest.mark.kernel("erofs", "fanotify")
@pytest.mark.root
def test_mount_from_s3_equals_the_source(s3: S3Server, image: tuple[Path, Path], tmp_path: Path,
                                         cli_env: dict[str, str]) -> None:  # fmt: skip
    src, out = image
    mp = tmp_path / "mnt"
    env = {**cli_env, "AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret}  # from the environment
    r = _mount(s3, out / "image.boot", mp, tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert os.path.ismount(mp)
    assert_same_tree(src, mp)
    r = run("umount", mp, "--json", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mp)
    backend = json.loads(r.stdout)["stats"]["backend"]
    assert backend["requests"] > 0 and backend["errors"] == 0 and backend["latency_count"] > 0


@pytest.mark.kernel("erofs", "fanotify")
@pytest.mark.root
def test_mount_with_wrong_credentials_fails_in_one_line(s3: S3Server, image: tuple[Path, Path], tmp_path: Path,
                                                        cli_env: dict[str, str]) -> None:  # fmt: skip
    _, out = image
    mp = tmp_path / "mnt"
    env = {**cli_env, "AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    r = _mount(s3, out / "image.boot", mp, tmp_path, env)
    assert r.returncode != 0 and not os.path.ismount(mp)
    lines = r.stderr.strip().splitlines()
    print(f"exit {r.returncode}: {r.stderr}")
    assert len(lines) == 1 and lines[0].startswith("nydus-erofs: error:"), r.stderr
    assert f"s3 bucket {BUCKET} key {PREFIX}" in lines[0] and "HTTP 403" in lines[0], lines[0]
    # no credentials at all: a usage error before any daemon starts
    env = {k: v for k, v in cli_env.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    r = _mount(s3, out / "image.boot", mp, tmp_path, env)
    assert r.returncode == 2 and "no credentials" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cachefilesd_py_takes_the_s3_backend(tmp_path: Path) -> None:
    """``cachefilesd-py --backend s3 --backend-config ...``: a missing bucket is a usage error before the device is
    opened."""
    base: list[str | Path] = ["--cache-dir", tmp_path / "c", "--images-dir", tmp_path, "--no-supervisor"]
    for config in ([], ["--backend-config", "prefix=x/,region=r"]):
        r = run(*base, "--backend", "s3", *config, "--device", "/nonexistent", prog=CACHEFILESD, timeout=30)
        assert r.returncode == 2, r.stderr
        assert r.stderr == "cachefilesd-py: error: --backend s3 needs --backend-config bucket=...\n"
