"""JIT build of the CUDA extension in csrc/ (torch.utils.cpp_extension.load + ninja).

The sources ship as package data (`fastrlhf.csrc`), so the same code finds them in an
editable install and in a wheel. The build goes to a cache directory keyed by a hash of
the sources, the torch version, its CUDA version and the target archs:
`$FASTRLHF_CACHE/<key>` (default ~/.cache/fastrlhf/ops/<key>); a second process, or a
second run, reuses it without recompiling. The target arch is `TORCH_CUDA_ARCH_LIST` when
set, else the visible GPU's. Anything that prevents a build (no nvcc, nvcc and torch on
different CUDA majors, no GPU and no arch list, compile error) is recorded as a reason,
warned about once and reported by `status_report()`; callers fall back to other backends.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import shutil
import subprocess
import threading
import time
import warnings
from typing import List, Optional, Tuple

import torch

EXT_PREFIX = "fastrlhf_cuda"
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
DONE_MARK = "BUILD_OK"  # written after a successful build + load of a cache directory
MIN_ARCH = (8, 0)  # bf16 tensor-core WMMA and the vector paths need sm_80+

_lock = threading.Lock()
_state = {"loaded": False, "reason": "not built yet", "path": None, "archs": None,
          "build_seconds": None, "tried": False}


def source_dir() -> str:
    """Directory holding the CUDA sources (package data, works for editable and wheels)."""
    return str(importlib.resources.files("fastrlhf.csrc"))


def sources(src_dir: Optional[str] = None) -> List[str]:
    d = src_dir or source_dir()
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(SOURCE_SUFFIXES))


def _compiled_sources(src_dir: Optional[str] = None) -> List[str]:
    return [s for s in sources(src_dir) if s.endswith((".cu", ".cpp"))]


def cache_root() -> str:
    return os.environ.get("FASTRLHF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastrlhf", "ops")


def _is_toolkit(root: Optional[str]) -> bool:
    return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc")) and \
        os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))


def cuda_home() -> Optional[str]:
    """The CUDA toolkit root: torch's guess when it holds the headers, else the usual places.

    torch derives CUDA_HOME from `which nvcc`; with a wrapper such as /usr/local/bin/nvcc
    that guess is /usr/local, which has no CUDA headers.
    """
    from torch.utils import cpp_extension
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda"]
    if torch.version.cuda:
        candidates.append(f"/usr/local/cuda-{torch.version.cuda}")
    for root in candidates:
        if _is_toolkit(root):
            return root
    return None


def nvcc_path() -> Optional[str]:
    root = cuda_home()
    return os.path.join(root, "bin", "nvcc") if root else shutil.which("nvcc")


def nvcc_version(nvcc: str) -> Optional[str]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def target_archs() -> Tuple[Optional[str], str]:
    """(arch list string for TORCH_CUDA_ARCH_LIST, why not) for this build."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        nums = [float(x) for x in re.findall(r"\d+\.\d+", env)]
        too_old = [x for x in nums if x < MIN_ARCH[0] + MIN_ARCH[1] / 10]
        if not nums:
            return None, f"TORCH_CUDA_ARCH_LIST={env!r} names no arch like 9.0"
        if too_old:
            return None, (f"TORCH_CUDA_ARCH_LIST={env!r} includes arch {too_old[0]} below sm_80, which "
                          "these kernels need; list only 8.0 or newer")
        return env, ""
    if not torch.cuda.is_available():
        return None, "no GPU visible and TORCH_CUDA_ARCH_LIST unset (set it, e.g. 9.0, to build without a GPU)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_ARCH:
        return None, f"GPU arch sm_{major}{minor} is older than sm_80, which these kernels need"
    return f"{major}.{minor}", ""


def toolchain_problem() -> Optional[str]:
    """Why a build cannot even start here, or None."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    nvcc = nvcc_path()
    if nvcc is None:
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    ver = nvcc_version(nvcc)
    if ver is None:
        return f"could not read the version of {nvcc}"
    if ver.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"CUDA version mismatch: nvcc {ver} vs torch built with CUDA {torch.version.cuda}; "
                "install a toolkit with the same major version")
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja not installed (pip install ninja)"
    return None


def env_key(archs: str) -> str:
    """Hash of everything but the sources that changes the compiled objects."""
    h = hashlib.sha256(f"{torch.__version__}|{torch.version.cuda}|{archs}|{_cuda_flags()}".encode())
    return h.hexdigest()[:8]


def build_key(archs: str, src_dir: Optional[str] = None) -> str:
    """Cache key `<env>-<sources>`: a new source version gets its own directory."""
    h = hashlib.sha256()
    for path in sources(src_dir):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return f"{env_key(archs)}-{h.hexdigest()[:12]}"


def _seed_from_previous(build_dir: str, archs: str) -> None:
    """Create `build_dir`, starting from the newest build with the same toolchain and arch.

    Objects keep their timestamps, so ninja recompiles only the sources that changed
    (it also tracks header dependencies) instead of the whole extension. The copy is made
    in a private directory and renamed into place, so ranks of one job starting together
    never see a half-copied directory.
    """
    if os.path.isdir(build_dir):
        return
    root = os.path.dirname(build_dir)
    prefix = env_key(archs) + "-"
    olds = [os.path.join(root, d) for d in os.listdir(root)
            if d.startswith(prefix) and ".tmp" not in d
            and os.path.exists(os.path.join(root, d, ".ninja_log"))]
    tmp = f"{build_dir}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    if olds:
        newest = max(olds, key=os.path.getmtime)
        for name in os.listdir(newest):
            src = os.path.join(newest, name)
            if os.path.isfile(src) and not name.endswith(".so") and name not in ("lock", DONE_MARK):
                shutil.copy2(src, os.path.join(tmp, name))
    try:
        os.rename(tmp, build_dir)
    except OSError:  # another process got there first; use its directory
        shutil.rmtree(tmp, ignore_errors=True)


def _cuda_flags() -> List[str]:
    return ["-O3", "--use_fast_math", "-std=c++20", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def build(verbose: bool = False, src_dir: Optional[str] = None) -> Tuple[bool, str]:
    """Build (or reuse from the cache) and load the extension. Returns (ok, reason).

    Never raises for an environment problem: the reason is recorded, warned once, and the
    ops layer falls back. The ops are then `torch.ops.fastrlhf_cuda.*`.
    """
    with _lock:
        if _state["loaded"]:
            return True, ""
        _state["tried"] = True
        problem = toolchain_problem()
        archs, why = target_archs()
        if problem or archs is None:
            return _fail(problem or why)
        key = build_key(archs, src_dir)
        build_dir = os.path.join(cache_root(), key)
        if _load_finished_build(build_dir, archs):
            return True, ""
        os.makedirs(cache_root(), exist_ok=True)
        try:
            _seed_from_previous(build_dir, archs)
        except OSError:
            pass  # seeding is only an optimisation
        os.makedirs(build_dir, exist_ok=True)
        from torch.utils import cpp_extension
        # load() reads this module global for include/library paths and nvcc.
        cpp_extension.CUDA_HOME = cuda_home() or cpp_extension.CUDA_HOME
        old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))
        t0 = time.perf_counter()
        try:
            cpp_extension.load(
                # A fixed name keeps compile commands identical across source versions,
                # which is what lets a seeded directory rebuild incrementally.
                name=EXT_PREFIX,
                sources=_compiled_sources(src_dir),
                extra_cflags=["-O3", "-std=c++20"],
                extra_cuda_cflags=_cuda_flags(),
                build_directory=build_dir,
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:  # compile/link/load failure: report, fall back
            msg = str(e).strip().splitlines()
            tail = " | ".join(msg[-3:]) if msg else type(e).__name__
            return _fail(f"build failed in {build_dir}: {tail} (rerun with verbose=True for the log)")
        finally:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
        _state.update(loaded=True, reason="", path=build_dir, archs=archs,
                      build_seconds=time.perf_counter() - t0)
        with open(os.path.join(build_dir, DONE_MARK), "w") as f:
            f.write(key + "\n")
        return True, ""


def _load_finished_build(build_dir: str, archs: str) -> bool:
    """Load a library this key already built, without running ninja (fast start; also
    works when the sources now live elsewhere, e.g. a wheel after an ahead-of-time build)."""
    lib = os.path.join(build_dir, EXT_PREFIX + ".so")
    if not (os.path.exists(os.path.join(build_dir, DONE_MARK)) and os.path.exists(lib)):
        return False
    try:
        torch.ops.load_library(lib)
    except Exception:  # unreadable or stale library: rebuild through ninja instead
        return False
    _state.update(loaded=True, reason="", path=build_dir, archs=archs, build_seconds=None)
    return True


def _fail(reason: str) -> Tuple[bool, str]:
    _state.update(loaded=False, reason=reason)
    warnings.warn(f"fastrlhf: CUDA kernels unavailable ({reason}); using the triton/torch backends",
                  RuntimeWarning, stacklevel=3)
    return False, reason


def ensure_loaded() -> Tuple[bool, str]:
    """Build/load once per process; later calls return the first answer without retrying."""
    if _state["loaded"]:
        return True, ""
    if _state["tried"]:
        return False, _state["reason"]
    if os.environ.get("FASTRLHF_NO_CUDA_BUILD") == "1":
        _state.update(tried=True, reason="disabled by FASTRLHF_NO_CUDA_BUILD=1")
        return False, _state["reason"]
    return build()


def status_report() -> str:
    """Human-readable state of the CUDA extension, for `fastrlhf ops`."""
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}); sources: {source_dir()}"]
    nvcc = nvcc_path()
    lines.append(f"nvcc: {nvcc or 'not found'}" + (f" (release {nvcc_version(nvcc)})" if nvcc else ""))
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("GPU: none visible")
    if _state["loaded"]:
        secs = _state["build_seconds"]
        lines.append(f"cuda extension: loaded, arch {_state['archs']}, from {_state['path']}"
                     + (f" (build/load took {secs:.1f}s)" if secs is not None else " (finished build reused)"))
        return "\n".join(lines)
    problem = toolchain_problem()
    archs, why = target_archs()
    if problem or archs is None:
        lines.append(f"cuda extension: not built: {problem or why}")
        return "\n".join(lines)
    key = build_key(archs)
    build_dir = os.path.join(cache_root(), key)
    built = os.path.isdir(build_dir) and any(f.endswith(".so") for f in os.listdir(build_dir))
    state = "built (cached), not loaded in this process" if built else "not built yet (builds on first use)"
    lines.append(f"cuda extension: {state}; arch {archs}; cache {build_dir}")
    if _state["tried"] and _state["reason"]:
        lines.append(f"last attempt: {_state['reason']}")
    return "\n".join(lines)
