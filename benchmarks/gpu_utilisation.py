"""GPU utilisation while the 224 px CNN trains: the input pipeline against tensors on hand.

    python benchmarks/gpu_utilisation.py [--images 2048] [--batch 64] [--epochs 4]

Needs an NVIDIA GPU (utilisation is sampled with `nvidia-smi` every 100 ms during the epochs
after the first). Trains the practitioners' CNN (benchmarks/step_cost.py) in the precision
`trainer.precision=auto` picks on a GPU, twice:

- pipeline: the input as the platform feeds it. With TensorFlow that is
  `data.pipeline.make_dataset` over a folder of full-size JPEGs made from the real samples
  (decode, resize, uint8 cache, shuffle, scaling per batch). On a backend without TensorFlow
  (KERAS_BACKEND=jax on a machine with no TF) it is a `keras.utils.PyDataset` over the same
  uint8 cache of decoded images, shuffled per epoch and scaled per batch (`--workers` threads);
- memory: the same images as float32 batches already in memory.

Prints images/s and mean GPU utilisation of each; the last line is the pipeline's utilisation
and its ratio to the in-memory run's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Sampler:
    """nvidia-smi's utilisation.gpu, sampled every 100 ms between start() and stop()."""

    def start(self) -> None:
        self.proc = None
        if shutil.which("nvidia-smi") is None:  # a dry run on a machine without a GPU
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             "-lms", "100"], stdout=subprocess.PIPE, text=True)

    def stop(self) -> float:
        if self.proc is None:
            return float("nan")
        self.proc.terminate()
        out, _ = self.proc.communicate()
        values = [float(v) for v in out.split() if v.strip().replace(".", "").isdigit()]
        return statistics.mean(values) if values else float("nan")


def decoded_cache(paths: list[Path], size: int) -> np.ndarray:
    """uint8 (N, size, size, 1) of the JPEGs (PIL: only used where TensorFlow is missing)."""
    from PIL import Image

    images = np.empty((len(paths), size, size, 1), np.uint8)
    for i, path in enumerate(paths):
        image = Image.open(path)
        image.draft("L", (size, size))
        images[i, ..., 0] = np.asarray(image.convert("L").resize((size, size), Image.BILINEAR))
    return images


def pipeline_input(paths: list[Path], labels: np.ndarray, size: int, batch: int,
                   workers: int = 4):
    """The platform's feed: tf.data where TensorFlow is there, else a threaded PyDataset."""
    import keras

    if keras.backend.backend() == "tensorflow":
        from data.pipeline import make_dataset

        return make_dataset(np.array([str(p) for p in paths]), labels, binary=True,
                            image_size=size, channels=1, batch_size=batch, training=True,
                            seed=0), "tf.data (data.pipeline.make_dataset)"
    cache = decoded_cache(paths, size)

    class Feed(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=16)
            self.order = np.random.default_rng(0).permutation(len(cache))

        def __len__(self) -> int:
            return len(cache) // batch

        def __getitem__(self, i: int):
            index = np.sort(self.order[i * batch:(i + 1) * batch])
            return cache[index].astype(np.float32) * (1 / 255), labels[index]

        def on_epoch_end(self) -> None:
            self.order = np.random.default_rng().permutation(len(cache))

    return Feed(), f"keras PyDataset, {workers} threads over the uint8 cache (no TensorFlow here)"


def train(feed, steps: int, epochs: int, batch: int, size: int) -> tuple[float, float]:
    """(images/s, mean GPU utilisation %) over the epochs after the first."""
    import keras

    from benchmarks.step_cost import practitioners_cnn
    from models.fused_batch_norm import fuse_batch_norm
    from models.precision import dtype_policy, resolve_precision

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    with dtype_policy(resolve_precision("auto", has_gpu=True)):
        model = practitioners_cnn("full", size)
    fuse_batch_norm(model)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    sampler, marks = Sampler(), {}

    def begin(epoch, logs=None):
        if epoch == 1:
            marks["start"] = time.perf_counter()
            sampler.start()

    def end(epoch, logs=None):
        if epoch == epochs - 1:
            marks["end"] = time.perf_counter()
            marks["util"] = sampler.stop()

    callback = keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)
    model.fit(feed, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[callback])
    rate = steps * batch * (epochs - 1) / (marks["end"] - marks["start"])
    return rate, marks["util"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="PyDataset threads (no TF)")
    args = parser.parse_args()
    import keras

    from benchmarks.input_pipeline import make_folder

    root = Path(tempfile.mkdtemp(prefix="xray-gpu-")) / "chest_xray"
    paths = make_folder(root, args.images)
    labels = np.array([int(p.parent.name == "PNEUMONIA") for p in paths], dtype=np.float32)
    steps = len(paths) // args.batch
    feed, how = pipeline_input(paths, labels, args.size, args.batch, args.workers)
    images = decoded_cache(paths, args.size).astype(np.float32) / 255

    class InMemory(keras.utils.PyDataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int):
            return images[i * args.batch:(i + 1) * args.batch], labels[
                i * args.batch:(i + 1) * args.batch]

    print(f"backend {keras.backend.backend()}, {len(paths)} JPEGs, batch {args.batch}, "
          f"pipeline = {how}", flush=True)
    results = {"pipeline": train(feed, steps, args.epochs, args.batch, args.size),
               "memory": train(InMemory(), steps, args.epochs, args.batch, args.size)}
    print("| input | images/s | GPU busy % |\n|---|---|---|")
    for name, (rate, util) in results.items():
        print(f"| {name} | {rate:.0f} | {util:.1f} |")
    (rate, util), (mem_rate, mem_util) = results["pipeline"], results["memory"]
    print(f"pipeline: GPU busy {util:.1f} % ({util / mem_util:.2f} of in-memory's "
          f"{mem_util:.1f} %), images/s {rate / mem_rate:.2f} of in-memory")


if __name__ == "__main__":
    main()
