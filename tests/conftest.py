"""Shared fixtures: where the real data lives, and small real slices of it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (pyproject's addopts: two workers) each worker gets its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# Units of work for pytest-xdist: one test file each (its module fixtures are built once), except the files that share
# the federated_run fixture. The longest units are handed out first; the deployment tests mostly wait on real
# processes, so the other worker's tests run meanwhile.
_SHARED_UNITS = {"test_federation.py": "federation", "test_report.py": "federation"}
_LONGEST_FIRST = ("test_deployment_e2e.py", "test_federation.py", "test_report.py", "test_app_approval_e2e.py",
                  "test_privacy_audit.py", "test_many_sites.py", "test_ray_cluster.py", "test_round_guard.py")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByTestFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return _SHARED_UNITS.get(name, name)

    return ByTestFile(config, log)


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))


def _shared_data() -> Path:
    env = os.environ.get("FACEFL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _require(path: Path, marker: str, what: str) -> Path:
    """``path`` when ``path / marker`` exists; else the test is skipped with where to find the data."""
    if not (path / marker).exists():
        pytest.skip(f"{what} not found at {path} (see ../shared/data/README.md; FACEFL_SHARED_DATA moves it)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(_shared_data(), ".", "shared data folder")


@pytest.fixture(scope="session")
def lfw_root(shared_data: Path) -> Path:
    return _require(shared_data / "lfw", "pairsDevTest.txt", "LFW")


@pytest.fixture(scope="session")
def faces_dir(shared_data: Path) -> Path:
    """The face photos of ``../shared/data/faces`` (portraits, group photos, a photo without a face)."""
    return _require(shared_data / "faces", "lenna.jpg", "face photos")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One face cache for the whole test session, shared by the pytest-xdist workers (the folder above each worker's
    base temp is the run's own), so a face one worker prepared is read, not cut again, by the other. Cache files are
    written atomically; the cache itself is tested in test_datasets."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-face-cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def trained_stylizer(tmp_path_factory, shared_data, lfw_root):
    """A half-width stylizer really trained (briefly, at 64 px) on LFW training faces and a public-domain
    painting, saved and reloaded through the stylizer files."""
    from common.anonymization.style_train import StyleTrainSettings, train_stylizer
    from common.anonymization.styles import load_stylizer, save_stylizer
    from server.stylizers import load_style_image, training_faces

    style = load_style_image(shared_data / "styles" / "neural-style" / "starry_night.jpg")
    faces, _ = training_faces(str(lfw_root), image_size=64, count=64, seed=0)
    settings = dataclasses.replace(StyleTrainSettings(), steps=60, image_size=64, batch_size=4)
    model, history = train_stylizer(style, faces, settings=settings, width="half")
    stem = tmp_path_factory.mktemp("stylizer") / "starry-night-test"
    path = save_stylizer(stem, model, {"style": "starry-night", "width": "half", "work_size": 64,
                                       "style_file": str(shared_data / "styles/neural-style/starry_night.jpg")})
    loaded, meta = load_stylizer(path)
    return loaded, meta, path


# Waits that only a failure runs out (subprocess time limits, conditions polled for, a deployment's round and SecAgg+
# stage timeouts) are written for a quiet 2-core machine and multiplied by PATIENCE, so the suite also passes on a
# shared machine two to four times slower; FACEFL_TEST_PATIENCE sets it (pyproject's pytest timeout is the last net).
PATIENCE = float(os.environ.get("FACEFL_TEST_PATIENCE", "4"))


def patience(seconds: float) -> float:
    """How long to wait for something that takes at most ``seconds`` on a quiet machine."""
    return seconds * PATIENCE


FACEFL = [str(Path(sys.executable).with_name("facefl"))]
MARK = f"facefl-test-{uuid.uuid4().hex}"  # in the environment of every process a facefl command of the tests starts


def marked_processes(mark: str = MARK) -> dict[int, str]:
    """Live processes (not zombies) with ``mark`` in their environment: pid -> command line."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if mark.encode() in (proc / "environ").read_bytes() and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def facefl(*args: str, timeout: float = 600, progress: Path | None = None) -> subprocess.CompletedProcess:
    """Run the ``facefl`` console script (as a user would), marked so that leftover processes can be found.

    Without ``progress`` the command gets ``patience(timeout)`` seconds. With ``progress`` (a run directory) it gets
    as long as it keeps working: it is stopped only after ``patience(timeout)`` seconds in which no file under that
    folder changed, so a long run on a loaded machine finishes while a hung one still fails."""
    env = {**os.environ, "FACEFL_TEST_MARK": MARK}
    if progress is None:
        return subprocess.run(FACEFL + list(args), capture_output=True, text=True, timeout=patience(timeout), env=env)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(FACEFL + list(args), stdout=out, stderr=err, text=True, env=env)
        last_change, newest = time.monotonic(), 0.0
        while proc.poll() is None:
            stamp = _newest_change(progress)
            if stamp > newest:
                last_change, newest = time.monotonic(), stamp
            if time.monotonic() - last_change > patience(timeout):
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(proc.args, patience(timeout), f"no progress in {progress}")
            time.sleep(2.0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def _newest_change(folder: Path) -> float:
    """The latest modification time of a file under ``folder`` (0 when there is none yet)."""
    newest = 0.0
    for path in folder.rglob("*") if folder.exists() else ():
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:  # an atomic write's temporary file, renamed away meanwhile
            continue
    return newest


@pytest.fixture(scope="session")
def federated_run(tmp_path_factory, lfw_root, cache_dir, trained_stylizer) -> Path:
    """A real 2-site, 2-round DP federation of both models on LFW through `facefl simulate` (Flower's simulation
    engine), which writes its report at the end with the test stylizer. Tests that change the run copy it."""
    run = tmp_path_factory.mktemp("federation") / "run"
    # A generous budget keeps the noise small enough for 2 short rounds on ~40 people to show learning;
    # the mechanism (clipping, noise, accounting, declines) is the same at any epsilon.
    done = facefl("simulate", "--data", str(lfw_root), "--sites", "2", "--rounds", "2", "--task", "both",
                  "--epsilon", "50", "--accountant", "rdp", "--out", str(run),
                  "--set", f"cache-dir={cache_dir}", "--set", "max-identities=60", "--set", "validation-people=30", "--set", "eval-pairs=200",
                  "--set", "batch-size=64", "--set", "local-epochs=3", "--set", "eval-faces=32",
                  "--report-stylizer", str(trained_stylizer[2]), progress=run)
    assert done.returncode == 0, done.stdout + done.stderr
    return run


@pytest.fixture(scope="module")
def test_network():
    """A network of namespaces for one test module (``tests/netns.py``): the SuperLink and sites a, b, c, each in its
    own namespace on a bridge; removed at the end even when a test fails. Skips, saying why, where the machine does
    not allow network namespaces."""
    import netns

    why = netns.unavailable()
    if why:
        pytest.skip(why)
    net = netns.build(["superlink", "a", "b", "c"])
    try:
        yield net
    finally:
        net.close()
