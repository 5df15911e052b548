"""Checkpoints: a ``state_dict`` file plus a small JSON config beside it, each written
atomically (temp file in the same folder, then ``os.replace``) and loaded with
``torch.load(..., weights_only=True)``: no pickled code, safe on untrusted files.

Layout: ``best.pt`` (the state_dict) and ``best.json`` (the config).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]


def config_path(path: PathLike) -> Path:
    """The JSON config that accompanies checkpoint ``path`` (same stem, ``.json``)."""
    return Path(path).with_suffix(".json")


def atomic_write(path: Path, write) -> None:
    """Call ``write(binary_file)`` on a temp file in ``path``'s folder, then ``os.replace`` it onto
    ``path``: an interruption leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: PathLike, state: Union[nn.Module, Dict[str, torch.Tensor]],
                    config: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``state`` (a module's or a ready ``state_dict``) to ``path`` and ``config``
    (JSON-serialisable) to :func:`config_path`. Tensors are copied to the CPU first."""
    path = Path(path)
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    sd = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    atomic_write(path, lambda fh: torch.save(sd, fh))
    if config is not None:
        text = json.dumps(config, indent=2, sort_keys=True, default=str).encode()
        atomic_write(config_path(path), lambda fh: fh.write(text))
    return path


def load_checkpoint(path: PathLike, model: Optional[nn.Module] = None,
                    map_location: Union[str, torch.device] = "cpu",
                    strict: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Load ``(state_dict, config)``; when ``model`` is given, load the weights into it.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a state_dict checkpoint (e.g. a pickled whole model, as
            MultiBench writes), or its JSON config is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        sd = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickled modules, truncated files, non-torch files
        raise ValueError(f"{str(path)!r} is not a state_dict checkpoint readable with weights_only=True "
                         f"(a pickled whole model, as MultiBench saves, is not accepted): {exc}") from exc
    if not isinstance(sd, dict):
        raise ValueError(f"{str(path)!r} holds a {type(sd).__name__}, expected a state_dict (dict of tensors)")
    config: Dict[str, Any] = {}
    cpath = config_path(path)
    if cpath.is_file():
        try:
            config = json.loads(cpath.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"checkpoint config {str(cpath)!r} is not valid JSON: {exc}") from exc
    if model is not None:
        model.load_state_dict(sd, strict=strict)
    return sd, config
