"""stn-lightning: K parallel spatial transformers in front of any timm backbone, trained with Lightning."""

__version__ = "0.1.0"
