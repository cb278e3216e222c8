"""What the network is: the two-expert WAN 2.2 I2V model, its loaders and the tiny built-in model."""

from wanrt.model.components import WanI2VModel

__all__ = ["WanI2VModel"]
