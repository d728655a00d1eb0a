"""The README.md model card written beside every ditc checkpoint."""

from __future__ import annotations

import json

from ..model.family import family_of


def model_card(model, report: dict | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg = model.config
    lineage = "\n".join(f"{i + 1}. `{json.dumps(step, default=str)}`" for i, step in enumerate(cfg.lineage)) or "(none)"
    content = f"""---
{ModelCardData(library_name="dit_compress", tags=["diffusion", "dit", "dit_compress"]).to_yaml()}
---

# {cfg.name or cfg.describe_arch()}

A Diffusion Transformer checkpoint written by `dit_compress` (`ditc`).

| field | value |
|---|---|
| architecture | {cfg.describe_arch()} |
| depth (source depth) | {cfg.depth} ({cfg.source_depth}) |
| kept source layers | {cfg.kept_layers} |
| hidden / heads | {cfg.hidden_size} / {cfg.num_heads} |
| input | {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, patch {cfg.patch_size} |
| parameters | {model.num_params():,} |
| static GFLOPs (MACs) | {family_of(cfg).static_macs(cfg)['total'] / 1e9:.3f} |
| dynamic width | {cfg.width.to_dict() if cfg.width else "no"} |
| token routing | {cfg.tokens.to_dict() if cfg.tokens else "no"} |

## Lineage
{lineage}

## Use
```python
import dit_compress
model = dit_compress.load_model("path/to/this/dir")
```
"""
    return str(ModelCard(content))
