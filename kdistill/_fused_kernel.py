"""The native row kernel behind :mod:`kdistill.fused`, compiled with the system C compiler on use.

The kernel is plain C99 (no Python or torch headers), so building it takes about a second and
needs nothing beyond a C compiler. It is called through :mod:`ctypes`, which releases the GIL, and
the rows are split across Python threads, so no OpenMP runtime is linked (torch brings its own).
Only ``#pragma omp simd`` is used, for the vectorised reductions, through ``-fopenmp-simd``.

The shared object is cached under ``$KDISTILL_CACHE_DIR`` (default ``~/.cache/kdistill``), keyed
by a hash of the source, the flags, the compiler and the CPU, so ``-march=native`` code built on
one machine is never loaded on another. ``KDISTILL_NO_COMPILE=1`` skips the build and every
caller falls back to the vectorised PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

# Row kernel, instantiated once per (input type, compute type). For each row it makes two passes
# over the inputs that come from memory: the maxima, then the exponentials (kept in two
# cache-resident scratch rows), then finishes loss and gradient from those. Terms are skipped where
# a probability is exactly 0 (``!= 0``, so a NaN propagates as in the reference path).
_ROW_KERNEL = r"""
void kd_rows_$NAME(const $IN *student, const $IN *teacher, const unsigned char *mask,
                   long rows, long cols, int divergence, double inv_temperature, double beta,
                   double grad_coef, $IN *grad, double *row_loss, $REAL *scratch)
{
    const $REAL inv_t = ($REAL)inv_temperature;
    const $REAL b = ($REAL)beta, one_minus_b = ($REAL)(1.0 - beta);
    const $REAL coef = ($REAL)grad_coef;
    $REAL *es = scratch;          /* student exponentials, then probabilities */
    $REAL *et = scratch + cols;   /* teacher exponentials, then per-class terms */
    for (long r = 0; r < rows; ++r) {
        const $IN *s = student + r * cols;
        const $IN *t = teacher + r * cols;
        $IN *g = grad ? grad + r * cols : 0;
        if (mask && !mask[r]) {
            row_loss[r] = 0.0;
            if (g) for (long j = 0; j < cols; ++j) g[j] = $STORE(($REAL)0);
            continue;
        }

        $REAL ms = -INFINITY, mt = -INFINITY;
        #pragma omp simd reduction(max:ms, mt)
        for (long j = 0; j < cols; ++j) {
            $REAL x = $LOAD(s[j]), y = $LOAD(t[j]);
            ms = x > ms ? x : ms;
            mt = y > mt ? y : mt;
        }
        ms *= inv_t;
        mt *= inv_t;

        $REAL zs = 0, zt = 0;
        #pragma omp simd reduction(+:zs, zt)
        for (long j = 0; j < cols; ++j) {
            $REAL x = $EXP($LOAD(s[j]) * inv_t - ms);
            $REAL y = $EXP($LOAD(t[j]) * inv_t - mt);
            es[j] = x;
            et[j] = y;
            zs += x;
            zt += y;
        }
        const $REAL lse_s = ms + $LOG(zs), lse_t = mt + $LOG(zt);
        const $REAL izs = ($REAL)1 / zs, izt = ($REAL)1 / zt;

        $REAL acc = 0, dot = 0;
        if (divergence == 0) {            /* KL(teacher || student) */
            #pragma omp simd reduction(+:acc)
            for (long j = 0; j < cols; ++j) {
                $REAL ps = es[j] * izs, pt = et[j] * izt;
                $REAL d = ($LOAD(t[j]) * inv_t - lse_t) - ($LOAD(s[j]) * inv_t - lse_s);
                acc += pt != 0 ? pt * d : ($REAL)0;
                es[j] = ps - pt;
            }
            if (g) for (long j = 0; j < cols; ++j) g[j] = $STORE(coef * es[j]);
        } else if (divergence == 1) {     /* KL(student || teacher) */
            #pragma omp simd reduction(+:acc)
            for (long j = 0; j < cols; ++j) {
                $REAL ps = es[j] * izs;
                $REAL d = ($LOAD(s[j]) * inv_t - lse_s) - ($LOAD(t[j]) * inv_t - lse_t);
                acc += ps != 0 ? ps * d : ($REAL)0;
                es[j] = ps;
                et[j] = d;
            }
            if (g) {
                for (long j = 0; j < cols; ++j)
                    g[j] = $STORE(es[j] != 0 ? coef * es[j] * (et[j] - acc) : ($REAL)0);
            }
        } else {                          /* (1-b) KL(teacher || M) + b KL(student || M) */
            const $REAL ratio_at_zero = one_minus_b > 0 ? ($REAL)1 / one_minus_b : ($REAL)0;
            for (long j = 0; j < cols; ++j) {
                $REAL ps = es[j] * izs, pt = et[j] * izt;
                $REAL m = b * pt + one_minus_b * ps;
                $REAL lm = m > 0 ? $LOG(m) : -INFINITY;
                $REAL lps = $LOAD(s[j]) * inv_t - lse_s;
                $REAL lpt = $LOAD(t[j]) * inv_t - lse_t;
                $REAL term = 0;
                if (pt != 0) term += one_minus_b * pt * (lpt - lm);
                if (ps != 0) term += b * ps * (lps - lm);
                acc += term;
                /* ps * dL/dps, the constant b dropped (it cancels against the softmax Jacobian) */
                $REAL ratio = m > 0 ? ps / m : ratio_at_zero;
                $REAL h = ps != 0 ? b * ps * (lps - lm) : ($REAL)0;
                h -= one_minus_b * (one_minus_b * pt + b * ps) * ratio;
                es[j] = ps;
                et[j] = h;
                dot += h;
            }
            if (g) for (long j = 0; j < cols; ++j) g[j] = $STORE(coef * (et[j] - es[j] * dot));
        }
        row_loss[r] = (double)acc;
    }
}
"""

_PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp for float that gcc can vectorise: 2^n * p(r) with r in [-ln2/2, ln2/2], about 1 ulp. */
static inline float kd_expf(float x)
{
    const float hi = 88.3762626647949f;
    float xc = x > hi ? hi : x;
    xc = xc < -87.0f ? -87.0f : xc;
    float n = xc * 1.44269504088896341f + 12582912.0f;
    n = n - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    float y = p * scale;
    /* results below FLT_MIN are flushed to zero: an error under 1.2e-38 */
    y = x < -87.0f ? 0.0f : y;
    y = x > hi ? INFINITY : y;
    return x != x ? x : y;
}

static inline float kd_bf16_load(uint16_t v)
{
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t kd_bf16_store(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (f != f) return (uint16_t)0x7FC0;
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#define KD_ID(x) (x)
#define KD_TO_F32(x) ((float)(x))
"""

_VARIANTS = {
    # name: (input type, compute type, load, store, exp, log)
    "f32": ("float", "float", "KD_ID", "KD_ID", "kd_expf", "logf"),
    "f64": ("double", "double", "KD_ID", "KD_ID", "exp", "log"),
    "bf16": ("uint16_t", "float", "kd_bf16_load", "kd_bf16_store", "kd_expf", "logf"),
    "f16": ("_Float16", "float", "KD_TO_F32", "(_Float16)", "kd_expf", "logf"),
}


def kernel_source(variants: tuple[str, ...]) -> str:
    """The C source with one row-kernel function per name in ``variants``."""
    parts = [_PRELUDE]
    for name in variants:
        in_type, real, load, store, exp, log = _VARIANTS[name]
        body = _ROW_KERNEL
        for key, value in (
            ("$NAME", name),
            ("$IN", in_type),
            ("$REAL", real),
            ("$LOAD", load),
            ("$STORE", store),
            ("$EXP", exp),
            ("$LOG", log),
        ):
            body = body.replace(key, value)
        parts.append(body)
    return "\n".join(parts)


_ARGTYPES = [
    ctypes.c_void_p,  # student
    ctypes.c_void_p,  # teacher
    ctypes.c_void_p,  # mask or NULL
    ctypes.c_long,  # rows
    ctypes.c_long,  # cols
    ctypes.c_int,  # divergence: 0 forward KL, 1 reverse KL, 2 JSD
    ctypes.c_double,  # 1 / temperature
    ctypes.c_double,  # beta
    ctypes.c_double,  # gradient coefficient
    ctypes.c_void_p,  # gradient or NULL
    ctypes.c_void_p,  # per-row loss (float64)
    ctypes.c_void_p,  # scratch: 2 * cols compute-type values
]

_lock = threading.Lock()
_loaded: dict[str, object] | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("KDISTILL_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kdistill"


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return os.uname().machine
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, variants: tuple[str, ...], flags: list[str]) -> Path:
    source = kernel_source(variants)
    key_text = "\n".join([source, " ".join(flags), _compiler_version(cc), _cpu_fingerprint()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    directory = _cache_dir()
    target = directory / f"kd_rows_{key}.so"
    if target.exists():
        return target

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / "kd_rows.c"
        src.write_text(source)
        out = Path(tmp) / "kd_rows.so"
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(out), str(src), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic, so concurrent builders never load a partial file
    return target


def load() -> dict[str, object] | None:
    """The compiled row kernels by variant name, building them on first use; None if unavailable.

    A failed build is logged once as a warning and not retried in this process.
    """
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        _tried = True
        if os.environ.get("KDISTILL_NO_COMPILE", "") not in ("", "0"):
            logger.info("KDISTILL_NO_COMPILE is set: the fused loss uses its PyTorch path")
            return None
        cc = _compiler()
        if cc is None:
            logger.warning("no C compiler found: the fused loss uses its slower PyTorch path")
            return None

        base = ["-O3", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
        attempts = [
            (("f32", "f64", "bf16", "f16"), [*base, "-march=native"]),
            (("f32", "f64", "bf16"), [*base, "-march=native"]),
            (("f32", "f64", "bf16"), base),
        ]
        errors = []
        for variants, flags in attempts:
            try:
                path = _build(cc, variants, flags)
                lib = ctypes.CDLL(str(path))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
                continue
            kernels = {}
            for name in variants:
                fn = getattr(lib, f"kd_rows_{name}")
                fn.argtypes = _ARGTYPES
                fn.restype = None
                kernels[name] = fn
            _loaded = kernels
            logger.debug("loaded the fused row kernel from %s", path)
            return _loaded
        logger.warning(
            "building the fused loss kernel failed; using the slower PyTorch path. Last error: %s",
            errors[-1] if errors else "unknown",
        )
        return None


def reset() -> None:
    """Forget the loaded kernel so the next :func:`load` tries again (used by tests)."""
    global _loaded, _tried
    with _lock:
        _loaded = None
        _tried = False
