"""A real Ray cluster on 127.0.0.1, started with ``ray start`` as a user would, for the tests here."""
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Ray Train's controller polls its workers every 2 s by default, and a run waits for it at the start, at
# each report and at the end; the tiny runs here poll every 0.5 s (the train loop bundles reports to suit).
# Every Ray the tests start, in this process or in a command's, inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_ray_cluster(head_resources: dict | None = None, extra_nodes: tuple[dict, ...] = (),
                      private_dir: Path | None = None):
    """Yields ``(gcs_address, dashboard_url, env)``; ``extra_nodes`` are custom resources of further nodes.

    With ``private_dir``, each further node runs in its own mount namespace with a fresh tmpfs over that
    folder: what it writes there the head never sees, and it does not see the head's files there either
    (two machines that share no disk). Needs root and ``unshare``."""
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           # Ray 2.60 protects the dashboard with a token: the cluster and its clients share one.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2"]
    commands = [[ray, "start", "--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", *common,
                 f"--resources={json.dumps(head_resources or {})}"]]
    for resources in extra_nodes:
        command = [ray, "start", f"--address=127.0.0.1:{gcs}", *common, f"--resources={json.dumps(resources)}"]
        if private_dir is not None:  # ray start returns at once; its daemons keep the namespace
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f'mount -t tmpfs tmpfs "{private_dir}" && exec "$@"', "node", *command]
        commands.append(command)
    try:
        for command in commands:
            started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


# moto takes any credentials: a secret to look for where none may be written
S3_SECRET = "moto-secret-never-to-be-logged"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server():
    """An S3-compatible server (moto) over HTTP on 127.0.0.1 and a random port. Yields its endpoint URL;
    the AWS variables a user would set (endpoint, region, test credentials) are set while it runs."""
    import time
    import urllib.request
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {key: os.environ.get(key) for key in [*S3_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_bucket(name: str) -> None:
    from pyarrow.fs import S3FileSystem
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                 allow_bucket_creation=True).create_dir(name)


@contextlib.contextmanager
def mlflow_server(store: Path, artifacts_destination: str, env: dict | None = None):
    """``mlflow server`` on 127.0.0.1 and a random port, proxying artifacts to ``artifacts_destination``
    (as on a cluster: every client, whatever its node, uploads through the server). Yields its URL."""
    import time
    import urllib.request
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}",
         "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


# ----------------------------------------------------------------------------- trained runs several modules use

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _trained_run(root: Path, experiment: str, name: str, *overrides: str) -> dict:
    """``experiments/<experiment>.yaml`` run through the command as a user runs it, into ``root``."""
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient
    sets = [f"output_dir={root}", f"data.synthetic.root={root}/synthetic", *overrides]
    result = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(EXPERIMENTS / f"{experiment}.yaml"),
                             *sum((["--set", item] for item in sets), [])], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return {"root": root, "run_dir": root / experiment, "uri": uri, "run": run, "stdout": result.stdout}


@pytest.fixture(scope="session")
def trained_segmentation(tmp_path_factory):
    """The tiny segmentation experiment on two Ray Train workers (2 x 4 images a step)."""
    return _trained_run(tmp_path_factory.mktemp("segmentation"), "tiny_segmentation", "e3va-tiny-segmentation",
                        "scaling.workers=2")


@pytest.fixture(scope="session")
def trained_classification(tmp_path_factory):
    """The tiny classification experiment (its frozen backbone is the tiny detection and segmentation ones')."""
    return _trained_run(tmp_path_factory.mktemp("classification"), "tiny_classification", "e3va-tiny-classification")
