"""The package root exports what a user needs, typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import stn_lightning


def test_every_public_name_resolves() -> None:
    for name in stn_lightning.__all__:
        assert getattr(stn_lightning, name) is not None, name
    from stn_lightning import Affine, SpatialTransformer, STNModule  # noqa: F401  (the README's import)


def test_root_imports_build_a_transformer() -> None:
    import torch

    from stn_lightning import Attention, PaperLocalizer, SpatialTransformer

    st = SpatialTransformer(PaperLocalizer(in_chans=1), Attention(), num_transformers=2, output_size=20)
    crops, params = st(torch.randn(3, 1, 40, 40))
    assert crops.shape == (3, 2, 1, 20, 20) and params.shape == (3, 2, 3)


def test_import_stays_light_and_the_package_is_typed() -> None:
    code = "import sys, stn_lightning; print('pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # Lightning loads only when a Lightning class is asked for
    assert (Path(stn_lightning.__file__).parent / "py.typed").is_file()
