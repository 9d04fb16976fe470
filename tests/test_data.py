"""Parsing, checksums, the split, and the two loaders' equivalence, on tiny synthetic IDX files."""

from __future__ import annotations

import gzip

import pytest
import torch

from conftest import make_dataset, tiny_loaders, write_idx
from mnist_sweep import data


def _expected(files):
    return {base: data.sha256_of(path) for base, path in files.items()}


def test_read_idx_roundtrip_plain_and_gzip(tmp_path):
    array = torch.arange(2 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(2, 28, 28)
    for compress in (False, True):
        path = write_idx(tmp_path / f"x{compress}", array, compress)
        assert torch.equal(data.read_idx(path), array)
    labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    assert torch.equal(data.read_idx(write_idx(tmp_path / "l", labels)), labels)


def test_truncated_file_is_named(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", torch.zeros(3, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(data.DataError, match=r"truncated dataset file .*train-images-idx3-ubyte"):
        data.read_idx(path)


def test_corrupt_gzip_and_bad_magic_are_named(tmp_path):
    bad_gz = tmp_path / "train-labels-idx1-ubyte.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-8])
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz"):
        data.read_idx(bad_gz)
    bad_magic = tmp_path / "t10k-labels-idx1-ubyte"
    bad_magic.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(data.DataError, match="not an unsigned-byte IDX file"):
        data.read_idx(bad_magic)


def test_find_files_accepts_flat_and_torchvision_layouts(tmp_path):
    make_dataset(tmp_path / "flat", compress=True)
    assert set(data.find_files(tmp_path / "flat", "mnist")) == set(data.FILES.values())
    make_dataset(tmp_path / "tv" / "MNIST" / "raw")
    found = data.find_files(tmp_path / "tv", "mnist")
    assert found and all(p.parent.name == "raw" for p in found.values())
    assert data.find_files(tmp_path / "empty", "mnist") is None


def test_checksum_mismatch_names_the_file_and_good_results_are_cached(tiny_data, tmp_path, monkeypatch):
    root, files = tiny_data
    expected = _expected(files)
    cache = tmp_path / "cache"
    data.verify_checksums(files, expected, cache)
    # Unchanged files are not hashed again.
    monkeypatch.setattr(data, "sha256_of", lambda path: pytest.fail(f"re-hashed {path}"))
    data.verify_checksums(files, expected, cache)
    monkeypatch.undo()
    # A file that changes is hashed again and rejected, by name.
    target = files["t10k-labels-idx1-ubyte"]
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 1
    target.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=r"checksum mismatch for .*t10k-labels-idx1-ubyte"):
        data.verify_checksums(files, expected, cache)


@pytest.mark.e2e  # reads the real files
def test_real_mnist_hashes_are_the_canonical_ones(mnist_root, tmp_path):
    files = data.find_files(mnist_root, "mnist")
    data.verify_checksums(files, data.DATASETS["mnist"].sha256, tmp_path)


def test_missing_root_without_download_says_how_to_fix(tmp_path):
    with pytest.raises(data.DataError, match="point data.root at a folder"):
        data.locate(tmp_path / "nowhere", "mnist", tmp_path / "cache", download=False)


def test_split_is_disjoint_complete_and_seeded():
    train, val = data.split_indices(1000, 100, seed=0)
    assert len(val) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert torch.equal(data.split_indices(1000, 100, seed=0)[1], val)
    assert not torch.equal(data.split_indices(1000, 100, seed=1)[1], val)


def _loaders(root, cache, loader, batch_size=16, seed=3, deskewed=False):
    return tiny_loaders(root, cache, loader, batch_size=batch_size, seed=seed, deskewed=deskewed)


@pytest.mark.parametrize("deskewed", [False, True])
def test_both_loaders_yield_the_same_batches_every_epoch(tiny_data, tmp_path, deskewed):
    root, _ = tiny_data
    fast = _loaders(root, tmp_path / "c", "tensor", deskewed=deskewed)
    slow = _loaders(root, tmp_path / "c", "torchvision", deskewed=deskewed)
    assert (fast.n_train, fast.n_val, fast.n_test) == (slow.n_train, slow.n_val, slow.n_test) == (100, 20, 40)
    for _epoch in range(2):  # the order changes between epochs, identically for both
        batches = list(zip(fast.train, slow.train, strict=True))
        assert len(batches) == len(fast.train) == len(slow.train) == 7
        for (xf, yf), (xs, ys) in batches:
            assert xf.shape == xs.shape and xf.shape[1:] == (1, 28, 28)
            assert torch.equal(yf, ys)
            torch.testing.assert_close(xf, xs, rtol=0, atol=1e-6)  # normalised identically
    for a, b in ((fast.val, slow.val), (fast.test, slow.test)):
        for (xf, yf), (xs, ys) in zip(a, b, strict=True):
            assert torch.equal(yf, ys)
            torch.testing.assert_close(xf, xs, rtol=0, atol=1e-6)


def test_epochs_reshuffle_and_seed_controls_order(tiny_data, tmp_path):
    root, _ = tiny_data
    loaders = _loaders(root, tmp_path / "c", "tensor", batch_size=100)
    first = next(iter(loaders.train))[1]
    second = next(iter(loaders.train))[1]
    assert not torch.equal(first, second)
    again = next(iter(_loaders(root, tmp_path / "c", "tensor", batch_size=100).train))[1]
    assert torch.equal(first, again)


def test_tensor_cache_is_reused_and_rebuilt_when_damaged(tiny_data, tmp_path, monkeypatch):
    root, files = tiny_data
    cache = tmp_path / "c"
    arrays = data.load_uint8(files, cache)
    (cached,) = (cache / "tensors").glob("*.pt")
    monkeypatch.setattr(data, "read_idx", lambda p: pytest.fail("decoded again despite the cache"))
    assert torch.equal(data.load_uint8(files, cache)["train_images"], arrays["train_images"])
    monkeypatch.undo()
    cached.write_bytes(b"garbage")
    assert torch.equal(data.load_uint8(files, cache)["test_labels"], arrays["test_labels"])


def test_normalize_matches_totensor_normalize():
    from torchvision import transforms

    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    reference = transforms.Normalize((0.1307,), (0.3081,))(transforms.ToTensor()(image.numpy()))
    ours = data.normalize(image[None], 0.1307, 0.3081, torch.device("cpu"))[0]
    torch.testing.assert_close(ours, reference)


def test_next_trial_in_the_same_process_reuses_the_prepared_splits(tiny_data, tmp_path, monkeypatch):
    root, _ = tiny_data
    first = _loaders(root, tmp_path / "c", "tensor")
    monkeypatch.setattr(data, "load_uint8", lambda *a: pytest.fail("loaded again for the same data settings"))
    again = _loaders(root, tmp_path / "c", "tensor", seed=4)  # another trial: other seed, same data
    assert again.train.x is first.train.x and again.test.y is first.test.y
    monkeypatch.undo()
    other = tiny_loaders(root, tmp_path / "c", "tensor", batch_size=16)  # same settings: still shared
    assert other.val.x is first.val.x


def _slant(x: torch.Tensor) -> tuple[float, float, float]:
    """(centre row, centre column, columns moved per row) of a [28,28] image's ink."""
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    m = x.sum()
    cy, cx = (x * rows).sum() / m, (x * cols).sum() / m
    slant = (x * (rows - cy) * (cols - cx)).sum() / (x * (rows - cy) ** 2).sum()
    return cy.item(), cx.item(), slant.item()


def _stroke(top: tuple[int, int], bottom: tuple[int, int]) -> torch.Tensor:
    """A 2-pixel-wide straight stroke from ``top`` to ``bottom`` (row, column), ink 1 on background 0."""
    image = torch.zeros(28, 28)
    (r0, c0), (r1, c1) = top, bottom
    for r in range(r0, r1 + 1):
        c = round(c0 + (c1 - c0) * (r - r0) / (r1 - r0))
        image[r, c : c + 2] = 1.0
    return image


def test_deskew_straightens_and_centres_a_slanted_stroke():
    slanted = _stroke((4, 20), (23, 6))  # a "/" leaning right, off centre
    assert _slant(slanted)[2] < -0.5
    cy, cx, slant = _slant(data.deskew(slanted[None, None])[0, 0])
    assert abs(slant) < 0.05, slant  # upright
    assert abs(cy - 13.5) < 0.2 and abs(cx - 13.5) < 0.2, (cy, cx)  # centre of mass at the centre
    # The other way round, too; the label of the image is not touched (it is the same tensor order).
    assert abs(_slant(data.deskew(_stroke((4, 6), (23, 20))[None, None])[0, 0])[2]) < 0.05


def test_deskew_leaves_an_upright_centred_digit_alone():
    upright = _stroke((6, 13), (21, 13))  # columns 13-14: centred at 13.5, no slant
    torch.testing.assert_close(data.deskew(upright[None, None])[0, 0], upright, rtol=0, atol=1e-5)
    blank = torch.zeros(1, 1, 28, 28)
    assert torch.equal(data.deskew(blank), blank)  # no ink, nothing to do (and no NaN)


def test_deskew_one_image_at_a_time_equals_the_whole_batch():
    """The torchvision pipeline deskews per sample, the tensor one per split: the same numbers either way."""
    batch = torch.rand(5, 1, 28, 28) ** 4
    each = torch.stack([data.deskew(image) for image in batch])  # [1,28,28] each, as ToTensor gives
    torch.testing.assert_close(each, data.deskew(batch))
    assert data.deskew(batch[:, 0]).shape == (5, 28, 28)


def test_deskew_is_applied_to_every_split(tiny_data, tmp_path):
    root, _ = tiny_data
    plain = _loaders(root, tmp_path / "c", "tensor")
    straight = _loaders(root, tmp_path / "c", "tensor", deskewed=True)
    for a, b in ((plain.val, straight.val), (plain.test, straight.test)):
        (xa, ya), (xb, yb) = next(iter(a)), next(iter(b))
        assert torch.equal(ya, yb)
        expected = (data.deskew(xa * 0.3081 + 0.1307) - 0.1307) / 0.3081
        torch.testing.assert_close(xb, expected, rtol=0, atol=1e-4)  # up to float round-off
