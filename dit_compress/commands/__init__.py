"""Every ``ditc`` command as a library function with keyword-only options. The CLI and the
recipe runner both call these; ``COMMANDS`` maps command names to them."""

from .checkpoint import convert, create, info
from .compression import add_dynamic_width, add_token_router, prune_depth
from .evaluation import bench, evaluate_model, frontier, prepare_data
from .training import distill, finetune, learn_cache

COMMANDS = {
    "info": info, "convert": convert, "create": create, "finetune": finetune, "distill": distill,
    "prune-depth": prune_depth, "add-dynamic-width": add_dynamic_width, "add-token-router": add_token_router,
    "eval": evaluate_model, "bench": bench, "prepare-data": prepare_data, "frontier": frontier,
    "learn-cache": learn_cache,
}

__all__ = ["COMMANDS", "add_dynamic_width", "add_token_router", "bench", "convert", "create", "distill", "evaluate_model",
           "finetune", "frontier", "info", "learn_cache", "prepare_data", "prune_depth"]
