"""stn-lightning: K parallel spatial transformers in front of any timm backbone, trained with Lightning.

The classes a user needs are importable from here (``from stn_lightning import SpatialTransformer, Affine,
STNModule``). They load on first use, so ``import stn_lightning`` stays light; importing the package registers
the paper's networks with timm (``stn_lightning.backbones``).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any


def _find_kernels_in_the_source_tree() -> None:
    # Installed (also editable), the repository's kernels/ folder is the subpackage stn_lightning.kernels. Run from a
    # source tree without installation (PYTHONPATH=<repo>), it sits next to this package: search there too.
    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    installed = (here / "kernels").is_dir() or not (source / "reference.py").is_file()
    if not installed and importlib.util.find_spec(f"{__name__}.kernels") is None:
        __path__.append(str(here.parent))


_find_kernels_in_the_source_tree()

# Registers the paper's networks with timm (torch and timm only), so that any timm model name resolves to them.
from . import backbones as backbones  # noqa: E402 - after the kernels' path, which backbones does not need

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "Affine": "transforms",
    "Attention": "transforms",
    "Projective": "transforms",
    "Similarity": "transforms",
    "ThinPlateSpline": "transforms",
    "Transform": "transforms",
    "Translation": "transforms",
    "SpatialTransformer": "transformer",
    "STOutput": "transformer",
    "InnerTransformers": "insertion",
    "InsertedTransformer": "insertion",
    "inner_regions": "insertion",
    "insert_transformers": "insertion",
    "inserted_transformers": "insertion",
    "FeatureLocalizer": "localization",
    "PaperLocalizer": "localization",
    "TimmLocalizer": "localization",
    "STNClassifier": "model",
    "STNModule": "module",
    "Task": "tasks",
    "Classification": "tasks",
    "SumOfObjects": "tasks",
    "SequenceReading": "tasks",
    "SetOfObjects": "tasks",
    "CoLocalization": "metrics",
    "overlap_penalty": "metrics",
    "AttentionVisualizer": "callbacks",
    "PredictionWriter": "callbacks",
    "draw_attention": "callbacks",
    "STNCheckpoint": "checkpointing",
    "NonFiniteError": "checkpointing",
    "DistortedMNIST": "data",
    "ClutteredMNIST": "data",
    "MNISTAddition": "data",
    "MultiMNIST": "data",
    "DigitScenes": "data",
    "DigitSequences": "data",
    "MNISTDataModule": "data",
    "ImageFolderDataModule": "data",
    "ImageFilesDataModule": "data",
    "main": "cli",
}

__all__ = [
    "Affine",
    "Attention",
    "AttentionVisualizer",
    "Classification",
    "ClutteredMNIST",
    "CoLocalization",
    "DigitScenes",
    "DigitSequences",
    "DistortedMNIST",
    "FeatureLocalizer",
    "ImageFilesDataModule",
    "ImageFolderDataModule",
    "InnerTransformers",
    "InsertedTransformer",
    "MNISTAddition",
    "MNISTDataModule",
    "MultiMNIST",
    "NonFiniteError",
    "PaperLocalizer",
    "PredictionWriter",
    "Projective",
    "STNCheckpoint",
    "STNClassifier",
    "STNModule",
    "STOutput",
    "SequenceReading",
    "SetOfObjects",
    "Similarity",
    "SpatialTransformer",
    "SumOfObjects",
    "Task",
    "ThinPlateSpline",
    "TimmLocalizer",
    "Transform",
    "Translation",
    "backbones",
    "kernels",
    "draw_attention",
    "inner_regions",
    "insert_transformers",
    "inserted_transformers",
    "main",
    "overlap_penalty",
]


def __getattr__(name: str) -> Any:
    if name == "kernels":
        return importlib.import_module(".kernels", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stn_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .callbacks import AttentionVisualizer, PredictionWriter, draw_attention
    from .checkpointing import NonFiniteError, STNCheckpoint
    from .cli import main
    from .data import (
        ClutteredMNIST,
        DigitScenes,
        DigitSequences,
        DistortedMNIST,
        ImageFilesDataModule,
        ImageFolderDataModule,
        MNISTAddition,
        MNISTDataModule,
        MultiMNIST,
    )
    from .insertion import InsertedTransformer, inner_regions, insert_transformers, inserted_transformers
    from .localization import FeatureLocalizer, PaperLocalizer, TimmLocalizer
    from .metrics import CoLocalization, overlap_penalty
    from .model import STNClassifier
    from .module import STNModule
    from .transformer import SpatialTransformer, STOutput
    from .transforms import (
        Affine,
        Attention,
        Projective,
        Similarity,
        ThinPlateSpline,
        Transform,
        Translation,
    )
