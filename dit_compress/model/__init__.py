from .dit import DiT, DiTBlock
from .routers import Routing, routing

__all__ = ["DiT", "DiTBlock", "Routing", "routing"]
