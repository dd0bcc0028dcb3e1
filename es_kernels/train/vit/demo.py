"""The embedded default: scikit-learn's digits (shipped with the package, no download) written as an ImageFolder.

The demo then runs the very same recipe as ImageNet (ImageFolder, timm transforms, a timm ViT), only smaller: a
4-block ViT on 32x32 images, so it finishes in minutes on a laptop CPU.

It runs in the paper's regime, fine-tuning a pre-trained model: the ViT is first trained once on another task built
from the same training images (which pair {0,1}, {2,3}, ..., {8,9} a digit belongs to), its weights cached in
``--cache-dir``; every method then fine-tunes from them to the ten digits (the 5-way head is dropped, as for any
checkpoint whose classifier has another shape). ``--from-scratch`` skips the pre-training: the setting where
selection costs accuracy (each of ES's updates sees a quarter of the samples while the features are still forming).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from es_kernels.train.data import cacheable_threads
from es_kernels.train.vit import checkpoint

DEMO_SIZE = 32  # pixels; 8x8 digits are upscaled so a patch-8 ViT sees 16 patches

# The tiny ViT of the demo: timm's vit_tiny_patch16_224 architecture with these overrides. Average pooling of the
# patch tokens instead of a class token: trained from scratch on 1347 images it learns markedly faster.
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_MODEL_KWARGS = {
    "img_size": DEMO_SIZE,
    "patch_size": 8,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 3,
    "global_pool": "avg",
}


# The pre-training's own settings (its cache key holds them and the model's).
PRETRAIN_LR = 2e-3
PRETRAIN_BATCH = 64
PRETRAIN_SEED = 1234
PAIRS = 5


def pair_of(digit: int) -> int:
    """The pre-training label: which pair {0,1}, {2,3}, ... the digit (the ImageFolder class index) belongs to."""
    return digit // 2


def pretrained_path(args: argparse.Namespace) -> Path:
    """Where the pre-trained weights of these settings are cached (a key over everything that shapes them)."""
    settings = [args.model, sorted(dict(args.model_kwargs).items()), args.pretrain_epochs, PRETRAIN_LR]
    settings += [PRETRAIN_BATCH, PRETRAIN_SEED, DEMO_SIZE, "pairs-v2"]
    key = hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:12]
    return args.cache_dir / f"vit-demo-pairs-{key}.pt"


def pretrain(args: argparse.Namespace, device: torch.device) -> Path:
    """Train the demo model on the pairs task (``args.pretrain_epochs`` epochs, AdamW, OneCycle) unless its weights
    are cached; returns the weights' path. Seeded alone (the same weights in any process); global random streams
    are left as they were."""
    import timm
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from es_kernels.train.vit.model import transforms

    path = pretrained_path(args)
    if path.exists():
        return path
    with checkpoint.seeded(PRETRAIN_SEED, device), cacheable_threads():
        net = timm.create_model(args.model, num_classes=PAIRS, **dict(args.model_kwargs)).to(device)
        train_transform, _ = transforms(args, net)
        images = ImageFolder(str(args.data / "train"), transform=train_transform, target_transform=pair_of)
        order = torch.Generator().manual_seed(PRETRAIN_SEED)
        loader = DataLoader(images, batch_size=PRETRAIN_BATCH, shuffle=True, generator=order, drop_last=True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=PRETRAIN_LR, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, PRETRAIN_LR, total_steps=max(1, args.pretrain_epochs * len(loader))
        )
        net.train()
        for _ in range(args.pretrain_epochs):
            for inputs, labels in loader:
                inputs, labels = inputs.to(device), labels.to(device)
                loss = torch.nn.functional.cross_entropy(net(inputs), labels, label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    weights: dict[str, Any] = {key: value.detach().cpu() for key, value in net.state_dict().items()}
    torch.save(weights, temporary)
    temporary.replace(path)
    return path


def write_digits_imagefolder(root: Path, *, test_size: int = 450, seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (1347 / 450 images) unless present.

    The split is stratified and fixed by ``seed``. Returns ``root``. A half-written folder (interrupted run) is
    detected by a marker file written last, and rewritten.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    marker = root / ".complete"
    if marker.exists():
        return root
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    positions = np.arange(len(images))
    train, val = train_test_split(positions, test_size=test_size, stratify=digits.target, random_state=seed)
    for split, chosen in (("train", train), ("val", val)):
        for position in chosen:
            folder = root / split / str(digits.target[position])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[position], mode="L").resize((DEMO_SIZE, DEMO_SIZE), Image.BILINEAR)
            image.save(folder / f"{position:04d}.png")
    marker.write_text("digits\n")
    return root
