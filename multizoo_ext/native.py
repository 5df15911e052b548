"""Optional native kernels: a C source shipped with the package, compiled on first use with
the system C compiler and loaded with ``ctypes``.

Used where eager PyTorch pays more for launching its ops than for their arithmetic (the
Multi-Similarity loss on a CPU batch: ~30 small ops over a (B, B) matrix). Nothing here is
required: without a compiler (or with ``MULTIZOO_EXT_NATIVE=0`` in the environment, or inside
:func:`disabled`) :func:`load` returns None and the callers run their eager PyTorch code,
which computes the same values.

- Compiler: ``$CC`` if set, else ``cc``, ``gcc`` or ``clang`` on the ``PATH``.
- Flags: ``-O3 -fPIC -shared -fno-trapping-math -fno-strict-aliasing -fopenmp-simd`` (so
  that the loops vectorise without ``-ffast-math``: IEEE semantics are kept), plus
  ``-march=native`` where the compiler accepts it.
- Cache: ``$MULTIZOO_EXT_CACHE`` or ``$XDG_CACHE_HOME/multizoo_ext`` (default
  ``~/.cache/multizoo_ext``); the file name holds a hash of the source, the compiler, the
  flags and the CPU (its ``/proc/cpuinfo`` flags on Linux), so that a home directory shared
  by different machines never loads a library built for another CPU. Written atomically
  (temporary file, then rename).
- A failure (no compiler, compile error, load error) is logged once at WARNING and the
  result cached for the process: the eager path is used from then on.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional

logger = logging.getLogger(__name__)

ENV_SWITCH = "MULTIZOO_EXT_NATIVE"
ENV_CACHE = "MULTIZOO_EXT_CACHE"
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c99", "-fno-trapping-math", "-fno-strict-aliasing",
              "-fopenmp-simd")
COMPILE_TIMEOUT_S = 300

_lock = threading.Lock()
_loaded: Dict[str, Optional[ctypes.CDLL]] = {}
_enabled = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether native kernels may be used: ``MULTIZOO_EXT_NATIVE=0`` (read at import) or
    :func:`set_enabled` switch them off."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Switch the native kernels on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run a block with the native kernels switched off (eager PyTorch), e.g. to compare."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def cache_dir() -> Path:
    """Where compiled libraries are kept (see the module docstring)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "multizoo_ext"


def _compiler() -> Optional[str]:
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        found = shutil.which(name.split()[0])
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """The CPU's feature flags on Linux (what -march=native depends on), else the platform."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()} {platform.processor()}"


def _try_compile(cc: str, flags: List[str], source: Path, target: Path) -> Optional[str]:
    """Compile into ``target`` atomically; returns None on success, else the error text."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:] or f"exit status {proc.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(name: str, source: Path) -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc / gcc / clang)")
    text = source.read_bytes()
    errors = []
    for extra in (["-march=native"], []):
        flags = [*BASE_FLAGS, *extra]
        key = hashlib.sha256(b"\0".join([text, cc.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        target = cache_dir() / f"{name}-{key}.so"
        if not target.is_file():
            error = _try_compile(cc, flags, source, target)
            if error is not None:
                errors.append(f"{' '.join(flags)}: {error}")
                continue
            logger.info("compiled %s with %s into %s", source.name, cc, target)
        return ctypes.CDLL(str(target))
    raise RuntimeError("compiling failed: " + " | ".join(errors))


def load(name: str, source: Path) -> Optional[ctypes.CDLL]:
    """The library built from ``source`` (compiled on first use, then cached on disk and in
    the process), or None if native kernels are switched off or cannot be built.

    Args:
        name: a short name for the cache file (one library per name in a process).
        source: the C file.
    """
    if not enabled():
        return None
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _build(name, source)
            except (RuntimeError, OSError) as exc:
                logger.warning("native %s kernels unavailable, using eager PyTorch instead (%s)", name, exc)
                _loaded[name] = None
    return _loaded[name]


def forget(name: str) -> None:
    """Drop the process's cached result for ``name`` (the next :func:`load` tries again)."""
    with _lock:
        _loaded.pop(name, None)
