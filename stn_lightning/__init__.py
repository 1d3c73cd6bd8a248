"""stn-lightning: K parallel spatial transformers in front of any timm backbone, trained with Lightning.

The classes a user needs are importable from here (``from stn_lightning import SpatialTransformer, Affine,
STNModule``). They load on first use, so ``import stn_lightning`` stays light: it imports neither timm nor torch.
The paper's networks (``stn_lightning.backbones``) are registered with timm as soon as timm is imported, by whoever
imports it, so that ``timm.create_model("stn_paper_cnn")`` works after ``import stn_lightning``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
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


class _RegisterBackbonesWithTimm(importlib.abc.MetaPathFinder):
    """Imports ``stn_lightning.backbones`` (which registers the paper's networks) right after timm is first imported.

    timm takes seconds to import; the package's own imports of it (localisers, backbones, the transformer's FX
    registration) and a user's ``import timm`` all pass through here once, so the names resolve whoever asks first.
    """

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # once; the search below must not find this finder again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            importlib.import_module(f"{__name__}.backbones")

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    from . import backbones as backbones  # noqa: E402 - timm is there already: register now
elif not any(isinstance(f, _RegisterBackbonesWithTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterBackbonesWithTimm())

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
    "TransformerSpec": "transformer",
    "LocalizationTraining": "recipe",
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
    "LocalizationTraining",
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
    "TransformerSpec",
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
    if name in ("kernels", "backbones"):
        return importlib.import_module(f".{name}", __name__)
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
    from .recipe import LocalizationTraining
    from .transformer import SpatialTransformer, STOutput, TransformerSpec
    from .transforms import (
        Affine,
        Attention,
        Projective,
        Similarity,
        ThinPlateSpline,
        Transform,
        Translation,
    )
