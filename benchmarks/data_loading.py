"""Data-loading throughput: ``cl``'s file-backed loader against a plain torchvision ``ImageFolder`` + ``DataLoader``.

Both read the same folder of JPEGs generated here (ImageNet-R-like: 10 classes, sides 250-500 px, photo-like
content), apply the same training pipeline (:func:`scenarios.folder.paper_transform`: RandomResizedCrop(224) +
flip, uint8 out) and use the same batch size and number of workers. Images per second over whole epochs after a
warm-up batch; each setting is repeated and the median reported.

    python benchmarks/data_loading.py                 # 0, 1 and 2 workers; table into benchmarks/README.md
    python benchmarks/data_loading.py --workers 0 2 --images 400 --print
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
README = REPO / "benchmarks" / "README.md"
BEGIN, END = "<!-- data-loading:begin -->", "<!-- data-loading:end -->"


def make_jpegs(folder: Path, n: int, classes: int = 10, seed: int = 0) -> list[tuple[str, int]]:
    """``folder/c<k>/<i>.jpg``: smooth random fields plus noise, so JPEG sizes are like photos'."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(250, 501, size=2))
        low = rng.random((h // 32 + 2, w // 32 + 2, 3)) * 255
        img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        rel = f"c{i % classes}/{i:05d}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / rel, quality=90)
        items.append((rel, i % classes))
    return items


def epoch_rate(loader: torch.utils.data.DataLoader, epochs: int) -> float:
    """Images per second over ``epochs`` full passes (the first batch of the first pass is a warm-up)."""
    it = iter(loader)
    next(it)  # start the workers
    for _ in it:
        pass
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            n += len(x)
    return n / (time.perf_counter() - start)


def ours(folder: Path, items: list[tuple[str, int]], workers: int, batch: int) -> torch.utils.data.DataLoader:
    from cl.data.loaders import make_loader
    from scenarios.base import ExperienceData
    from scenarios.folder import FileListSource, paper_transform

    src = FileListSource(folder, [p for p, _ in items], [c for _, c in items], 224, paper_transform(224, True))
    data = ExperienceData(src, np.arange(len(items)), np.asarray([c for _, c in items]))
    return make_loader(data, batch, train=True, num_workers=workers, drop_last=False)


def plain(folder: Path, workers: int, batch: int) -> torch.utils.data.DataLoader:
    from torchvision.datasets import ImageFolder

    from scenarios.folder import paper_transform

    ds = ImageFolder(str(folder), transform=paper_transform(224, True))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--print", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # decoding is per worker; keep the main process from competing with them
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        items = make_jpegs(folder, args.images)
        mb = sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 2**20
        for w in args.workers:
            rates: dict[str, list[float]] = {"ours": [], "plain": []}
            for _ in range(args.repeats):  # interleaved, so a load change hits both alike
                rates["ours"].append(epoch_rate(ours(folder, items, w, args.batch), args.epochs))
                rates["plain"].append(epoch_rate(plain(folder, w, args.batch), args.epochs))
            o, p = statistics.median(rates["ours"]), statistics.median(rates["plain"])
            rows.append(f"| {w} | {p:.0f} | {o:.0f} | {o / p:.2f}x |")
            print(rows[-1], flush=True)
    table = "\n".join([
        f"`python benchmarks/data_loading.py` ({time.strftime('%Y-%m-%d')}, {args.images} JPEGs of 250-500 px, "
        f"{mb:.0f} MiB, batch {args.batch}, {args.epochs} epochs per measurement, median of {args.repeats}):", "",
        "| workers | plain ImageFolder + DataLoader (img/s) | cl loader (img/s) | cl / plain |",
        "|---|---|---|---|", *rows])
    if args.print:
        print(table)
        return
    text = README.read_text()
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    README.write_text(f"{before}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote the table into {README}")


if __name__ == "__main__":
    main()
