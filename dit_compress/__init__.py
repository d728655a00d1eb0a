"""dit_compress: compress pretrained Diffusion Transformers.

    import dit_compress
    model = dit_compress.load_model("digits-dit")           # or a hub id, dir or .pt
    x = dit_compress.sample(model, noise, y, sampler="ddim", steps=50, cfg_scale=2.0)
    dit_compress.save_model(model, "out/", format="ditc")   # ditc | diffusers | original
"""

from .config import DiTConfig
from .diffusion import sample, training_losses
from .errors import DitcError
from .formats import load_model, save_model
from .model import DiT

__version__ = "0.1.0"
__all__ = ["DiT", "DiTConfig", "DitcError", "load_model", "save_model", "sample", "training_losses", "__version__"]
