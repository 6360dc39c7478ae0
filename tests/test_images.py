import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_config, sift_train
from sift_cli.config import ConfigError
from sift_cli.data import order
from sift_cli.data import resolve_workers
from sift_cli.data.images import ImageData, View, image_folder, per_sample
from sift_cli.models.resnet import ResNetClassifier
from sift_cli.train import build

FAST = ["model=resnet18", "trainer.batch_size=8", "trainer.max_steps=4", "trainer.max_time_s=null",
        "trainer.eval_every_steps=2", "trainer.eval_every_s=null", "trainer.warmup=0", "logger=none"]
TINY_DIGITS = ["data=digits", "data.image_size=8", "data.max_val_samples=32"]


def tiny_model(arch="resnet18", seed=0):
    torch.manual_seed(seed)
    return ResNetClassifier(arch, num_classes=5, image_size=8)


def image_batch(seed=0, batch=6, size=8):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    return {"images": images, "labels": torch.randint(0, 5, (batch,), generator=g)}


def backbone(model):
    return {n: p for n, p in model.named_parameters() if not n.startswith("exits.")}


# --- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])  # basic blocks and bottlenecks: different widths
def test_every_stage_is_an_exit(arch):
    model, batch = tiny_model(arch).eval(), image_batch()
    with torch.no_grad():
        for k in range(1, model.depth + 1):
            for criterion in ("loss", "entropy"):
                s = model.exit_scores(batch, k, criterion)
                assert s.shape == (6,) and torch.isfinite(s).all() and (s > 0).all()
        early, exact = model.exit_scores(batch, 1, "loss"), model.exit_scores(batch, 4, "loss")
    assert not torch.allclose(early, exact)  # stage 1 has its own head: an approximation


def test_exact_exit_is_the_per_sample_loss_of_the_plain_torchvision_forward():
    model, batch = tiny_model().eval(), image_batch()
    with torch.no_grad():
        scores = model.exit_scores(batch, 4, "loss")
        expected = F.cross_entropy(model.net(batch["images"]), batch["labels"], reduction="none")
    assert torch.allclose(scores, expected, atol=1e-5)


def test_variant_auto_keeps_small_images_at_full_resolution():
    small, large = ResNetClassifier("resnet18", 10, image_size=32), ResNetClassifier("resnet18", 10, image_size=96)
    assert small.variant == "cifar" and small.net.conv1.kernel_size == (3, 3) and small.net.conv1.stride == (1, 1)
    assert isinstance(small.net.maxpool, torch.nn.Identity)
    assert large.variant == "imagenet" and large.net.conv1.kernel_size == (7, 7)
    assert ResNetClassifier("resnet18", 10, image_size=32, variant="imagenet").net.conv1.stride == (2, 2)


@pytest.mark.parametrize("key,kwargs", [("model.arch=vgg16", {"arch": "vgg16"}),
                                        ("model.variant=tiny", {"arch": "resnet18", "variant": "tiny"})])
def test_bad_arch_or_variant_names_the_key(key, kwargs):
    with pytest.raises(ConfigError, match=key):
        ResNetClassifier(num_classes=10, image_size=32, **kwargs)


def test_train_loss_is_the_network_loss_and_the_exit_heads_never_reach_the_backbone():
    model, batch = tiny_model().train(), image_batch()
    loss = model.loss(batch)
    loss.backward()
    with_heads = {n: p.grad.clone() for n, p in backbone(model).items()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.exits.parameters())

    model.zero_grad(set_to_none=True)
    plain = F.cross_entropy(model.net(batch["images"]), batch["labels"])  # batch-norm uses batch statistics
    plain.backward()
    assert torch.allclose(loss, plain, atol=1e-5)  # the logged train_loss: the network's own loss
    for name, p in backbone(model).items():
        assert torch.allclose(with_heads[name], p.grad, atol=1e-6), name


def test_exit_heads_learn_from_the_training_steps():
    model, batch = tiny_model().train(), image_batch(batch=8)
    before = [p.detach().clone() for p in model.exits.parameters()]
    with torch.no_grad():
        exit_loss_before = [model.exit_scores(batch, k, "loss").mean() for k in (1, 2, 3)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        model.loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.exits.parameters()))
    with torch.no_grad():  # the heads fit the batch the network trains on
        exit_loss_after = [model.exit_scores(batch, k, "loss").mean() for k in (1, 2, 3)]
    assert all(a < b for a, b in zip(exit_loss_after, exit_loss_before)), (exit_loss_before, exit_loss_after)


def test_evaluate_reports_each_exit_head_and_sums_across_batches():
    model, batch = tiny_model().eval(), image_batch()
    whole = model.evaluate(batch)
    assert set(whole) == {"loss_sum", "correct", "count", "exit1_correct", "exit2_correct", "exit3_correct"}
    halves = [model.evaluate({k: v[s] for k, v in batch.items()}) for s in (slice(0, 3), slice(3, 6))]
    for key in whole:
        assert torch.allclose(whole[key].float(), sum(h[key] for h in halves).float(), atol=1e-4)
    assert whole["count"] == 6 and 0 <= whole["exit1_correct"] <= 6


# --- data ----------------------------------------------------------------------------------------


def test_configs_compose_for_every_model_and_image_data(tmp_path):
    for model in ("resnet18", "resnet50"):
        for data in (["data=digits"], ["data=cifar10"], ["data=image_folder", f"data.root={tmp_path}"]):
            cfg = make_config([f"model={model}", *data])
            assert cfg.model.arch == model and cfg.data._target_.startswith("sift_cli.data.images.")
            assert (cfg.data.duplicate_fraction, cfg.data.duplicate_pool, cfg.data.noise_fraction) == (0.0, 4, 0.0)
    cfg = make_config(["data=cifar10"])
    assert cfg.data.download is True and cfg.data.verify is True and cfg.data.num_workers == "auto"
    # root null: beside the text caches, in the one cache home
    with pytest.raises(ConfigError, match=f"data.root={os.environ['SIFT_CACHE']}/cifar10 holds no usable"):
        build(make_config(["data=cifar10", "data.download=false"]).data)


def test_digits_are_split_by_class_and_served_as_full_batches():
    data = build(make_config(["data=digits", "data.image_size=8"]).data)
    assert data.task == "image" and data.model_args == {"num_classes": 10, "image_size": 8}
    assert data.num_workers == 0 and data.setting == {"duplicate_fraction": 0.0, "duplicate_pool": 4,
                                                      "noise_fraction": 0.0}
    val_labels = torch.cat([b["labels"] for b in data.val_batches(100)])
    assert data.num_train + len(val_labels) == 1797
    assert (torch.bincount(val_labels, minlength=10) >= 30).all()  # stratified: ~36 of each digit
    b = data.train_batch(4, 512, seed=1)  # 2 full batches per epoch: step 4 is in the third epoch
    assert b["images"].shape == (512, 3, 8, 8) and b["images"].dtype == torch.float32
    assert b["labels"].shape == (512,) and b["labels"].dtype == torch.long
    assert not b["images"].is_pinned()
    assert not torch.equal(data.train_batch(0, 512, seed=1)["labels"], data.train_batch(0, 512, seed=2)["labels"])
    val_again = torch.cat([b["images"] for b in data.val_batches(100)])
    assert torch.equal(val_again, torch.cat([b["images"] for b in data.val_batches(100)]))  # no augmentation


def tiny_digits(*overrides):
    return build(make_config(["data=digits", "data.image_size=8", *overrides]).data)


def test_train_batch_is_a_pure_function_of_its_arguments():
    data = tiny_digits()
    first = data.train_batch(5, 64, seed=3)
    for step in (0, 30, 5, 2):  # other calls in between, the next epoch's permutation among them
        data.train_batch(step, 64, seed=3)
    again, fresh = data.train_batch(5, 64, seed=3), tiny_digits().train_batch(5, 64, seed=3)
    unpickled = pickle.loads(pickle.dumps(data)).train_batch(5, 64, seed=3)  # as a spawned worker sees it
    for other in (again, fresh, unpickled):
        assert all(torch.equal(first[k], other[k]) for k in first)


class Steps(torch.utils.data.Dataset):
    """What the trainer's DataLoader wraps: the step number -> that step's batch."""

    def __init__(self, data, batch_size, seed):
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def __getitem__(self, step):
        return self.data.train_batch(step, self.batch_size, self.seed)


def test_train_batches_from_dataloader_workers_equal_the_main_process_ones():
    data = tiny_digits()
    loader = torch.utils.data.DataLoader(Steps(data, 32, seed=0), batch_size=None, sampler=range(4), num_workers=2)
    for step, batch in enumerate(loader):
        expected = data.train_batch(step, 32, seed=0)
        assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_the_shares_of_the_ranks_make_up_the_global_batch():
    data = tiny_digits()
    whole = data.train_batch(7, 48, seed=2)
    for world in (2, 3):
        shares = [data.train_batch(7, 48, seed=2, rank=r, world=world) for r in range(world)]
        assert all(len(s["labels"]) == 48 // world for s in shares)
        for key in whole:
            assert torch.equal(torch.cat([s[key] for s in shares]), whole[key])


def test_train_batch_leaves_the_callers_random_state_alone(monkeypatch):
    data = tiny_digits()
    reseeded = []  # torch.manual_seed would reseed every CUDA device too: dropout's stream on a GPU
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    torch.manual_seed(123)
    reseeded.clear()
    state = torch.get_rng_state()
    data.train_batch(0, 32, seed=0)
    assert torch.equal(torch.get_rng_state(), state) and reseeded == []


def test_each_step_and_row_draws_its_own_augmentation():
    # one image copied into 90% of the rows: its crops must vary between the rows and between the steps
    data = tiny_digits("data.image_size=16", "data.duplicate_fraction=0.9", "data.duplicate_pool=1")
    pool = data.known.source[data.known.duplicated[0]]

    def copies(step):
        rows = data.known.source[order.global_batch(data.num_train, 32, 0, step)] == pool
        return rows, data.train_batch(step, 32, seed=0)["images"]

    (rows0, first), (rows1, second) = copies(0), copies(1)
    assert len(torch.unique(first[rows0], dim=0)) >= 8  # a 16 px digit has 25 crops: ~17 among ~29 copies
    same_row = rows0 & rows1
    assert (first[same_row] != second[same_row]).flatten(1).any(1).float().mean() > 0.5  # 24 in 25 expected


def numbered(num_train=50, num_val=11, num_classes=5, workers=0, **known):
    """ImageData whose image i is filled with the value i (mean 0, std 1: pixels i/255) and labelled i % C."""
    images = torch.arange(num_train + num_val, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 8, 8)
    labels = torch.arange(num_train + num_val) % num_classes
    samples = torch.utils.data.TensorDataset(images, labels)
    known = {"duplicate_fraction": 0.0, "duplicate_pool": 4, "noise_fraction": 0.0, **known}
    return ImageData("numbered", View(samples, range(num_train), per_sample()), labels[:num_train],
                     View(samples, range(num_train, num_train + num_val), per_sample()), num_classes=num_classes,
                     image_size=8, mean=[0.0] * 3, std=[1.0] * 3, num_workers=workers, split_seed=0, **known)


def ids(batch):
    return (batch["images"][:, 0, 0, 0] * 255).round().long()


def test_every_training_image_appears_once_per_epoch():
    data = numbered()
    steps = [data.train_batch(s, 8, seed=4) for s in range(50 // 8)]
    seen = torch.cat([ids(b) for b in steps])
    assert len(seen) == 48 and len(set(seen.tolist())) == 48
    assert all(torch.equal(b["labels"], ids(b) % 5) for b in steps)  # each image with its own label
    next_epoch = torch.cat([ids(data.train_batch(s, 8, seed=4)) for s in range(6, 12)])
    assert not torch.equal(next_epoch, seen) and len(set(next_epoch.tolist())) == 48


def test_validation_shards_partition_the_validation_images():
    data = numbered(workers=1)
    whole = torch.cat([ids(b) for b in data.val_batches(4)])
    assert whole.tolist() == list(range(50, 61))
    shares = [torch.cat([ids(b) for b in data.val_batches(2, rank=r, world=3)]) for r in range(3)]
    assert sorted(torch.cat(shares).tolist()) == whole.tolist()
    assert [len(s) for s in shares] == [4, 4, 3]


def epoch(data):
    batches = [data.train_batch(s, 10, seed=1) for s in range(5)]  # 10 divides 50: every image once
    order_ = torch.cat([order.global_batch(50, 10, 1, s) for s in range(5)])
    return order_, torch.cat([ids(b) for b in batches]), torch.cat([b["labels"] for b in batches])


def test_duplicates_show_the_content_of_a_small_pool():
    data = numbered(duplicate_fraction=0.2, duplicate_pool=3)
    indices, shown, labels = epoch(data)
    copies = shown != indices
    assert copies.sum() == round(0.2 * 50) and len(set(shown[copies].tolist())) == 3
    assert torch.equal(labels, shown % 5)  # a copy brings its label along
    assert torch.equal(torch.cat([ids(b) for b in data.val_batches(4)]), torch.arange(50, 61))
    assert "10 copies of 3 images" in data.describe()


def test_noisy_samples_get_a_wrong_label_fixed_per_sample():
    data = numbered(noise_fraction=0.3)
    indices, shown, labels = epoch(data)
    assert torch.equal(shown, indices)  # the images stay
    wrong = labels != indices % 5
    assert wrong.sum() == round(0.3 * 50) and ((labels >= 0) & (labels < 5)).all()
    _, _, again = epoch(numbered(noise_fraction=0.3))
    assert torch.equal(again, labels)
    assert torch.equal(torch.cat([b["labels"] for b in data.val_batches(4)]), torch.arange(50, 61) % 5)


def test_known_answer_keys_reach_the_digits_and_never_touch_validation():
    clean, noisy = tiny_digits(), tiny_digits("data.noise_fraction=0.1", "data.duplicate_fraction=0.1")
    assert noisy.setting == {"duplicate_fraction": 0.1, "duplicate_pool": 4, "noise_fraction": 0.1}
    assert (noisy.labels != clean.labels).sum() >= round(0.1 * noisy.num_train)  # noise, and copies' labels
    for a, b in zip(clean.val_batches(128), noisy.val_batches(128)):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("override,message", [
    ("data.noise_fraction=1.5", r"data.noise_fraction=1.5 must lie in \[0, 1\)"),
    ("data.duplicate_fraction=-0.1", r"data.duplicate_fraction=-0.1 must lie in \[0, 1\)"),
    ("data.duplicate_pool=0", "data.duplicate_pool=0 must be a whole number >= 1"),
    ("data.noise_fraction=0.6", "data.duplicate_fraction=0.5 and data.noise_fraction=0.6 leave no room"),
    ("data.num_workers=many", "data.num_workers=many is not allowed; use auto or a whole number >= 0"),
    ("data.num_workers=-1", "data.num_workers=-1 is not allowed"),
])
def test_bad_known_answer_or_worker_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_digits("data.duplicate_fraction=0.5" if "0.6" in override else "data.split_seed=0", override)


@pytest.mark.parametrize("cpus,expected", [(1, 1), (2, 2), (16, 4)])
def test_num_workers_auto_is_the_cpus_this_process_may_use_at_most_4(monkeypatch, tmp_path, cpus, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    write_folder(tmp_path)
    data = build(make_config(["data=image_folder", f"data.root={tmp_path}", "data.val_fraction=0.25"]).data)
    assert data.num_workers == expected
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # e.g. macOS: all the machine's CPUs
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert resolve_workers("auto") == expected and resolve_workers(3) == 3


@pytest.mark.parametrize("override,message", [("data.image_size=4", "data.image_size=4 is too small"),
                                              ("data.val_fraction=1.5", r"data.val_fraction=1.5 must lie in \(0, 1\)")])
def test_bad_digits_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build(make_config(["data=digits", override]).data)


def write_cifar(root, per_batch=4, test=6):
    """A small copy in CIFAR-10's own format: pickled dicts of uint8 N x 3072 rows (channel-major) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
        written[name] = entry
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return written


def test_cifar10_loads_a_local_copy_in_the_official_format(tmp_path):
    written = write_cifar(tmp_path)
    base = ["data=cifar10", f"data.root={tmp_path}", "data.download=false", "data.num_workers=0"]
    with pytest.raises(ConfigError, match="data.verify=false"):  # not the official bytes: md5 sums differ
        build(make_config(base).data)
    cfg = make_config([*base, "data.verify=false"])
    data = build(cfg.data)
    assert data.num_train == 20 and data.model_args == {"num_classes": 10, "image_size": 32}
    val = data.val_batches(4)
    images, labels = torch.cat([b["images"] for b in val]), torch.cat([b["labels"] for b in val])
    test = written["test_batch"]
    assert labels.tolist() == test["labels"]
    mean, std = torch.tensor(list(cfg.data.mean)), torch.tensor(list(cfg.data.std))
    pixels = (images * std[:, None, None] + mean[:, None, None]) * 255
    assert torch.allclose(pixels, torch.from_numpy(test["data"]).float().view(6, 3, 32, 32), atol=1e-3)
    assert data.train_batch(0, 8, seed=0)["images"].shape == (8, 3, 32, 32)


def write_folder(root, classes=("cat", "dog", "fox"), per_class=4):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):  # mixed sizes and modes: ImageFolder converts to RGB, the pipeline resizes
            size, mode = (20 + 3 * i, 14 + 2 * i), ("RGB" if i % 2 else "L")
            pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / c / f"{i}.png")


FOLDER_ARGS = dict(val_fraction=0.25, split_seed=0, image_size=16, hflip=True, mean=[0.5] * 3, std=[0.25] * 3,
                   num_workers=0, max_val_samples=None, duplicate_fraction=0.0, duplicate_pool=4,
                   noise_fraction=0.0)


def test_image_folder_holds_out_a_stratified_split_or_uses_a_validation_folder(tmp_path):
    write_folder(tmp_path / "train")
    data = image_folder(str(tmp_path / "train"), val_root=None, **FOLDER_ARGS)
    assert data.num_train == 9 and data.model_args == {"num_classes": 3, "image_size": 16}
    (val,) = data.val_batches(8)
    assert val["images"].shape == (3, 3, 16, 16) and sorted(val["labels"].tolist()) == [0, 1, 2]
    assert data.train_batch(0, 4, seed=0)["images"].shape == (4, 3, 16, 16)

    write_folder(tmp_path / "val", per_class=2)
    data = image_folder(str(tmp_path / "train"), val_root=str(tmp_path / "val"), **FOLDER_ARGS)
    assert data.num_train == 12 and sum(len(b["labels"]) for b in data.val_batches(4)) == 6
    write_folder(tmp_path / "other", classes=("cat", "dog"))
    with pytest.raises(ConfigError, match="data.val_root=.* differ in the classes fox; both need the same class"):
        image_folder(str(tmp_path / "train"), val_root=str(tmp_path / "other"), **FOLDER_ARGS)


# --- the command line ----------------------------------------------------------------------------


def test_sift_train_on_digits_records_every_exit_heads_accuracy(tmp_path):
    result = sift_train(*FAST, *TINY_DIGITS, "frac=0.5", "exit_layer=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert all(0 <= row[f"val_exit{k}_acc"] <= 1 for k in (1, 2, 3)) and 0 <= row["val_acc"] <= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    arm = (summary["method"], summary["task"], summary["depth"], summary["model"])
    assert arm == ("sift-loss", "image", 4, "resnet18")
    assert summary["samples_seen"] == 32 and summary["samples_backpropagated"] == 16


def no_image_class(root):
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("args,message", [
    ([*TINY_DIGITS, "exit_layer=5"], "exit_layer=5 is beyond resnet18, which has 4 blocks; choose 1..4"),
    (["data=image_folder", "data.root={tmp}/missing"], "data.root={tmp}/missing is not a folder"),
    (["data=image_folder", "data.root={tmp}/empty"], "data.root={tmp}/empty holds no images"),
    (["data=cifar10", "data.root={tmp}/missing", "data.download=false"],
     "data.root={tmp}/missing holds no usable CIFAR-10"),
])
def test_bad_image_input_is_one_line_exit_2(tmp_path, args, message):
    no_image_class(tmp_path / "empty")
    args = [a.format(tmp=tmp_path) for a in args]
    result = sift_train(*FAST, *args, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message.format(tmp=tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
