"""Shared pytest fixtures.

``s3_server``: a real S3 API on loopback (``moto_server`` from ``moto[server]``), one per test session, on a free
127.0.0.1 port. While it runs, the standard AWS variables point at it (``AWS_ENDPOINT_URL``, dummy credentials,
``AWS_DEFAULT_REGION``), so s3fs/boto3 code paths talk to it unchanged. It is stopped by its PID at the end.
Use ``s3_bucket`` for a fresh empty bucket per test.

``demo_data``: a factory ``demo_data(limit, source=None) -> (train_npz, test_npz)`` of demo NPZ files (the first
``limit`` images per split, :func:`simflow.data.demo.build_demo`), built once per (limit, source) per session and
shared by every module that asks for the same size; treat the files as read-only. ``demo_npz``: the train file at
the default size (2,000 images) that the training and checkpoint tests use; a module that needs another size
overrides it with ``demo_data(n)[0]``.

``inception_weights``: the path of one randomly initialised torch-fidelity InceptionV3 state dict (seed 0,
:func:`helpers.write_random_inception_weights`), written once per session for every FID test (building and
re-initialising the 24M-parameter network costs seconds each time); read-only.

``one_thread``: one intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
tiny models gain nothing from more, and CI's 2 cores are shared.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import torch

_AWS_VARS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


DEMO_IMAGES = 2000


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from simflow.data.demo import build_demo

    built = {}

    def make(limit: int, source=None):
        if (limit, source) not in built:
            out = tmp_path_factory.mktemp(f"demo{limit}{source or ''}")
            train, test, _ = build_demo(str(out), source=source, limit=limit)
            built[limit, source] = (train, test)
        return built[limit, source]

    return make


@pytest.fixture(scope="module")
def demo_npz(demo_data):
    return demo_data(DEMO_IMAGES)[0]


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    from helpers import write_random_inception_weights

    return write_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "inception_random.pth"), seed=0)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_command(port: int):
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    return [exe, "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL (``http://127.0.0.1:PORT``) of a running moto S3 server; AWS env vars set for the session."""
    port = _free_port()
    proc = subprocess.Popen(_moto_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with status {proc.returncode}")
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start within 30 s")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in [*_AWS_VARS, "AWS_ENDPOINT_URL"]}
    os.environ.update(_AWS_VARS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.kill(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server):
    """Name of a new empty bucket on :func:`s3_server`."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name
