"""MocoSFL: split federated learning with momentum contrast, simulated for thousands of clients."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_encoder", "load_config"]


def load_encoder(path: Any, device: Any = "cpu") -> Any:
    """The trained encoder (client model + server backbone) as one frozen ``nn.Module``."""
    from mocosfl.workflow import load_encoder as _load

    return _load(path, device)


def load_config(*args: Any, **kwargs: Any) -> Any:
    from mocosfl.config import load_config as _load

    return _load(*args, **kwargs)
