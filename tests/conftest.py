"""Session-wide settings, made before any test module is collected.

* Without a GPU, the Triton kernel tests run through Triton's interpreter. Triton reads TRITON_INTERPRET when it is
  first imported, and other test modules import it indirectly (through Lightning and torch._dynamo), so the switch
  is thrown here.
* One intra-op thread (unless OMP_NUM_THREADS says otherwise): the tests' tensors are small, and on a machine whose
  cores are shared, PyTorch's threads wait for each other far longer than they compute (a config's two training steps
  took 25 s with two threads and 5 s with one under a load of 10 on two cores). Subprocesses inherit the setting.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def quiet_trainer(tmp_path: Path) -> Callable[..., Any]:
    """A factory of CPU Trainers without logger, checkpoints, progress bar or summary, in the test's tmp_path;
    keyword arguments add to or replace these."""
    import pytorch_lightning as pl

    def make(**kwargs: Any) -> pl.Trainer:
        options: dict[str, Any] = {
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": tmp_path,
        }
        return pl.Trainer(**{**options, **kwargs})

    return make
