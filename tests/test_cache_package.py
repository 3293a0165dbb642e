"""featkit.cache: the folder as one object, and the one lock every writer takes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import LOGREG, REPO, fitted_cache
from featkit.cache import Cache
from featkit.cache.lock import Lock
from featkit.cache.names import DOWNLOAD_LOCK, cache_file, heads_dir
from featkit.errors import FeatkitError


def test_the_cache_object_opens_lists_verifies_and_chooses(tmp_path):
    _, folder = fitted_cache(tmp_path, n=8)
    cache = Cache(folder)
    assert cache.backbones() == ["vgg16"] and cache.features_path() == cache_file(folder) and cache.heads_dir() == heads_dir(folder)
    with cache.open() as store:
        assert store.n_rows == 24
    [(key, damage, dropped)] = cache.verify()
    assert key == "vgg16" and damage.ok and dropped == 0
    assert list(cache.fitted_heads()) == [LOGREG]
    name, key, path, head, record = cache.choose_head()
    assert name == LOGREG and path == heads_dir(folder) / f"{LOGREG}.joblib" and record["cache_id"]
    with pytest.raises(FeatkitError, match="holds no features of backbone 'resnet50'; it holds: vgg16"):
        cache.resolve("resnet50")


def test_one_lock_refuses_a_second_holder_in_another_process_and_frees_on_release(tmp_path):
    path = tmp_path / DOWNLOAD_LOCK
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from featkit.cache.lock import Lock; from featkit.errors import FeatkitError\n"
            "try:\n    Lock(sys.argv[1], busy='busy: wait for it')\nexcept FeatkitError as e:\n    print(e)\nelse:\n    print('taken')")
    with Lock(path, busy="busy: wait for it"):
        out = subprocess.run([sys.executable, "-c", code, str(path), str(REPO)], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "busy: wait for it", out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", code, str(path), str(REPO)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "taken", out.stdout + out.stderr
    assert path.exists()  # never deleted: two processes must never lock two files of one name

