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
from sift_cli.data.images import image_folder
from sift_cli.models.resnet import ResNetClassifier
from sift_cli.train import build

FAST = ["model=resnet18", "trainer.batch_size=8", "trainer.max_steps=4", "trainer.max_time_s=null",
        "trainer.eval_every_steps=2", "trainer.eval_every_s=null", "trainer.warmup_steps=0", "logger=none"]
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
    cfg = make_config(["data=cifar10"])
    assert cfg.data.root == f"{os.environ['SIFT_CACHE']}/cifar10"  # beside the text caches
    assert cfg.data.download is True and cfg.data.verify is True


def test_digits_are_split_by_class_and_batched_endlessly_in_seeded_order():
    data = build(make_config(["data=digits", "data.image_size=8"]).data)
    assert data.task == "image" and data.model_args == {"num_classes": 10, "image_size": 8}
    val_labels = torch.cat([b["labels"] for b in data.val_batches(100)])
    assert data.num_train + len(val_labels) == 1797
    assert (torch.bincount(val_labels, minlength=10) >= 30).all()  # stratified: ~36 of each digit
    batches = data.train_batches(512, seed=1)
    first = [next(batches) for _ in range(5)]  # 2 full batches per epoch: runs into the third epoch
    for b in first:
        assert b["images"].shape == (512, 3, 8, 8) and b["images"].dtype == torch.float32
        assert b["labels"].shape == (512,) and b["labels"].dtype == torch.long
    assert torch.equal(next(data.train_batches(512, seed=1))["labels"], first[0]["labels"])
    assert not torch.equal(next(data.train_batches(512, seed=2))["labels"], first[0]["labels"])
    assert not torch.equal(first[0]["labels"], first[2]["labels"])  # each epoch reshuffled
    val_again = torch.cat([b["images"] for b in data.val_batches(100)])
    assert torch.equal(val_again, torch.cat([b["images"] for b in data.val_batches(100)]))  # no augmentation


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
    assert next(data.train_batches(8, seed=0))["images"].shape == (8, 3, 32, 32)


def write_folder(root, classes=("cat", "dog", "fox"), per_class=4):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):  # mixed sizes and modes: ImageFolder converts to RGB, the pipeline resizes
            size, mode = (20 + 3 * i, 14 + 2 * i), ("RGB" if i % 2 else "L")
            pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / c / f"{i}.png")


FOLDER_ARGS = dict(val_fraction=0.25, split_seed=0, image_size=16, hflip=True, mean=[0.5] * 3, std=[0.25] * 3,
                   num_workers=0, max_val_samples=None)


def test_image_folder_holds_out_a_stratified_split_or_uses_a_validation_folder(tmp_path):
    write_folder(tmp_path / "train")
    data = image_folder(str(tmp_path / "train"), val_root=None, **FOLDER_ARGS)
    assert data.num_train == 9 and data.model_args == {"num_classes": 3, "image_size": 16}
    (val,) = data.val_batches(8)
    assert val["images"].shape == (3, 3, 16, 16) and sorted(val["labels"].tolist()) == [0, 1, 2]
    assert next(data.train_batches(4, seed=0))["images"].shape == (4, 3, 16, 16)

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
