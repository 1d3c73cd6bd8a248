"""Train, validate, test or predict with stn-lightning: ``python train.py fit --config configs/demo.yaml``."""

from stn_lightning.cli import console

if __name__ == "__main__":
    console()
