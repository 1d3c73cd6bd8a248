"""The package root exports what a user needs, typed."""

from __future__ import annotations

import os
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


def test_import_loads_neither_timm_nor_matplotlib_and_timm_still_finds_the_paper_networks() -> None:
    code = (
        "import sys, stn_lightning\n"
        "heavy = [m for m in ('timm', 'matplotlib', 'torch') if m in sys.modules]\n"
        "import timm\n"
        "print(heavy, timm.is_model('stn_paper_cnn'), 'stn_lightning.backbones' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True True"  # timm, when it comes, registers the paper's networks at once


def test_kernels_coexist_with_a_top_level_kernels_package(tmp_path: Path) -> None:
    # PyPI's "kernels" installs a top-level package of that name; ours is stn_lightning.kernels, so both import.
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'pypi'\n")
    code = (
        "import kernels, stn_lightning.kernels as ours\n"
        "assert kernels.WHO == 'pypi', kernels.__file__\n"
        "assert callable(ours.sample_affine) and ours.__name__ == 'stn_lightning.kernels'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_kernels_are_found_in_a_source_tree_without_installation(tmp_path: Path) -> None:
    # What a GPU session does: the project on PYTHONPATH, nothing installed (editable finders switched off here).
    root = Path(stn_lightning.__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "import stn_lightning.kernels as k\n"
        f"assert k.__file__.startswith({str(root / 'kernels')!r}), k.__file__\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
