"""promptlab: prompt learning on frozen CLIP-family models."""
__version__ = "0.1.0"
