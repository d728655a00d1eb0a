"""dit_compress: compress pretrained Diffusion Transformers.

    import dit_compress
    model = dit_compress.load_model("digits-dit")           # or a hub id, dir or .pt
    x = dit_compress.sample(model, noise, y, sampler="ddim", steps=50, cfg_scale=2.0)
    dit_compress.save_model(model, "out/", format="ditc")   # ditc | diffusers | original
    x = dit_compress.sample(model, noise, y, compile=True)  # torch.compile once, bounded graphs
    y, null = dit_compress.encode_prompts("pixart-pipeline/", ["a red square"])  # text-to-image captions
    x = dit_compress.sample(pixart, noise, y, negative=null, cfg_scale=4.5)
    mar = dit_compress.load_model("checkpoint-last.pth")   # MAR: main_mar.py's checkpoint with args
    z = dit_compress.sample_mar(mar, labels, num_iter=64, cfg_scale=3.0, seed=0)

Every ``ditc`` command is a function here with the same options as keywords, e.g.
``dit_compress.prune_depth("digits-dit", output="tiny/", pattern="1:2", data="digits")``.
"""

from .commands import (
    add_dynamic_width,
    add_token_router,
    bench,
    convert,
    create,
    distill,
    evaluate_model,
    finetune,
    frontier,
    info,
    learn_cache,
    prepare_data,
    prune_depth,
)
from .compress.dynamic import set_token_capacity
from .config import DiTConfig
from .data.text import encode_prompts
from .diffusion import sample, sample_mar, training_losses
from .errors import DitcError, FormatError, MissingFactError, TrainingError, UsageError
from .formats import load_model, save_model
from .model import DiT
from .model.pixart import Captions
from .model.compile import compile_model

__version__ = "0.1.0"
__all__ = ["Captions", "DiT", "DiTConfig", "DitcError", "FormatError", "MissingFactError", "TrainingError", "UsageError", "add_dynamic_width", "add_token_router", "bench", "compile_model", "convert", "create",
           "distill", "encode_prompts", "evaluate_model", "finetune", "frontier", "info", "learn_cache", "load_model", "prepare_data", "prune_depth", "sample", "sample_mar",
           "save_model", "set_token_capacity", "training_losses", "__version__"]
