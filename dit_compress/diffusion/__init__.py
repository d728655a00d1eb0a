from .gaussian import GaussianDiffusion, training_losses
from .sampling import sample

__all__ = ["GaussianDiffusion", "training_losses", "sample"]
