"""difflm: diffusion language models on one shared masked-diffusion core."""

from difflm.auto import install as _install_auto_classes

__version__ = "0.1.0"

_install_auto_classes()  # lazy: registers difflm's model types once transformers' Auto classes load
