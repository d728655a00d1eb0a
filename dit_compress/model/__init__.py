from .dit import DiT, DiTBlock

__all__ = ["DiT", "DiTBlock"]
