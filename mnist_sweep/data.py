"""The raw material and the conveyor belts.

In the tutorial's terms: the *transform* (``ToTensor()`` then ``Normalize(mean, std)``) is the tool that
prepares each image, the *datasets* are boxes of raw material, and the *loaders* are conveyor belts that feed
the model one batch at a time. This module builds all three, in two flavours with the same semantics:

* ``loader=torchvision`` - the tutorial's exact pipeline: ``torchvision.datasets.MNIST`` with per-sample
  transforms behind a ``DataLoader``. Clear, but every image goes through PIL and Python one at a time.
* ``loader=tensor`` (default) - the same images decoded once into one uint8 tensor (cached on disk), moved to
  the device once, normalised once with the same mean/std, and batches sliced from a seeded ``randperm``.

Both draw each epoch's order from the same seeded generator, so they yield the same batches in the same order.

Optional preprocessing, off by default: ``deskew`` straightens each slanted digit (a fixed shear per image,
computed from its own pixels), the same step for training, validation, test and the exported model.

The data split: the 60,000 training images are cut, with a fixed seed, into a training set (the book) and a
validation set (the mock exam, used to choose hyper-parameters and for early stopping); the official 10,000
test images are the exam the model has never seen - reported once, never used to choose anything.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_sweep import UserError


class DataError(UserError):
    """Missing, corrupt or truncated dataset files."""


# The four IDX files, by split and kind, as torchvision and the original distribution name them.
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetInfo:
    torchvision_class: str  # the class in torchvision.datasets, also the folder name it downloads into
    sha256: dict[str, str]  # canonical SHA-256 of each *uncompressed* file
    classes: tuple[str, ...]


DATASETS = {
    "mnist": DatasetInfo(
        "MNIST",
        {
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        tuple(str(d) for d in range(10)),
    ),
    "fashion_mnist": DatasetInfo(
        "FashionMNIST",
        {
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnist-sweep"


# --------------------------------------------------------------------------------------------------------------
# Finding and checking the files
# --------------------------------------------------------------------------------------------------------------


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def find_files(root: Path, name: str) -> dict[str, Path] | None:
    """The four IDX files under ``root``, or None when they are not all there.

    Accepted layouts: the files directly in ``root`` (as shipped, e.g. ``../shared/datasets/mnist``), or
    torchvision's ``root/<MNIST|FashionMNIST>/raw/`` (where ``download=True`` puts them); each gzip-compressed
    or not.
    """
    for folder in (root, root / DATASETS[name].torchvision_class / "raw"):
        found = {}
        for base in FILES.values():
            for candidate in (folder / base, folder / f"{base}.gz"):
                if candidate.is_file():
                    found[base] = candidate
                    break
        if len(found) == len(FILES):
            return found
    return None


def read_idx(path: Path) -> torch.Tensor:
    """Decode one IDX file (gzip or not) into a uint8 tensor, checking its header against its length.

    IDX: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each dimension as a
    big-endian int32, then the data.
    """
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"corrupt dataset file {path}: {e}; delete it and download again or copy a good one") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise DataError(f"corrupt dataset file {path}: not an unsigned-byte IDX file; replace it with a good copy")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"truncated dataset file {path}: header cut short; replace it with a good copy")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    expected = header + int(torch.tensor(dims).prod())
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "corrupt"
        raise DataError(
            f"{what} dataset file {path}: header says {expected} bytes, file has {len(raw)}; "
            "replace it with a good copy"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with _open(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(files: dict[str, Path], expected: dict[str, str], cache_dir: Path) -> None:
    """Check each file's SHA-256 (of its uncompressed bytes) against ``expected``; remember the good ones.

    A file already checked, unchanged since (same size and modification time), is not hashed again.
    """
    record_path = cache_dir / "checksums.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    changed = False
    for base, path in files.items():
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, expected[base]]
        if record.get(key) == stamp:
            continue
        try:
            digest = sha256_of(path)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"corrupt dataset file {path}: {e}; replace it with a good copy") from e
        if digest != expected[base]:
            read_idx(path)  # a truncated file gets the more precise message
            raise DataError(
                f"checksum mismatch for {path}: SHA-256 {digest[:12]}..., expected {expected[base][:12]}...; "
                "replace it with a good copy"
            )
        record[key] = stamp
        changed = True
    if changed:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(record_path)  # atomic: parallel trials never read half a file


def locate(root: Path, name: str, cache_dir: Path, download: bool = True, verify: bool = True) -> dict[str, Path]:
    """Find (or download) the four files of dataset ``name`` under ``root`` and check them."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)} (data=mnist)")
    files = find_files(root, name)
    if files is None and download:
        files = _download(root, name)
    if files is None:
        raise DataError(
            f"{name} not found in {root} (expected the four IDX files there or in "
            f"{DATASETS[name].torchvision_class}/raw/); point data.root at a folder holding them"
        )
    if verify:
        verify_checksums(files, DATASETS[name].sha256, cache_dir)
    return files


def _download(root: Path, name: str) -> dict[str, Path] | None:
    import torchvision.datasets  # imported here: torchvision costs ~1 s of start-up and is rarely needed

    cls = getattr(torchvision.datasets, DATASETS[name].torchvision_class)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError / URLError / OSError depending on the failure
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{name} not found in {root} and the download failed ({reason[:120]}); offline, point data.root "
            "at a folder holding the four IDX files, e.g. data.root=../shared/datasets/mnist"
        ) from e
    return find_files(root, name)


# --------------------------------------------------------------------------------------------------------------
# The two pipelines
# --------------------------------------------------------------------------------------------------------------


def torchvision_root(files: dict[str, Path], name: str, cache_dir: Path) -> Path:
    """A folder in torchvision's layout (``<Class>/raw/`` with uncompressed files) holding ``files``.

    torchvision.datasets.MNIST only reads uncompressed files from ``root/MNIST/raw``; when the files are
    elsewhere or gzip-compressed, they are decompressed once into the cache.
    """
    cls = DATASETS[name].torchvision_class
    raw = {p.parent for p in files.values()}
    if len(raw) == 1 and all(p.suffix != ".gz" for p in files.values()):
        folder = next(iter(raw))
        if folder.name == "raw" and folder.parent.name == cls:
            return folder.parent.parent
    key = hashlib.sha256("".join(sorted(str(p.resolve()) for p in files.values())).encode()).hexdigest()[:12]
    root = cache_dir / "torchvision" / f"{name}-{key}"
    target = root / cls / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for base, src in files.items():
        dst = target / base
        if dst.exists() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            continue
        tmp = dst.with_suffix(f".{os.getpid()}.tmp")
        with _open(src) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(dst)
    return root


def torchvision_datasets(
    files: dict[str, Path], name: str, cache_dir: Path, mean: float, std: float, deskewed: bool = False
):
    """The tutorial's datasets: ``torchvision.datasets.MNIST`` with ``ToTensor()`` + ``Normalize``."""
    import torchvision
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.ToTensor(),  # PIL image (28x28, 0..255) -> float tensor 1x28x28 in [0, 1]
            *([deskew] if deskewed else []),  # optional: straighten the slant (data.deskew=true)
            transforms.Normalize((mean,), (std,)),  # -> zero mean, unit variance over the training set
        ]
    )
    cls = getattr(torchvision.datasets, DATASETS[name].torchvision_class)
    root = str(torchvision_root(files, name, cache_dir))
    train = cls(root, train=True, transform=transform, download=False)
    test = cls(root, train=False, transform=transform, download=False)
    return train, test


def load_uint8(files: dict[str, Path], cache_dir: Path) -> dict[str, torch.Tensor]:
    """All four arrays as uint8 tensors, decoded once and cached on disk (a ~55 MB .pt file).

    The cache is keyed by the files' checksums-to-be (path, size, mtime), so a changed file is decoded again.
    """
    stamp = hashlib.sha256()
    for base in sorted(files):
        st = files[base].stat()
        stamp.update(f"{files[base].resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
    path = cache_dir / "tensors" / f"{stamp.hexdigest()[:16]}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            path.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted
    arrays = {f"{split}_{kind}": read_idx(files[base]) for (split, kind), base in FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{split} images ({n_img}) and labels ({n_lab}) disagree; replace the files")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(arrays, tmp)
    tmp.replace(path)  # atomic: trials running in parallel never read half a cache file
    return arrays


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, val) index sets of the n training images, the same for every run with this seed."""
    if not 0 <= val_size < n:
        raise UserError(f"data.val_size={val_size} must be between 0 and {n - 1}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def deskew(images: torch.Tensor) -> torch.Tensor:
    """Each image straightened and centred: a preprocessing step, the same for every split (not augmentation).

    Handwriting slants. Per image, from its pixel intensities (ToTensor's 0..1 scale, shape [..., H, W]):
    the centre of mass, and the slant = cov(row, column) / var(row) - how many columns the ink moves per row.
    Every output row is then resampled from the input shifted back by that slant, with the centre of mass
    moved to the image centre (bilinear; outside the image is background, 0). The classic "deskewing" of
    LeCun's MNIST table and of Meier, Ciresan et al. (2011)'s MLP committees. A deskewed image has no slant
    left, so applying it twice changes little beyond interpolation blur.
    """
    shape = images.shape
    h, w = shape[-2:]
    x = images.reshape(-1, 1, h, w).float()
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    mass = x.sum(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    cy, cx = (x * rows).sum(dim=(2, 3), keepdim=True) / mass, (x * cols).sum(dim=(2, 3), keepdim=True) / mass
    var_rows = (x * (rows - cy) ** 2).sum(dim=(2, 3), keepdim=True) / mass
    cov = (x * (rows - cy) * (cols - cx)).sum(dim=(2, 3), keepdim=True) / mass
    slant = torch.where(var_rows > 1e-3, cov / var_rows.clamp(min=1e-3), torch.zeros_like(cov))
    # Output pixel (r, c) reads the input at row r + (cy - centre), column c + (cx - centre) + slant * (r - centre).
    r0, c0 = (h - 1) / 2, (w - 1) / 2
    src_rows = (rows - r0 + cy).expand(-1, -1, h, w)
    src_cols = cols - c0 + cx + slant * (rows - r0)
    grid = torch.stack((src_cols / (w - 1) * 2 - 1, src_rows / (h - 1) * 2 - 1), dim=-1).squeeze(1)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(shape).to(images.dtype)


def normalize(
    images_u8: torch.Tensor, mean: float, std: float, device: torch.device, deskewed: bool = False
) -> torch.Tensor:
    """ToTensor + Normalize, for a whole split at once: uint8 [N,28,28] -> float [N,1,28,28] on the device.

    ``deskewed`` straightens each digit (``deskew``) between the two, where the tutorial's pipeline would.
    """
    x = images_u8.to(device).unsqueeze(1).float().div_(255)
    if deskewed:
        x = deskew(x)
    return x.sub_(mean).div_(std)


class EpochShuffle(torch.utils.data.Sampler):
    """The order of one epoch: a fresh ``randperm`` from the run's seeded generator, every epoch.

    It is what ``DataLoader(shuffle=True)`` does; written out so that both loaders draw exactly the same
    order (torch's own sampler also draws numbers for worker seeds, which the tensor loader has no use for).
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class TensorLoader:
    """A conveyor belt over tensors already on the device: batches sliced from the epoch's ``randperm``.

    Yields the same batches as ``DataLoader(dataset, batch_size, sampler=EpochShuffle(n, g))`` - the
    tutorial's pipeline - with no per-sample work at all.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)  # the last batch may be smaller, as with DataLoader

    def __iter__(self):
        n, bs = len(self.x), self.batch_size
        if self.generator is None:  # evaluation: in order
            for i in range(0, n, bs):
                yield self.x[i : i + bs], self.y[i : i + bs]
            return
        order = torch.randperm(n, generator=self.generator).to(self.x.device)
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            yield self.x[idx], self.y[idx]


# The last splits prepared in this process. A sweep's trials often run one after another in one process
# (Hydra's basic launcher): the next trial with the same data settings reuses them instead of loading and
# normalising ~200 MB again. Nothing writes into these tensors (batches are indexed copies).
_PREPARED: dict[tuple, tuple] = {}


def _device_splits(files, cache_dir, val_size, split_seed, mean, std, device, deskewed):
    """(x, y) of train, val and test: normalised, on the device, the split carved out with its own seed."""
    key = (
        tuple(sorted((b, str(p), p.stat().st_mtime_ns) for b, p in files.items())),
        val_size,
        split_seed,
        mean,
        std,
        str(device),
        deskewed,
    )
    if key not in _PREPARED:
        arrays = load_uint8(files, cache_dir)
        train_idx, val_idx = split_indices(len(arrays["train_images"]), val_size, split_seed)
        x_all = normalize(arrays["train_images"], mean, std, device, deskewed)
        y_all = arrays["train_labels"].long().to(device)
        tr, va = train_idx.to(device), val_idx.to(device)
        x_test = normalize(arrays["test_images"], mean, std, device, deskewed)
        test = (x_test, arrays["test_labels"].long().to(device))
        _PREPARED.clear()  # keep one dataset, not one per configuration ever seen
        _PREPARED[key] = ((x_all[tr], y_all[tr]), (x_all[va], y_all[va]), test)
    return _PREPARED[key]


@dataclass
class Loaders:
    train: object
    val: object
    test: object
    n_train: int
    n_val: int
    n_test: int
    classes: tuple[str, ...]


def build_loaders(
    *,
    name: str,
    root: str | Path,
    loader: str,
    batch_size: int,
    eval_batch_size: int,
    val_size: int,
    split_seed: int,
    mean: float,
    std: float,
    device: torch.device,
    generator: torch.Generator,
    cache_dir: str | Path | None = None,
    download: bool = True,
    verify: bool = True,
    num_workers: int = 0,
    deskewed: bool = False,
) -> Loaders:
    """Locate, check and load the dataset, and return the train / val / test conveyor belts."""
    root = Path(root).expanduser()
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    files = locate(root, name, cache_dir, download=download, verify=verify)
    classes = DATASETS[name].classes

    if loader == "tensor":
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = _device_splits(
            files, cache_dir, val_size, split_seed, mean, std, device, deskewed
        )
        return Loaders(
            train=TensorLoader(x_tr, y_tr, batch_size, generator=generator),
            val=TensorLoader(x_va, y_va, eval_batch_size),
            test=TensorLoader(x_te, y_te, eval_batch_size),
            n_train=len(x_tr),
            n_val=len(x_va),
            n_test=len(x_te),
            classes=classes,
        )

    if loader == "torchvision":
        from torch.utils.data import DataLoader, Subset

        if not verify:  # checksums already vouch for the files; unchecked ones get read_idx's clear errors
            for path in files.values():
                read_idx(path)
        train_set, test_set = torchvision_datasets(files, name, cache_dir, mean, std, deskewed)
        train_idx, val_idx = split_indices(len(train_set), val_size, split_seed)
        train_part, val_part = Subset(train_set, train_idx.tolist()), Subset(train_set, val_idx.tolist())
        pin = device.type == "cuda"
        kw = dict(num_workers=num_workers, pin_memory=pin)
        return Loaders(
            # The tutorial's shuffle=True, with the order drawn from the run's seeded generator.
            train=DataLoader(train_part, batch_size=batch_size, sampler=EpochShuffle(len(train_part), generator), **kw),
            val=DataLoader(val_part, batch_size=eval_batch_size, shuffle=False, **kw),
            test=DataLoader(test_set, batch_size=eval_batch_size, shuffle=False, **kw),
            n_train=len(train_part),
            n_val=len(val_part),
            n_test=len(test_set),
            classes=classes,
        )

    raise UserError(f"data.loader={loader!r} is not a loader; choose tensor or torchvision")
