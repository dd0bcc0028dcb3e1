"""The embedded default: scikit-learn's digits (shipped with the package, no download) written as an ImageFolder.

The demo then runs the very same recipe as ImageNet (ImageFolder, timm transforms, a timm ViT), only smaller: a
4-block ViT on 32x32 images, so it finishes in minutes on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

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
