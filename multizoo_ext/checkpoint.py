"""Checkpoints: weights and config in ONE file, written atomically (temp file in the same
folder, fsync, then ``os.replace``) and loaded with ``torch.load(..., weights_only=True)``:
no pickled code, safe on untrusted files.

Layout: ``best.pt`` holds ``{"format": FORMAT, "state_dict": {...}, "config": {...}}``, so
the weights and their config are replaced together and can never disagree; ``best.json``
is a human-readable copy of the same config written by the same call (after the ``.pt``).
:func:`load_checkpoint` takes the config from the ``.pt``; the JSON is read only for older
checkpoints (a bare state_dict beside a JSON file). Files get the usual permissions
(``0o666`` minus the umask), not the temp file's ``0o600``.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]

#: Marks a one-file checkpoint (state_dict and config together).
FORMAT = "multizoo_ext.checkpoint/1"
_umask_lock = threading.Lock()


def _file_mode() -> int:
    """``0o666`` minus the process umask (what ``open()`` would give a new file)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def config_path(path: PathLike) -> Path:
    """The JSON config that accompanies checkpoint ``path`` (same stem, ``.json``)."""
    return Path(path).with_suffix(".json")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(binary_file)`` on a temp file in ``path``'s folder, then ``os.replace`` it onto
    ``path``: an interruption leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), _file_mode())  # mkstemp's 0o600 -> the usual 0o644
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: PathLike, state: Union[nn.Module, Dict[str, torch.Tensor]],
                    config: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``state`` (a module's or a ready ``state_dict``) and ``config`` (JSON-serialisable;
    other values are stored as their ``str``) as one file at ``path``, then the same config
    as JSON at :func:`config_path` (a readable copy). Tensors are copied to the CPU first.

    Raises:
        ValueError: ``path`` ends in ``.json`` (the config's name).
        TypeError: ``config`` is not a dict.
        OSError: the folder is not writable or the disk is full (the previous checkpoint at
            ``path``, if any, is left whole).
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise ValueError(f"checkpoint path {str(path)!r} ends in .json, the name of its config file; "
                         "use e.g. 'best.pt'")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"checkpoint config must be a dict, got {type(config).__name__}")
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    sd = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    text = json.dumps(config or {}, indent=2, sort_keys=True, default=str)
    cfg = json.loads(text)  # exactly what the JSON copy says
    buf = io.BytesIO()  # serialised in memory, so a full disk is a plain OSError from the write below
    torch.save({"format": FORMAT, "state_dict": sd, "config": cfg}, buf)
    data = buf.getbuffer()
    atomic_write(path, lambda fh: fh.write(data))
    atomic_write(config_path(path), lambda fh: fh.write(text.encode()))
    return path


def load_checkpoint(path: PathLike, model: Optional[nn.Module] = None,
                    map_location: Union[str, torch.device] = "cpu",
                    strict: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Load ``(state_dict, config)``; when ``model`` is given, load the weights into it.

    The config comes from the checkpoint file itself; for an older checkpoint (a bare
    state_dict) from the JSON beside it, or ``{}`` when there is none.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``path`` ends in ``.json``; the file is not a state_dict checkpoint (e.g. a
            pickled whole model, as MultiBench writes); an older checkpoint's JSON config is
            malformed.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise ValueError(f"{str(path)!r} is a checkpoint's JSON config; load the weights file (e.g. 'best.pt')")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickled modules, truncated files, non-torch files
        raise ValueError(f"{str(path)!r} is not a state_dict checkpoint readable with weights_only=True "
                         f"(a pickled whole model, as MultiBench saves, is not accepted): {exc}") from exc
    if not isinstance(blob, dict):
        raise ValueError(f"{str(path)!r} holds a {type(blob).__name__}, expected a state_dict (dict of tensors)")
    if blob.get("format") == FORMAT:
        sd, config = blob.get("state_dict"), blob.get("config")
        if not isinstance(sd, dict) or not isinstance(config, dict):
            raise ValueError(f"{str(path)!r} is a damaged checkpoint: its state_dict or config is not a dict")
    else:  # an older checkpoint: bare state_dict, config in the JSON beside it
        sd, config = blob, {}
        cpath = config_path(path)
        if cpath.is_file():
            try:
                config = json.loads(cpath.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"checkpoint config {str(cpath)!r} is not valid JSON: {exc}") from exc
    if model is not None:
        model.load_state_dict(sd, strict=strict)
    return sd, config
