"""difflm: diffusion language models on one shared masked-diffusion core."""

__version__ = "0.1.0"
