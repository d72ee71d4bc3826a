"""Data pipeline throughput: the Data layer on raw and JPEG Datums against cv2.imdecode alone.

    python bench/data_pipeline.py [--images 512] [--batch 64] [--batches 24]
    python bench/data_pipeline.py --feed [--device gpu|cpu] [--images 2048] [--batch 128]

Writes two LMDBs of 256x256 colour Datums (raw bytes, and JPEG at OpenCV's default quality 95) to a temporary
folder, then measures images/s through ``Data`` layer forward (decode, random crop 227,
mirror, mean file subtraction, scale) on this machine's cores, and cv2.imdecode's own rate on
the same JPEGs with as many threads as the prefetcher's decode pool. It then checks the prefetch
queue when the consumer is faster than the producer and when it is slower (queue length and
resident memory over time: bounded by the queue depth, no growth).

``--feed`` measures what a training step is fed: images/s delivered as uint8 batches (decode,
random crop 227, mirror) from the LMDB of JPEG Datums through the prefetch pool into device
memory (``--device gpu``: pinned buffers, side-stream copies, the device synchronised at the
end) or host memory (``--device cpu``: copied into one preallocated batch), against the 7,500
images/s an H100 consumes training AlexNet at batch 128 (issue 11). On the GPU it also times
the Data layer's whole forward (upload, then float, mean and scale on the device).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import owlnet  # noqa: E402
from owlnet import fileio  # noqa: E402
from owlnet.data.datum import array_to_datum, encode_image, encoded_datum  # noqa: E402
from owlnet.data.db import LMDBWriter  # noqa: E402
from owlnet.data.prefetch import default_workers  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def photo_like(rng, size=256) -> np.ndarray:
    """A smooth colour field with some texture: JPEG sizes like a photograph's (~20-40 KB)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = [np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(2, 9))
            for _ in range(3)]
    image = (np.stack(base, axis=-1) * 80 + 128 + rng.normal(0, 12, (size, size, 3)))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dbs(folder: Path, count: int):
    rng = np.random.default_rng(0)
    jpegs = []
    with LMDBWriter(str(folder / "raw")) as raw, LMDBWriter(str(folder / "jpg")) as jpg:
        for i in range(count):
            image = photo_like(rng)
            key = f"{i:08d}".encode()
            raw.put(key, array_to_datum(image.transpose(2, 0, 1), i % 10).SerializeToString())
            payload = encode_image(image, "jpg")
            jpegs.append(payload)
            jpg.put(key, encoded_datum(payload, i % 10).SerializeToString())
    fileio.write_mean_binaryproto(folder / "mean.binaryproto",
                              np.full((3, 256, 256), 120, dtype=np.float32))
    return jpegs


def imdecode_rate(jpegs, workers: int, rounds: int = 3) -> float:
    raws = [np.frombuffer(p, dtype=np.uint8) for p in jpegs]
    best = 0.0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(lambda r: cv2.imdecode(r, cv2.IMREAD_UNCHANGED), raws))
            best = max(best, len(raws) / (time.perf_counter() - start))
    return best


def data_net(folder: Path, db: str, batch: int):
    return owlnet.Net(f"""
        layer {{ name: "data" type: "Data" top: "data" top: "label"
          transform_param {{ crop_size: 227 mirror: true scale: 0.017
                            mean_file: "{folder / 'mean.binaryproto'}" }}
          data_param {{ source: "{folder / db}" batch_size: {batch} backend: LMDB }} }}""",
                      owlnet.TRAIN)


def layer_rate(net, batches: int, batch: int, sync=lambda: None) -> float:
    for _ in range(3):                                   # warm up: threads, first batches
        net.forward_range(0, 0)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        net.forward_range(0, 0)
    sync()
    return batches * batch / (time.perf_counter() - start)


def host_stage_rate(net, batches: int, batch: int) -> float:
    """Images/s of the host stage alone: decoded, cropped and mirrored uint8 batches as the
    prefetcher hands them over. On a GPU the float conversion, mean and scale run on the device,
    so this is the rate a GPU consumer sees."""
    prefetcher = net.layers[0]._prefetcher()
    for _ in range(3):
        prefetcher.next()
    start = time.perf_counter()
    for _ in range(batches):
        prefetcher.next()
    return batches * batch / (time.perf_counter() - start)


def queue_behaviour(net, batches: int, consumer_delay: float):
    """Queue lengths seen by the consumer and RSS over ``batches`` forwards."""
    layer = net.layers[0]
    net.forward()
    prefetcher = layer._prefetcher()
    lengths, rss = [], []
    for _ in range(batches):
        time.sleep(consumer_delay)
        lengths.append(prefetcher._queue.qsize())
        net.forward()
        rss.append(rss_mib())
    return lengths, rss


TARGET = 7500      # images/s: an H100 training AlexNet at batch 128 (~17 ms a step)


def feed_rate(net, batches: int, batch: int, device: str) -> float:
    """Images/s of uint8 batches from the prefetcher into device (pinned buffers, side stream)
    or host memory, the device synchronised before the clock stops."""
    prefetcher = net.layers[0]._prefetcher()
    if device == "gpu":
        from owlnet.data.staging import PinnedUpload
        cupy = owlnet.backend.import_cupy()
        upload, sync = PinnedUpload().upload, cupy.cuda.Device().synchronize
    else:
        target = np.empty_like(prefetcher.next().data)
        upload, sync = (lambda host: np.copyto(target, host)), (lambda: None)
    for _ in range(3):
        upload(prefetcher.next().data)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        upload(prefetcher.next().data)
    sync()
    return batches * batch / (time.perf_counter() - start)


def feed(args, workers: int) -> int:
    """The --feed measurement (see the module's docstring)."""
    if args.device == "gpu":
        owlnet.set_mode_gpu()
    print(f"feed: {args.images} JPEG Datums 256x256x3 (quality 95) in an LMDB, batch "
          f"{args.batch}, crop 227 + mirror (uint8) on {workers} decode threads, into "
          f"{'device' if args.device == 'gpu' else 'host'} memory")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_dbs(folder, args.images)
        net = data_net(folder, "jpg", args.batch)
        rate = feed_rate(net, args.batches, args.batch, args.device)
        net.layers[0].close()
        where = "device" if args.device == "gpu" else "host"
        print(f"uint8 batches into {where} memory: {rate:8.1f} images/s")
        if args.device == "gpu":
            net = data_net(folder, "jpg", args.batch)
            sync = owlnet.backend.import_cupy().cuda.Device().synchronize
            with owlnet.backend.device_arrays():
                full = layer_rate(net, args.batches, args.batch, sync)
            net.layers[0].close()
            print(f"Data layer forward (upload, then float, mean, scale on the device): "
                  f"{full:8.1f} images/s")
    verdict = "met" if rate >= TARGET else f"missed by {TARGET - rate:.0f} images/s"
    print(f"target: >= {TARGET} images/s into device memory on the 16-core device host "
          f"(AlexNet batch 128 on an H100): {verdict} here")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--feed", action="store_true",
                        help="only measure uint8 batches delivered into device/host memory")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where --feed delivers the batches")
    args = parser.parse_args(argv)
    workers = default_workers()
    print(f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"Python {platform.python_version()}, numpy {np.__version__}, OpenCV {cv2.__version__}, "
          f"owlnet {getattr(owlnet, '__version__', '0.1.0')}, date {time.strftime('%Y-%m-%d')}, "
          f"load average {os.getloadavg()[0]:.1f} (other work on the cores slows every figure)")
    print(f"decode threads (prefetch pool): {workers}; {args.images} images 256x256x3, "
          f"batch {args.batch}, crop 227 + mirror + mean file + scale, TRAIN")
    if args.feed:
        return feed(args, workers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jpegs = write_dbs(folder, args.images)
        print(f"JPEG quality 95 (OpenCV default), mean size {np.mean([len(p) for p in jpegs]) / 1024:.1f} KiB")
        decode_1 = imdecode_rate(jpegs, 1)
        decode_n = imdecode_rate(jpegs, workers)
        print(f"cv2.imdecode alone: {decode_1:8.1f} images/s on 1 thread, "
              f"{decode_n:8.1f} images/s on {workers} threads")
        results, host = {}, {}
        for db in ("raw", "jpg"):
            net = data_net(folder, db, args.batch)
            results[db] = layer_rate(net, args.batches, args.batch)
            net.layers[0].close()
            net = data_net(folder, db, args.batch)
            host[db] = host_stage_rate(net, args.batches, args.batch)
            net.layers[0].close()
        print("Data layer forward on the CPU (decode, crop, mirror, then float, mean, scale on "
              "the same cores):")
        print(f"  raw Datums:  {results['raw']:8.1f} images/s")
        print(f"  JPEG Datums: {results['jpg']:8.1f} images/s = "
              f"{100 * results['jpg'] / decode_n:.0f}% of cv2.imdecode's rate on {workers} threads")
        print("Host stage alone (decode, crop, mirror -> uint8 batches: what a GPU consumer "
              "takes, float/mean/scale on the device):")
        print(f"  raw Datums:  {host['raw']:8.1f} images/s")
        print(f"  JPEG Datums: {host['jpg']:8.1f} images/s = "
              f"{100 * host['jpg'] / decode_n:.0f}% of cv2.imdecode's rate on {workers} threads "
              f"(target >= 80%)")

        net = data_net(folder, "jpg", args.batch)
        depth = net.layers[0].prefetch_depth
        fast, fast_rss = queue_behaviour(net, 16, 0.0)
        slow, slow_rss = queue_behaviour(net, 16, 4 * args.batch / results["jpg"])
        net.layers[0].close()
        print(f"prefetch queue (depth {depth}), consumer faster than the decoders: queue length "
              f"seen mean {np.mean(fast):.2f} max {max(fast)}; RSS {fast_rss[0]:.0f} -> "
              f"{fast_rss[-1]:.0f} MiB")
        print(f"prefetch queue, consumer 4x slower than the decoders: queue length mean "
              f"{np.mean(slow):.2f} max {max(slow)} (never above the depth); RSS "
              f"{slow_rss[0]:.0f} -> {slow_rss[-1]:.0f} MiB (max {max(slow_rss):.0f})")
        batch_mib = args.batch * 3 * 227 * 227 / 2 ** 20
        print(f"one prepared uint8 batch is {batch_mib:.1f} MiB, so a full queue holds "
              f"~{depth * batch_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
