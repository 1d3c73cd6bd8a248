"""DataModules, the bundled digits and the distortion generators."""

from .digits import download_digits, load_digits
from .imagefolder import ImageFolderDataModule, arrange_cub200
from .mnist import (
    ClutteredMNIST,
    DigitsDataModule,
    DigitsDataset,
    DistortedMNIST,
    MNISTAddition,
    MNISTDataModule,
    MultiMNIST,
)

__all__ = [
    "ClutteredMNIST",
    "DigitsDataModule",
    "DigitsDataset",
    "DistortedMNIST",
    "ImageFolderDataModule",
    "MNISTAddition",
    "MNISTDataModule",
    "MultiMNIST",
    "arrange_cub200",
    "download_digits",
    "load_digits",
]
