"""A worker process for the concurrent-store test (a module of its own so that spawn can import it)."""

import time

from harness.cache import ArtifactStore, save_imageset
from tests.conftest import random_imageset


def put_same_key(root: str, key: str, worker: int, start_at: float) -> str:
    imgs = random_imageset(n=4, size=32, seed=0)
    time.sleep(max(0.0, start_at - time.time()))
    art = ArtifactStore(root).put("mimic", key, lambda f: save_imageset(f, imgs, {"worker": worker}))
    return str(art.path)
