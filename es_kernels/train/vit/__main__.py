"""``python -m es_kernels.train.vit`` (what ``torchrun -m`` needs) is ``es-vit``."""

from es_kernels.train.vit.cli import main

if __name__ == "__main__":
    main()
