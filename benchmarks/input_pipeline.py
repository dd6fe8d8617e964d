"""Input pipeline on full-size X-rays: our loader against Keras' two folder loaders, one run.

    python benchmarks/input_pipeline.py [--images 400] [--size 224] [--epochs 3] [--workdir DIR]

1. Writes a `chest_xray`-layout folder (NORMAL/, PNEUMONIA/) of `--images` full-size JPEGs made
   from the 16 real X-rays in ../shared/data/chest_xray_sample: random crops of 80-100 % of
   each side, mirrored at random, re-encoded at quality 85-95 (nothing is downloaded).
2. First epoch (every image decoded and resized to `--size` grayscale, batches of 16), images/s
   of: Keras' legacy `ImageDataGenerator.flow_from_directory` (what the notebooks use),
   `keras.utils.image_dataset_from_directory`, and the platform's `data.pipeline.make_dataset`
   with full JPEG decoding and with DCT-scaled decoding (its default), and as a sweep's later
   trials and workers read them: decoded once into `data/decoded_cache.py`'s file.
3. Stall: the practitioners' 224 px CNN (benchmarks/step_cost.py, at trainer.precision=auto,
   fused batch-norm) trained for `--epochs` epochs on the platform's train pipeline (shuffle,
   uint8 cache, scaling per batch) and on the same images already in memory as float32
   tensors; the ratio of their median epoch times after the first.

The last line holds the headline ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = Path(os.environ.get("XRAY_SAMPLE_DIR")
              or REPO.parent / "shared" / "data" / "chest_xray_sample")


def make_folder(root: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` realistic full-size JPEGs under root/{NORMAL,PNEUMONIA}, from the real samples."""
    rng = np.random.default_rng(seed)
    sources = sorted(SAMPLE.rglob("*.jpeg"))
    if not sources:
        raise FileNotFoundError(f"no sample X-rays under {SAMPLE}")
    paths = []
    for i in range(n):
        source = sources[i % len(sources)]
        image = Image.open(source).convert("L")
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = image.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        path = root / source.parent.name / f"{source.stem}-{i:04d}.jpeg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=int(rng.integers(85, 96)))
        paths.append(path)
    return paths


def legacy_generator(root: Path, size: int) -> float:
    """Seconds for one pass of ImageDataGenerator.flow_from_directory."""
    import tensorflow as tf

    generator = tf.keras.preprocessing.image.ImageDataGenerator(rescale=1 / 255)
    flow = generator.flow_from_directory(
        str(root), target_size=(size, size), color_mode="grayscale", class_mode="binary",
        batch_size=16, shuffle=True, seed=0)
    start = time.perf_counter()
    for i in range(len(flow)):
        flow[i]
    return time.perf_counter() - start


def keras_dataset(root: Path, size: int) -> float:
    """Seconds for one pass of keras.utils.image_dataset_from_directory (scaled to [0, 1])."""
    import keras

    start = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(
        str(root), image_size=(size, size), color_mode="grayscale", batch_size=16,
        label_mode="binary", shuffle=True, seed=0, verbose=False)
    for _ in dataset.map(lambda x, y: (x / 255.0, y)):
        pass
    return time.perf_counter() - start


def ours(paths: list[Path], size: int, dct: bool) -> float:
    """Seconds for one pass of the platform's pipeline over the paths (decode, resize, cache)."""
    from data import pipeline

    pipeline.DCT_SCALING = dct
    labels = np.array([int(p.parent.name == "PNEUMONIA") for p in paths])
    start = time.perf_counter()
    dataset = pipeline.make_dataset(
        np.array([str(p) for p in paths]), labels, binary=True, image_size=size, channels=1,
        batch_size=16, training=False, seed=0)
    for _ in dataset:
        pass
    pipeline.DCT_SCALING = True
    return time.perf_counter() - start


def ours_cached(paths: list[Path], size: int, cache_dir: Path) -> float:
    """Seconds for one pass in a later trial: decoded images from data/decoded_cache.py's file
    (written once by an untimed first call), then the same pipeline over them."""
    from data import pipeline
    from data.decoded_cache import decoded_images

    decoded_images(paths, size, 1, cache_dir)  # the sweep's first trial wrote it
    labels = np.array([int(p.parent.name == "PNEUMONIA") for p in paths])
    start = time.perf_counter()
    images = np.asarray(decoded_images(paths, size, 1, cache_dir))
    dataset = pipeline.make_dataset(images, labels, binary=True, image_size=size, channels=1,
                                    batch_size=16, training=False, seed=0)
    for _ in dataset:
        pass
    return time.perf_counter() - start


def epoch_times(dataset, steps: int, epochs: int) -> list[float]:
    """Seconds per epoch of the practitioners' CNN fitted on `dataset`."""
    import keras

    from benchmarks.step_cost import practitioners_cnn
    from models.fused_batch_norm import fuse_batch_norm
    from models.precision import dtype_policy, resolve_precision

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    with dtype_policy(resolve_precision("auto", has_gpu=False)):
        model = practitioners_cnn("full")
    fuse_batch_norm(model)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    times: list[float] = []
    marks = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda *_: times.append(-time.perf_counter()),
        on_epoch_end=lambda *_: times.__setitem__(-1, times[-1] + time.perf_counter()))
    model.fit(dataset, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[marks])
    return times


def stall(paths: list[Path], size: int, epochs: int) -> tuple[float, float]:
    """Median epoch seconds after the first: platform train pipeline, in-memory tensors."""
    import tensorflow as tf

    from data import pipeline

    labels = np.array([int(p.parent.name == "PNEUMONIA") for p in paths], dtype=np.float32)
    steps = len(paths) // 16
    real = pipeline.make_dataset(
        np.array([str(p) for p in paths]), labels, binary=True, image_size=size, channels=1,
        batch_size=16, training=True, seed=0)
    images = np.concatenate([x.numpy() for x, _ in pipeline.make_dataset(
        np.array([str(p) for p in paths]), labels, binary=True, image_size=size, channels=1,
        batch_size=16, training=False, seed=0)])
    memory = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).cache().repeat()
    for _ in memory.take(steps):  # materialise the cache: tensors already in memory
        pass
    real_times = epoch_times(real, steps, epochs)
    memory_times = epoch_times(memory, steps, epochs)
    return statistics.median(real_times[1:]), statistics.median(memory_times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="xray-folder-"))) / "chest_xray"
    paths = sorted(root.rglob("*.jpeg")) if root.exists() else []
    if len(paths) != args.images:
        paths = make_folder(root, args.images)
    megapixels = statistics.mean(np.prod(Image.open(p).size) for p in paths) / 1e6
    print(f"{len(paths)} JPEGs under {root}, {megapixels:.2f} MP on average; target "
          f"{args.size} px grayscale, batches of 16", flush=True)
    contenders = {
        "ImageDataGenerator.flow_from_directory": lambda: legacy_generator(root, args.size),
        "image_dataset_from_directory": lambda: keras_dataset(root, args.size),
        "ours, full decode": lambda: ours(paths, args.size, dct=False),
        "ours (DCT-scaled decode)": lambda: ours(paths, args.size, dct=True),
        "ours, later trials (decoded cache)": lambda: ours_cached(
            paths, args.size, root.parent / "decoded"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):  # alternating, so drift hits every contender alike
        for name, run in contenders.items():
            seconds[name].append(run())
    print("| first epoch | images/s | x legacy |\n|---|---|---|")
    legacy = len(paths) / min(seconds["ImageDataGenerator.flow_from_directory"])
    for name, values in seconds.items():
        rate = len(paths) / min(values)
        print(f"| {name} | {rate:.0f} | {rate / legacy:.2f} |", flush=True)
    real, memory = stall(paths, args.size, args.epochs)
    print(f"epoch after the first: platform pipeline {real:.2f} s, tensors in memory "
          f"{memory:.2f} s")
    ours_rate = len(paths) / min(seconds["ours (DCT-scaled decode)"])
    later = len(paths) / min(seconds["ours, later trials (decoded cache)"])
    print(f"first epoch ours / legacy generator: {ours_rate / legacy:.2f}x in a sweep's first "
          f"trial, {later / legacy:.1f}x in later ones; "
          f"epoch time pipeline / in memory: {real / memory:.3f}")


if __name__ == "__main__":
    main()
