"""stn-lightning: K parallel spatial transformers in front of any timm backbone, trained with Lightning."""

# Registers the paper's networks with timm (torch and timm only), so that any timm model name resolves to them.
from . import backbones as backbones

__version__ = "0.1.0"
