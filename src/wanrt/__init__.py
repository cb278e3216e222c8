"""wanrt: WAN 2.2 image-to-video (A14B, two experts) inference server."""

__version__ = "0.1.0"
