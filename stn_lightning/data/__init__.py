"""DataModules, the bundled digits and the distortion generators."""

from .digits import download_digits, load_digits
from .files import ImageFilesDataModule, expand_image_paths
from .imagefolder import BadImageError, ImageFolderDataModule, arrange_cub200
from .mnist import (
    ClutteredMNIST,
    DigitsDataModule,
    DigitsDataset,
    DistortedMNIST,
    MNISTAddition,
    MNISTDataModule,
    MultiMNIST,
)
from .scenes import DigitScenes
from .sequences import DigitSequences

__all__ = [
    "BadImageError",
    "ImageFilesDataModule",
    "ClutteredMNIST",
    "DigitScenes",
    "DigitSequences",
    "DigitsDataModule",
    "DigitsDataset",
    "DistortedMNIST",
    "ImageFolderDataModule",
    "MNISTAddition",
    "MNISTDataModule",
    "MultiMNIST",
    "arrange_cub200",
    "download_digits",
    "expand_image_paths",
    "load_digits",
]
