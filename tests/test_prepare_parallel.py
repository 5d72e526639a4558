"""Face preparation in worker processes (``load_faces(workers=...)``), on small real LFW slices: the same faces as in
one process, resumable after an interruption, bad files counted alike, failing workers loud and never left behind."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import common.data.datasets as datasets
from common.data.datasets import PreparationError, PrepStats, load_faces
from common.data.faceset import FaceSet

# Six LFW people with 12 photos each (72 photos; with 2 workers each is split into chunks of 5).
PEOPLE = ("Adrien_Brody", "Anna_Kournikova", "Harrison_Ford", "Howard_Dean", "Jeb_Bush", "Keanu_Reeves")


def _load(root: Path, cache: Path, *, mode: str = "dlib", workers: int, names=PEOPLE, progress: bool = False,
          stats: PrepStats | None = None) -> FaceSet:
    return load_faces(root, image_size=150 if mode == "dlib" else 64, mode=mode, identities=names, min_images=1,
                      cache_dir=cache, progress=progress, workers=workers, stats=stats)


def _assert_same(a: FaceSet, b: FaceSet) -> None:
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.identities == b.identities and a.paths == b.paths and a.skipped == b.skipped


def _cache_files(cache: Path) -> dict[str, tuple[int, int]]:
    """identity -> (inode, mtime_ns) of its cache file: a rewritten file (atomic rename) gets a new inode."""
    return {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*.pt")}


def _no_children_left() -> bool:
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not multiprocessing.active_children()


@pytest.fixture(scope="module")
def single(lfw_root: Path, tmp_path_factory) -> FaceSet:
    """The dlib chips of PEOPLE computed in this process (today's path)."""
    stats = PrepStats()
    faces = _load(lfw_root, tmp_path_factory.mktemp("single"), workers=1, stats=stats)
    assert stats.workers == 1 and stats.photos == 72 and len(faces) == 72
    return faces


@pytest.fixture
def pool_for_few(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the workers even for these few photos (whether a pool pays is decided in this process)."""
    monkeypatch.setattr(datasets, "POOL_START_SECONDS", 0.0)


def test_two_workers_give_the_same_dlib_chips(lfw_root: Path, tmp_path: Path, single: FaceSet, pool_for_few):
    stats = PrepStats()
    pooled = _load(lfw_root, tmp_path, workers=2, stats=stats)
    assert (stats.workers, stats.photos, stats.identities, stats.cached_identities) == (2, 72, 6, 0)
    _assert_same(pooled, single)
    again = PrepStats()  # what the workers cached is read back as it is
    _assert_same(_load(lfw_root, tmp_path, workers=2, stats=again), single)
    assert (again.photos, again.workers, again.cached_identities) == (0, 0, 6)


def test_two_workers_give_the_same_crops_with_a_progress_bar(lfw_root: Path, tmp_path: Path, pool_for_few):
    stats = PrepStats()
    pooled = _load(lfw_root, tmp_path / "pool", mode="crop", workers=2, progress=True, stats=stats)
    assert stats.workers == 2
    _assert_same(pooled, _load(lfw_root, tmp_path / "single", mode="crop", workers=1))


def test_a_rerun_computes_only_the_identities_not_cached(lfw_root: Path, tmp_path: Path, single: FaceSet,
                                                         pool_for_few):
    _load(lfw_root, tmp_path, workers=2, names=PEOPLE[:3])
    before = _cache_files(tmp_path)
    assert sorted(before) == sorted(PEOPLE[:3])
    stats = PrepStats()
    resumed = _load(lfw_root, tmp_path, workers=2, stats=stats)
    assert (stats.identities, stats.photos, stats.cached_identities, stats.workers) == (3, 36, 3, 2)
    after = _cache_files(tmp_path)
    assert sorted(after) == sorted(PEOPLE)
    assert {name: after[name] for name in PEOPLE[:3]} == before  # untouched
    _assert_same(resumed, single)


def test_an_interrupted_preparation_keeps_what_it_finished(lfw_root: Path, tmp_path: Path, pool_for_few,
                                                           monkeypatch: pytest.MonkeyPatch):
    real_write, written = datasets._write_cache, []

    def write_then_interrupt(path, *args, **kwargs):
        real_write(path, *args, **kwargs)
        written.append(path.stem)
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the workers are busy with the other identities

    monkeypatch.setattr(datasets, "_write_cache", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _load(lfw_root, tmp_path, mode="crop", workers=2)
    assert _no_children_left()
    assert sorted(_cache_files(tmp_path)) == sorted(written)

    monkeypatch.setattr(datasets, "_write_cache", real_write)
    stats = PrepStats()
    resumed = _load(lfw_root, tmp_path, mode="crop", workers=2, stats=stats)
    assert stats.identities == len(PEOPLE) - 2 and stats.cached_identities == 2
    _assert_same(resumed, _load(lfw_root, tmp_path / "fresh", mode="crop", workers=1))


def test_unreadable_images_are_skipped_and_counted_alike(lfw_root: Path, tmp_path: Path, pool_for_few):
    data = tmp_path / "data"
    for name in PEOPLE[:3]:
        shutil.copytree(lfw_root / name, data / name)
    broken = sorted((data / PEOPLE[1]).glob("*.jpg"))
    broken[0].write_bytes(os.urandom(3000))  # garbage
    broken[5].write_bytes(broken[6].read_bytes()[:700])  # truncated
    (data / PEOPLE[2] / "notes.txt").write_text("not an image")
    faces = {}
    for workers in (1, 2):
        stats = PrepStats()
        faces[workers] = _load(data, tmp_path / f"cache-{workers}", mode="crop", workers=workers,
                               names=PEOPLE[:3], stats=stats)
        assert stats.workers == workers
    _assert_same(faces[2], faces[1])
    assert faces[2].skipped == {"unreadable": 2, "not-an-image": 1}
    assert len(faces[2]) == 34 and f"{PEOPLE[1]}/{broken[0].name}" not in faces[2].paths


def _failing_chunk(*args):
    raise ImportError("libdlib.so: cannot open shared object file")  # as a broken dlib install would


def _dying_chunk(*args):
    os._exit(3)  # as a worker killed by a crash in native code would


@pytest.mark.parametrize("task, words", [(_failing_chunk, "ImportError: libdlib.so"), (_dying_chunk, "died")])
def test_a_failing_worker_fails_loudly_and_leaves_no_process(lfw_root: Path, tmp_path: Path, pool_for_few,
                                                            monkeypatch: pytest.MonkeyPatch, task, words):
    monkeypatch.setattr(datasets, "_prepare_chunk", task)  # what the workers are handed
    with pytest.raises(PreparationError, match=words) as raised:
        _load(lfw_root, tmp_path, mode="crop", workers=2)
    message = str(raised.value)
    assert "\n" not in message and "--workers 1" in message
    assert _no_children_left()
    assert not _cache_files(tmp_path)


def test_the_number_of_workers(monkeypatch: pytest.MonkeyPatch, lfw_root: Path, tmp_path: Path):
    monkeypatch.setenv(datasets.PREP_WORKERS_ENV, "3")
    assert datasets._resolve_workers(None) == 3 and datasets._resolve_workers(2) == 2
    monkeypatch.delenv(datasets.PREP_WORKERS_ENV)
    assert datasets._resolve_workers(None) == len(os.sched_getaffinity(0))
    monkeypatch.setenv(datasets.PREP_WORKERS_ENV, "none")
    with pytest.raises(ValueError, match=datasets.PREP_WORKERS_ENV):
        datasets._resolve_workers(None)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            _load(lfw_root, tmp_path, mode="crop", workers=bad)
    stats = PrepStats()  # few photos: computed in this process whatever the number of workers
    _load(lfw_root, tmp_path, mode="dlib", workers=4, names=PEOPLE[:1], stats=stats)
    assert stats.workers == 1 and stats.photos == 12
