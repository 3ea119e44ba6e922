"""The fast path's loader: same augmentation as the classic torchvision pipeline, same sampling
distribution, every image once per epoch, reproducible per (seed, epoch), and usable from the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from cifarlab.cli import main
from cifarlab.config import CIFAR_MEAN, CIFAR_STD, TrainConfig
from cifarlab.core.runtime import resolve_device
from cifarlab.data import build_loaders, classic_train_transform, load_data
from cifarlab.data.device import PAD, DeviceLoader, crop_flip, normalize
from cifarlab.train.engine import resolve_precision, seed_epoch

CPU = torch.device("cpu")
MEAN = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
ALL_OFFSETS = [(dy, dx) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]


def noise_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def torchvision_crop_flip(image: np.ndarray, dy: int, dx: int, flip: bool) -> Image.Image:
    """What RandomCrop(32, padding=4) + RandomHorizontalFlip() do once they have drawn (dy, dx, flip)."""
    img = TF.crop(TF.pad(Image.fromarray(image), PAD, fill=0), dy, dx, 32, 32)
    return TF.hflip(img) if flip else img


def test_every_offset_and_flip_equals_torchvision_bit_for_bit():
    images = noise_images(3)
    cases = [(i, dy, dx, flip) for i in range(len(images)) for dy, dx in ALL_OFFSETS for flip in (False, True)]
    idx = torch.tensor([c[0] for c in cases])
    offsets = torch.tensor([[c[1], c[2]] for c in cases])
    flips = torch.tensor([c[3] for c in cases])
    ours = crop_flip(torch.from_numpy(images)[idx], offsets, flips)
    assert ours.dtype == torch.uint8 and ours.shape == (len(cases), 32, 32, 3)
    expected = np.stack([np.asarray(torchvision_crop_flip(images[i], dy, dx, f)) for i, dy, dx, f in cases])
    assert np.array_equal(ours.numpy(), expected)
    # and the zero padding is really there: a shift by 4 leaves a 4-pixel band of zeros
    assert (ours[(offsets[:, 0] == 0)][:, :PAD] == 0).all()


def test_normalize_matches_to_tensor_and_normalize_and_is_channels_last():
    images = noise_images(8, seed=1)
    ours = normalize(torch.from_numpy(images), MEAN, STD, channels_last=True)
    expected = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(im)), CIFAR_MEAN, CIFAR_STD) for im in images])
    assert ours.shape == (8, 3, 32, 32) and ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    plain = normalize(torch.from_numpy(images), MEAN, STD, channels_last=False)
    assert plain.is_contiguous() and torch.equal(plain, ours)


def test_the_real_classic_transform_output_is_one_of_our_crops():
    # Independent of how torchvision draws its parameters: each output of the lab's actual transform
    # must be exactly (after normalize: within float tolerance) one of our 162 crop/flip variants.
    images = noise_images(4, seed=2)
    transform = classic_train_transform()
    torch.manual_seed(0)
    variants = torch.tensor([[dy, dx] for dy, dx in ALL_OFFSETS for _ in (0, 1)])
    flips = torch.tensor([f for _ in ALL_OFFSETS for f in (False, True)])
    for image in images:
        theirs = transform(Image.fromarray(image))
        ours = normalize(crop_flip(torch.from_numpy(image).expand(len(flips), -1, -1, -1), variants, flips),
                         MEAN, STD, channels_last=False)
        distance = (ours - theirs).abs().flatten(1).amax(dim=1)
        assert int((distance < 1e-5).sum()) == 1


def _coordinate_images(n: int) -> np.ndarray:
    """Pixel (r, c) holds (10 + r, 10 + c, 255): a crop's offset and flip can be read off its centre."""
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([10 + r, 10 + c, np.full_like(r, 255)], axis=-1).astype(np.uint8)
    return np.broadcast_to(image, (n, 32, 32, 3)).copy()


def _recover_uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x * STD + MEAN) * 255).to(torch.int64)  # undo normalize (exact after rounding)


def _chi2_limit(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at about p = 1e-6 (z = 4.75)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_offsets_and_flips_are_uniform_over_many_draws():
    n, epochs = 1024, 32  # 32768 draws: 202 per (dy, dx, flip) cell
    loader = DeviceLoader(_coordinate_images(n), np.zeros(n, dtype=np.int64), 512, CPU,
                          augment=True, shuffle=True, channels_last=True, seed=7)
    counts = np.zeros((2 * PAD + 1, 2 * PAD + 1, 2), dtype=np.int64)
    for epoch in range(1, epochs + 1):
        seed_epoch(7, epoch, loader)
        for x, _ in loader:
            px = _recover_uint8(x)[:, :, 16, 16:18]  # (B, C, 2): centre pixel and its right neighbour
            flipped = px[:, 1, 1] < px[:, 1, 0]  # columns run backwards in a mirrored crop
            # unflipped: centre column 16 reads padded column dx + 16; flipped: dx + 15
            dy = px[:, 0, 0] - 10 + PAD - 16
            dx = px[:, 1, 0] - 10 + PAD - torch.where(flipped, 15, 16)
            assert (px[:, 2] == 255).all() and dy.min() >= 0 and dy.max() <= 2 * PAD
            assert dx.min() >= 0 and dx.max() <= 2 * PAD
            np.add.at(counts, (dy.numpy(), dx.numpy(), flipped.long().numpy()), 1)
    assert counts.sum() == n * epochs
    assert (counts > 0).all()  # every offset in -4..4 on both axes, both flips
    # Joint uniformity (161 df) and the three marginals (8, 8 and 1 df), each at p ~ 1e-6: a sampler
    # that dropped one offset, or flipped 45% of the time, fails at least one of them.
    assert _chi2(counts.ravel()) < _chi2_limit(counts.size - 1)
    assert _chi2(counts.sum(axis=(1, 2))) < _chi2_limit(2 * PAD)
    assert _chi2(counts.sum(axis=(0, 2))) < _chi2_limit(2 * PAD)
    assert _chi2(counts.sum(axis=(0, 1))) < _chi2_limit(1)


def test_chi_square_bound_catches_a_biased_flip():
    rng = np.random.default_rng(0)
    fair = np.bincount(rng.random(32768) < 0.5, minlength=2)
    biased = np.bincount(rng.random(32768) < 0.45, minlength=2)
    assert _chi2(fair) < _chi2_limit(1) < _chi2(biased)


def _labelled_loader(n: int, batch: int, seed: int = 0, augment: bool = True, shuffle: bool = True) -> DeviceLoader:
    """Image i is filled with i % 251 and labelled i: batches reveal which images they hold."""
    images = (np.arange(n) % 251).astype(np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    return DeviceLoader(images, np.arange(n), batch, CPU, augment=augment, shuffle=shuffle, seed=seed)


def test_each_epoch_covers_every_image_once_and_keeps_the_last_partial_batch():
    loader = _labelled_loader(70, 32)
    assert len(loader) == 3
    for epoch in (1, 2):
        seed_epoch(0, epoch, loader)
        batches = list(loader)
        assert [len(y) for _, y in batches] == [32, 32, 6]
        labels = torch.cat([y for _, y in batches])
        assert sorted(labels.tolist()) == list(range(70))
        assert labels.tolist() != list(range(70))  # shuffled
        centre = torch.cat([_recover_uint8(x)[:, 0, 16, 16] for x, _ in batches])
        assert torch.equal(centre, labels % 251)  # images travel with their labels


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ():
    def epoch_batches(loader, epoch, seed=3):
        seed_epoch(seed, epoch, loader)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b = _coordinate_images(64), None
    first = DeviceLoader(a, np.arange(64), 16, CPU, augment=True, shuffle=True, seed=3)
    second = DeviceLoader(a, np.arange(64), 16, CPU, augment=True, shuffle=True, seed=3)
    for epoch in (1, 2):
        epoch_batches(first, epoch)
    b = epoch_batches(second, 3)  # epoch 3 alone, with nothing before it
    a3 = epoch_batches(first, 3)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a3, b))
    a4 = epoch_batches(first, 4)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a3, a4))
    other_seed = epoch_batches(second, 3, seed=4)
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a3, other_seed))


def test_builder_gives_plain_test_batches_at_the_test_batch_size():
    cfg = TrainConfig(dataset="synthetic", subset=50, test_subset=30, batch_size=16, test_batch_size=20)
    assert cfg.loader == "device" and cfg.channels_last  # the fast path is the default
    data = load_data(cfg)
    train, test = build_loaders(cfg, data, CPU)
    assert isinstance(train, DeviceLoader) and len(train) == 4
    batches = list(test)
    assert [len(y) for _, y in batches] == [20, 10]
    x = torch.cat([b[0] for b in batches])
    expected = normalize(torch.from_numpy(data.test.images), MEAN, STD, channels_last=True)
    assert torch.equal(x, expected)  # no augmentation, in order
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(data.test.labels))
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(np.zeros((2, 32, 32, 3), np.float32), np.zeros(2), 2, CPU, augment=False, shuffle=False)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3), 2, CPU, augment=False, shuffle=False)


def test_cli_trains_with_the_device_loader_and_records_sane_timings(tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--loader", "device", "--epochs", "2", "--subset", "48",
            "--test-subset", "20", "--batch-size", "16", "--max-steps", "2", "--out", str(tmp_path)]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = resolve_precision("auto", resolve_device("auto"))  # fp32 on a CPU, bf16 on a CUDA GPU that has it
    assert "loader device" in out and "--workers does not apply" in out and f"precision {expected} (auto)" in out
    (run_dir,) = list(tmp_path.iterdir())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["loader"] == "device" and config["channels_last"] is True
    records = json.loads((run_dir / "records.json").read_text())
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["steps"] == 2 and r["images"] == 32 and r["timing_mode"] == "synchronized"
        parts = r["data_s"] + r["h2d_s"] + r["compute_s"] + r["other_s"]
        assert parts == pytest.approx(r["epoch_s"], rel=1e-9)
        assert 0 <= r["data_s"] < r["compute_s"] and r["images_per_s"] > 0 and r["eval_s"] > 0
        assert math.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 1
    eval_step = json.loads((run_dir / "run.json").read_text())["eval_step"]  # how evaluation's forward ran
    if torch.cuda.is_available():
        assert eval_step["step"] == "cuda-graph" and eval_step["replayed_batches"] == 2  # one full test batch x 2
    else:
        assert eval_step["step"] == "eager" and "CUDA" in eval_step["note"]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("channels_last", [True, False])
def test_chunked_epoch_gives_the_per_batch_pixels_bit_for_bit(world, channels_last):
    """CUDA prepares the epoch in chunks of many batches (few launches); a CPU one batch at a time. The
    batches must not depend on it: same boundaries, same pixels, same labels, same layout, partial batch kept."""
    images = noise_images(75, seed=5)
    labels = np.arange(75)

    def epoch(chunk: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = DeviceLoader(images, labels, 8, CPU, augment=True, shuffle=True, seed=2, rank=rank, world=world,
                              channels_last=channels_last, chunk_images=chunk)
        seed_epoch(2, 3, loader)
        return list(loader)

    for rank in range(world):
        per_batch = epoch(1, rank)  # rounded up to one batch
        for chunk in (20, 64, 10_000):  # not a multiple of the batch (rounded up to 24), several, all at once
            chunked = epoch(chunk, rank)
            assert [len(y) for _, y in chunked] == [len(y) for _, y in per_batch]
            for (x1, y1), (x2, y2) in zip(per_batch, chunked):
                assert torch.equal(x1, x2) and torch.equal(y1, y2)
                layout = torch.channels_last if channels_last else torch.contiguous_format
                assert x2.is_contiguous(memory_format=layout)
    assert DeviceLoader(images, labels, 8, CPU, augment=False, shuffle=False).chunk_images == 8  # CPU: one batch
    with pytest.raises(ValueError, match="chunk_images"):
        DeviceLoader(images, labels, 8, CPU, augment=False, shuffle=False, chunk_images=0)


def test_a_chunked_epoch_launches_far_fewer_ops_than_batch_by_batch():
    """The point of chunks on CUDA: the epoch's gather/pad/crop/flip/normalize ops run per chunk, and a batch is
    two slices (views, no kernel). Counted with the profiler on this CPU; a full CIFAR epoch at batch 128 gave
    7,824 non-view ops batch by batch against 144 in chunks of 8,192 (benchmarks/loader_ops.py)."""
    from torch.profiler import ProfilerActivity, profile

    images, labels = noise_images(1024, seed=7), np.arange(1024)

    def top_level_ops(chunk: int) -> int:
        loader = DeviceLoader(images, labels, 16, CPU, augment=True, shuffle=True, chunk_images=chunk)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            assert sum(1 for _ in loader) == 64
        return sum(1 for e in prof.events() if e.cpu_parent is None)

    assert top_level_ops(1) > 5 * top_level_ops(1024)
