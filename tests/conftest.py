"""Shared test fixtures."""

from __future__ import annotations

import http.server
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import docker.errors
import pytest
from click.testing import CliRunner, Result

import docker
from orchestrator.backends.docker.engine import build_image, connect
from orchestrator.cli.commands import main
from orchestrator.runs.ddp import DdpPlan
from orchestrator.runs.names import DDP_KEY
from orchestrator.runs.plan import LaunchPlan
from orchestrator.runs.status import WorkerState
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


# --- Docker engine fixtures (container layer) ---------------------------------------------
# Tests that need an engine are skipped where none answers, except in CI (CI=true), where
# a missing engine or base image is a failure: .ci/docker-setup.sh must have provided them.

BASE_IMAGE = os.environ.get("EVOLVECTL_BASE_IMAGE", "evolvectl-base:torch")
# A tag of its own (EVOLVECTL_TEST_IMAGE) keeps two checkouts that test on one engine from
# replacing each other's image mid-run.
TEST_IMAGE = os.environ.get("EVOLVECTL_TEST_IMAGE", "evolvectl:test")


def docker_unavailable(reason: str, fix: str = "run .ci/docker-setup.sh before the tests") -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: {fix})")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = connect()
    except UserError as error:
        docker_unavailable(error.message)
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    """The local stand-in for the PyTorch base image (Debian + /venv with torch)."""
    try:
        docker_client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        docker_unavailable(f"base image {BASE_IMAGE} not found: run .ci/docker-setup.sh")
    return BASE_IMAGE


def download_wheels(destination: Path) -> None:
    """The image's small dependencies as wheels, fetched with this machine's pip settings."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = project["build-system"]["requires"] + project["project"]["dependencies"]
    wanted = [requirement for requirement in requirements if not requirement.startswith("torch")]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--dest", str(destination), *wanted],
        check=True,
    )


@pytest.fixture(scope="session")
def worker_image(docker_client: docker.DockerClient, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real docker/Dockerfile built on the local base, offline from downloaded wheels.

    The build runs on a copy of the project so the wheels never land in the working tree.
    """
    context = tmp_path_factory.mktemp("image") / "context"
    heavy = shutil.ignore_patterns(".git", "runs", "datasets", "__pycache__", "*.pt", ".pytest_cache", "wheels")
    shutil.copytree(ROOT, context, ignore=heavy)
    download_wheels(context / "docker" / "wheels")
    build_image(docker_client, TEST_IMAGE, context, base_image=base_image, build_args={"OFFLINE": "1"})
    return TEST_IMAGE


# --- end of Docker engine fixtures ---------------------------------------------------------


# --- Trainer fixtures (datasets and a trained run) ----------------------------------------

def write_data_yaml(folder: Path, train: int, val: int, size: int, seed: int = 0,
                    root: str | Path | None = None) -> Path:
    """`folder`/data.yaml: a built-in-style synthetic dataset generating into `root` (an absolute
    path, as the process that reads the YAML sees it; default `folder`/data)."""
    import yaml

    names = ["disc", "square", "triangle", "cross", "ring", "diamond"]
    config = {"path": str(root or folder / "data"), "train": "images/train", "val": "images/val", "names": names,
              "synthetic": {"seed": seed, "train": train, "val": val, "size": size}}
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 training and 16 validation images of 64 px: enough for plumbing, not for learning."""
    return write_data_yaml(tmp_path_factory.mktemp("tiny"), train=32, val=16, size=64)


def run_trainer(*args: str, cwd: Path, timeout: float = 600,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS` as a user runs it; output captured for assertions."""
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# --- CLI helpers --------------------------------------------------------------------------

def invoke(*arguments: str) -> Result:
    """`evolvectl ARGUMENTS` in-process; an exception is kept in the result for the test to check."""
    return CliRunner().invoke(main, list(arguments))


def assert_one_line_error(result: Result, starts_with: str) -> None:
    """A user mistake: a non-zero exit and one line, `Error: ...`, never a traceback."""
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: {starts_with}"), result.output


class FakeBackend:
    """Records the plans `start` and `ddp` ask it to run; sees the GPUs it is told to."""

    name = "docker"

    def __init__(self, gpus: list[int] | None) -> None:
        self.gpus = gpus
        self.plans: list[LaunchPlan | DdpPlan] = []

    def prepare(self, say: object) -> None:
        pass

    def visible_gpus(self) -> list[int] | None:
        return self.gpus

    def start(self, plan: LaunchPlan, say: object) -> list[str]:
        self.plans.append(plan)
        return [slot.key for slot in plan.slots]

    def start_ddp(self, plan: DdpPlan, say: object) -> list[str]:
        self.plans.append(plan)
        return [DDP_KEY]

    def workers(self, run: str, run_dir: Path) -> list[WorkerState]:
        return []


# --- CLI helpers for end-to-end tests ------------------------------------------------------

def cli(*arguments: str) -> Result:
    """`evolvectl ARGUMENTS` in-process, as a user types it; exceptions are not swallowed."""
    return CliRunner().invoke(main, list(arguments), catch_exceptions=False)


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "the condition",
             poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def attach_until(arguments: list[str], marker: str, timeout_s: float) -> tuple[str, str, int]:
    """Run `evolvectl attach ...` until `marker` appears, then press Ctrl-C; returns (stdout, stderr, exit code)."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "orchestrator", "attach", *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=environment)
    seen = b""
    deadline = time.monotonic() + timeout_s
    try:
        while marker.encode() not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if ready:
                seen += os.read(process.stdout.fileno(), 65536)
        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=30)
    finally:
        process.kill()
    return (seen + rest).decode(errors="replace"), errors.decode(errors="replace"), process.returncode


# --- A real HTTP server on the loopback address ---------------------------------------------

class FileServer(http.server.ThreadingHTTPServer):
    """Serves `files` by path; the first request for a path in `cut` stops after half the body."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        path, wanted = self.path, self.headers.get("Range")
        self.server.requests.append((path, wanted))
        body = self.server.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted else 0
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if path in self.server.cut:
            self.server.cut.discard(path)
            self.wfile.write(body[start:start + len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FileServer]:
    running = FileServer()
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running
    running.shutdown()
    running.server_close()
