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
  by different machines never loads a library built for another CPU.
- A damaged cache never takes the process down: the library is compiled into a temporary
  file, fsynced and renamed into place, then its SHA-256 is written beside it
  (``NAME-KEY.so.sha256``, renamed last). Before a cached library is loaded, its checksum is
  verified: a library without a checksum file or whose bytes do not match it (a truncated
  or garbage file, which ``dlopen`` could otherwise crash on) is deleted and rebuilt; an ELF
  library must also hold every segment it maps (a truncated file with a forged checksum).
- A library that fails to load, or lacks a symbol its caller needs (looked up by the
  caller's ``prepare`` inside the same guarded load), is rebuilt once; if it fails again,
  or compiling fails or takes longer than :data:`COMPILE_TIMEOUT_S` seconds in all, the
  caller falls back to eager PyTorch and one ``warnings.warn`` says so (once per process).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

logger = logging.getLogger(__name__)

ENV_SWITCH = "MULTIZOO_EXT_NATIVE"
ENV_CACHE = "MULTIZOO_EXT_CACHE"
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c99", "-fno-trapping-math", "-fno-strict-aliasing",
              "-fopenmp-simd")
#: Seconds all compile attempts of one library may take together; then the eager path is used.
COMPILE_TIMEOUT_S = 60.0
CHECKSUM_SUFFIX = ".sha256"

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


class _CompileTimeout(RuntimeError):
    """The compiler ran past its time budget (not retried with other flags)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_path(target: Path) -> Path:
    return target.with_name(target.name + CHECKSUM_SUFFIX)


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _elf_complete(target: Path) -> bool:
    """For an ELF file, whether every loadable segment lies inside the file (``dlopen`` maps
    them, and touching a page past the end of a truncated file raises SIGBUS). Other formats:
    True (only the checksum guards them)."""
    with open(target, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF":
            return True
        if len(head) < 64:
            return False
        if head[4] != 2:  # a 32-bit ELF: only the checksum guards it
            return True
        order = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(order + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        size = os.fstat(fh.fileno()).st_size
        if phentsize < 56 or phoff + phentsize * phnum > size:
            return False
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from(order + "I", table, i * phentsize)
        p_offset, = struct.unpack_from(order + "Q", table, i * phentsize + 8)
        p_filesz, = struct.unpack_from(order + "Q", table, i * phentsize + 32)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD past the end
            return False
    return True


def verified(target: Path) -> bool:
    """Whether ``target`` exists, matches the SHA-256 in its checksum file and (ELF) holds
    every segment it asks to map; never loads it."""
    try:
        expected = _checksum_path(target).read_text(encoding="ascii").strip()
        return target.is_file() and expected == _sha256(target) and _elf_complete(target)
    except (OSError, UnicodeDecodeError, struct.error):
        return False


def _discard(target: Path) -> None:
    for p in (_checksum_path(target), target):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _run_compiler(cmd: List[str], timeout: float) -> subprocess.CompletedProcess:
    """Run the compiler in its own process group and kill the whole group on timeout (a
    compiler driver's children would otherwise keep the pipes, and us, waiting)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            proc.kill()
        proc.communicate()
        raise _CompileTimeout(f"the compiler did not finish within {COMPILE_TIMEOUT_S:g} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _try_compile(cc: str, flags: List[str], source: Path, target: Path, deadline: float) -> Optional[str]:
    """Compile into ``target`` (temp file, fsync, rename), then write its checksum file;
    returns None on success, else the error text. Raises :class:`_CompileTimeout`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _CompileTimeout(f"the compiler did not finish within {COMPILE_TIMEOUT_S:g} s")
        proc = _run_compiler([cc, *flags, str(source), "-o", tmp, "-lm"], remaining)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:] or f"exit status {proc.returncode}"
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = _sha256(Path(tmp))
        _discard(target)  # no stale checksum may vouch for the new file while it lands
        os.replace(tmp, target)
        _write_synced(_checksum_path(target), digest.encode("ascii"))
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


Prepare = Callable[[ctypes.CDLL], None]


def _open(target: Path, prepare: Optional[Prepare]) -> ctypes.CDLL:
    """Load a verified library and let ``prepare`` look up and type its symbols; any failure
    (including a missing symbol) raises OSError."""
    try:
        lib = ctypes.CDLL(str(target))
        if prepare is not None:
            prepare(lib)
    except (OSError, AttributeError) as exc:
        raise OSError(f"loading {target.name} failed: {type(exc).__name__}: {exc}") from exc
    return lib


def _build(name: str, source: Path, prepare: Optional[Prepare] = None) -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc / gcc / clang)")
    text = source.read_bytes()
    errors: List[str] = []
    deadline = time.monotonic() + COMPILE_TIMEOUT_S
    for extra in (["-march=native"], []):
        flags = [*BASE_FLAGS, *extra]
        key = hashlib.sha256(b"\0".join([text, cc.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        target = cache_dir() / f"{name}-{key}.so"
        for attempt in (1, 2):  # the cached or a first build, then one rebuild
            if not verified(target):
                if target.exists() or _checksum_path(target).exists():
                    logger.warning("native %s: cached %s has no matching checksum; rebuilding", name, target)
                _discard(target)
                error = _try_compile(cc, flags, source, target, deadline)  # may raise _CompileTimeout
                if error is not None:
                    errors.append(f"{' '.join(flags)}: {error}")
                    break
                logger.info("compiled %s with %s into %s", source.name, cc, target)
            try:
                return _open(target, prepare)
            except OSError as exc:
                errors.append(str(exc))
                _discard(target)
                if attempt == 2:
                    raise RuntimeError("the library failed to load after a rebuild: " + " | ".join(errors)) from None
    raise RuntimeError("compiling failed: " + " | ".join(errors))


def load(name: str, source: Path, prepare: Optional[Prepare] = None) -> Optional[ctypes.CDLL]:
    """The library built from ``source`` (compiled on first use, then cached on disk and in
    the process), or None if native kernels are switched off or cannot be built and loaded
    (then one ``warnings.warn`` per process says the eager path is used).

    Args:
        name: a short name for the cache file (one library per name in a process).
        source: the C file.
        prepare: called with the loaded library to look up and type its symbols; an
            ``AttributeError`` (a missing symbol) or ``OSError`` there counts as a failed load.
    """
    if not enabled():
        return None
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _build(name, source, prepare)
            except (RuntimeError, OSError) as exc:
                message = f"native {name} kernels unavailable, using eager PyTorch instead ({exc})"
                logger.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                _loaded[name] = None
    return _loaded[name]


def forget(name: str) -> None:
    """Drop the process's cached result for ``name`` (the next :func:`load` tries again)."""
    with _lock:
        _loaded.pop(name, None)
