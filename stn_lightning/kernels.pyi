# For type checkers only: the repository's kernels/ folder is installed as stn_lightning.kernels (see pyproject.toml),
# which mypy cannot follow from the source tree, so this stub points it at the folder, checked as "kernels".
from kernels import *  # noqa: F403
from kernels import reference as reference
from kernels import torch_path as torch_path
