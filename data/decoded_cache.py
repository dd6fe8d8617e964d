"""Decoded images of a folder source, shared by every trial and worker that reads it.

A sweep over full-size X-rays decodes the same JPEGs in every trial: libjpeg's entropy
decoding costs about 3 ms per 1.5 MP image and core whatever the target size (DCT scaling
only shortens the inverse transform), so a 5,856-image folder costs each trial about 10 s on
2 cores before its first step. tf.data's own `cache(filename)` would keep them, but its files
belong to one pipeline and refuse a second writer ("concurrent caching iterator"), which
parallel sweep workers are. Here the whole folder is decoded once into one uint8 `.npy` file
named by a hash of the files (path, size, mtime), the target size, channels and decoder, and
written under a temporary name then renamed, so concurrent writers are harmless (the last
rename wins with identical bytes) and a killed one leaves nothing half-written. Readers get the
file memory-mapped (`np.load(mmap_mode="r")`); `data.pipeline.make_dataset` copies it into
memory when it fits the memory budget, else reads it image by image from the page cache.
The folder is kept under $XRAY_DECODED_CACHE_GB (20 GB by default), least recently used first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Part of every key: a change of the decoding maths must not reuse old pixels.
DECODER_VERSION = "tf-decode-dct2x-v2"


def default_cache_dir() -> Path:
    """`decoded/` in the project's cache folder (data/splits.py `cache_root`)."""
    from data.splits import cache_root

    return cache_root() / "decoded"


def cache_key(paths: Sequence[str | Path], image_size: int, channels: int) -> str:
    """A hash of the decoder, the target shape and each file's path, size and mtime."""
    from data import pipeline

    digest = hashlib.sha256(
        f"{DECODER_VERSION}|dct={pipeline.DCT_SCALING}|{image_size}|{channels}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _decode_into(out: np.ndarray, paths: Sequence[str], image_size: int, channels: int) -> None:
    """Decode `paths` into `out` with the pipeline's decoder, in parallel, in order."""
    import tensorflow as tf

    from data.pipeline import decode_to_uint8, usable_cpus

    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(paths, dtype=str)).map(
        lambda path: decode_to_uint8(tf.io.read_file(path), image_size, channels),
        num_parallel_calls=usable_cpus(), deterministic=True).batch(256).prefetch(2)
    start, last_log = 0, time.monotonic()
    for batch in dataset:
        out[start:start + len(batch)] = batch.numpy()
        start += len(batch)
        if time.monotonic() - last_log > 10:  # people see progress on a long first decode
            logger.info("decoding images: %d / %d", start, len(paths))
            last_log = time.monotonic()


def decoded_images(paths: Sequence[str | Path], image_size: int, channels: int,
                   cache_dir: str | os.PathLike) -> np.ndarray:
    """uint8 (N, image_size, image_size, channels) of `paths`, memory-mapped from the cache.

    Decodes and writes the cache file on a miss. An unwritable cache folder is reported once
    and the images are decoded into memory instead: a cache must never stop a run.
    """
    paths = [str(p) for p in paths]
    shape = (len(paths), image_size, image_size, channels)
    folder = Path(cache_dir).expanduser()
    file = folder / f"{cache_key(paths, image_size, channels)}.npy"
    if file.exists():
        try:
            images = np.load(file, mmap_mode="r")
            if images.shape == shape and images.dtype == np.uint8:
                logger.info("decoded images from the cache %s", file)
                os.utime(file)  # recently used: evicted last (atime is unreliable, mtime is not)
                return images
        except (OSError, ValueError):
            pass  # a damaged file: decode again and replace it
        logger.warning("decoded-image cache %s is unreadable or stale; decoding again", file)
    started = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{file.stem}.{os.getpid()}.tmp.npy"
        images = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as error:
        logger.warning("decoded-image cache folder %s is not writable (%s); decoding into "
                       "memory for this run only (set data.decoded_cache)", folder, error)
        images = np.empty(shape, np.uint8)
        _decode_into(images, paths, image_size, channels)
        return images
    try:
        _decode_into(images, paths, image_size, channels)
        images.flush()
        del images
        os.replace(temporary, file)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("decoded %d images in %.1f s into the cache %s", len(paths),
                time.perf_counter() - started, file)
    evict(folder, keep=file)
    return np.load(file, mmap_mode="r")


def cache_budget() -> int:
    """Bytes the decoded files may take together: $XRAY_DECODED_CACHE_GB (default 20)."""
    return int(float(os.environ.get("XRAY_DECODED_CACHE_GB", "20")) * 1024**3)


def evict(folder: Path, keep: Path) -> list[Path]:
    """Delete the least recently used decoded files until the folder fits `cache_budget()`;
    `keep` (the file just written) stays whatever its size. Returns the deleted files. A file
    another process has open stays readable until it closes it (POSIX unlink)."""
    files = []
    for path in folder.glob("*.npy"):
        try:
            stat = path.stat()
        except OSError:  # deleted by another worker meanwhile
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total, budget, deleted = sum(size for _, size, _ in files), cache_budget(), []
    for _, size, path in sorted(files):
        if total <= budget:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        deleted.append(path)
        logger.info("decoded-image cache over %.1f GB: removed the least recently used %s",
                    budget / 1024**3, path.name)
    return deleted


def memory_budget() -> int:
    """Bytes of decoded images a run may hold in memory: a quarter of what is available now."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 2 * 1024**3



def _checks_file() -> Path:
    return default_cache_dir() / "decode_checks.json"


def load_decode_checks() -> dict[tuple[str, int, int], bool]:
    """Which files the decoder rejected, by (path, size, mtime), as the cache folder records."""
    try:
        rows = json.loads(_checks_file().read_text())
        return {(str(p), int(size), int(mtime)): bool(bad) for p, size, mtime, bad in rows}
    except (OSError, ValueError, TypeError):
        return {}


def save_decode_checks(found: dict[tuple[str, int, int], bool]) -> None:
    """Merge `found` into the record and replace it atomically; a lost race between workers
    only costs a later one a re-check, and an unwritable folder only the saving."""
    merged = {**load_decode_checks(), **found}
    path = _checks_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps([[*key, bad] for key, bad in merged.items()]))
        os.replace(temporary, path)
    except OSError as error:
        logger.debug("decode checks not saved (%s)", error)


def _said_file() -> Path:
    return default_cache_dir() / "warnings_said.json"


def first_time(key: str) -> bool:
    """True the first time ``key`` is asked about in this cache folder (then recorded), False
    after: a warning about the same data is said once, not on every run and dry-run trial.
    An unreadable record says yes again (a repeated warning beats a lost one)."""
    path = _said_file()
    try:
        said = set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        said = set()
    if key in said:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(sorted(said | {key})))
        os.replace(temporary, path)
    except OSError as error:
        logger.debug("said-warnings record not saved (%s)", error)
    return True
