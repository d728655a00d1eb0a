from .flow import FlowMatching
from .gaussian import GaussianDiffusion, training_losses
from .sampling import sample


def objective_for(config):
    """The training objective a model's config states: DiT's Gaussian diffusion (eps) or
    SiT's flow matching (velocity on the linear path)."""
    if config.prediction == "velocity":
        return FlowMatching(config.time_input)
    return GaussianDiffusion.create(learn_sigma=config.learn_sigma)


__all__ = ["FlowMatching", "GaussianDiffusion", "objective_for", "training_losses", "sample"]
