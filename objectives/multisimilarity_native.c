/* Multi-Similarity loss, CPU float32 kernels for multizoo_ext.objectives.multisimilarity_native.
 *
 * Compiled on first use by multizoo_ext.native (the system C compiler, -O3, cached per
 * machine) and called through ctypes; when no compiler is there the loss runs in eager
 * PyTorch instead. Same maths as the eager path (see objectives/multisimilarity.py):
 *
 *   keep j in N_i  if  S_ij + epsilon > min_{k in P_i} S_ik
 *   keep k in P_i  if  S_ik - epsilon < max_{j in N_i} S_ij
 *   L_i = log(1 + sum_{kept P_i} exp(-alpha (S - base))) / alpha
 *       + log(1 + sum_{kept N_i} exp( beta  (S - base))) / beta
 *
 * and the gradient of mean_i L_i w.r.t. S: the softmax weights of each side. Every loop is
 * written so that the compiler vectorises it (selects instead of branches, an inline exp,
 * `omp simd` reductions), which needs -fno-trapping-math and -fopenmp-simd.
 */
#include <math.h>
#include <stdint.h>

/* exp(x), x clamped to [-87, 88] (all normal results in float32): Cody-Waite reduction
 * x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial (relative error < 1e-8 before
 * rounding), 2^n built from its bits. */
static inline float ms_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: round to nearest */
    float n = t - 12582912.0f;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    return p * *(float *)&bits;
}

/* Rows of x (n, d) divided by max(norm_i, eps) into out (n, d), as F.normalize does, and
 * their norms into norms (n,). Returns the number of rows whose norm is NaN or Inf (NaN/Inf
 * in the row, or a norm that overflows; then out is not used). */
int ms_normalize_f32(const float *restrict x, long n, long d, float eps, float *restrict out,
                     float *restrict norms) {
    int bad = 0;
    for (long i = 0; i < n; ++i) {
        const float *xi = x + i * d;
        float *oi = out + i * d;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (long k = 0; k < d; ++k)
            ss += xi[k] * xi[k];
        float nrm = sqrtf(ss);
        norms[i] = nrm;
        bad += !(nrm < INFINITY);
        float denom = nrm > eps ? nrm : eps;
        for (long k = 0; k < d; ++k)
            oi[k] = xi[k] / denom;
    }
    return bad;
}

/* Multi-hot labels (n, k) as 64-bit masks, k <= 64: bits[i] has bit c set where
 * labels[i, c] != 0. Returns the number of entries that are neither 0 nor 1. */
int ms_pack_multihot_i64(const int64_t *restrict labels, long n, long k, uint64_t *restrict bits) {
    int bad = 0;
    for (long i = 0; i < n; ++i) {
        uint64_t b = 0;
        for (long c = 0; c < k; ++c) {
            int64_t v = labels[i * k + c];
            bad += (v != 0) & (v != 1);
            b |= (uint64_t)(v != 0) << c;
        }
        bits[i] = b;
    }
    return bad;
}

/* One anchor row i of the (n, n) similarity matrix, for each way of telling whether the pair
 * (i, j) shares a label (SHARES(j)): class indices (lab[j] == lab[i]), a 0/1 share row
 * (share[j] != 0) or 64-bit label masks ((bits[j] & bits[i]) != 0). Writes the signed kept
 * exponentials into w (positives > 0, negatives < 0, else 0) and into coef[0] / coef[1]
 * the factors that turn them into the gradient of L_i * inv_count w.r.t. S_ij (positives /
 * negatives); returns L_i. */
#define MS_ROW(NAME, KEY_T, KEY_INIT, SHARES)                                                        \
    static double NAME(const float *restrict sim, const KEY_T *restrict key, int n, int i, float alpha,     \
                       float beta, float base, float eps, int mining, float inv_count, float *restrict w,   \
                       float *restrict coef) {                                                          \
        float minpos = INFINITY, maxneg = -INFINITY;                                                    \
        const KEY_T ki = KEY_INIT;                                                                      \
        (void)ki;                                                                                       \
        _Pragma("omp simd reduction(min : minpos) reduction(max : maxneg)")                             \
        for (int j = 0; j < n; ++j) {                                                                   \
            float s = sim[j];                                                                           \
            int sh = SHARES(j), other = j != i;                                                         \
            float a = (other & sh) ? s : INFINITY;                                                      \
            float b = (other & !sh) ? s : -INFINITY;                                                    \
            minpos = a < minpos ? a : minpos;                                                           \
            maxneg = b > maxneg ? b : maxneg;                                                           \
        }                                                                                               \
        if (!mining) { /* every pair of a non-empty side is kept */                                     \
            maxneg = INFINITY;                                                                          \
            minpos = -INFINITY;                                                                         \
        }                                                                                               \
        /* An empty side leaves minpos = inf / maxneg = -inf: the other side keeps nothing. */          \
        const float ca = -alpha, da = alpha * base, cb = beta, db = -beta * base;                       \
        for (int j = 0; j < n; ++j) {                                                                   \
            float s = sim[j];                                                                           \
            int sh = SHARES(j);                                                                         \
            int keep = (j != i) & (sh ? ((s - eps) < maxneg) : ((s + eps) > minpos));                   \
            float e = ms_exp(sh ? ca * s + da : cb * s + db);                                           \
            e = keep ? e : 0.0f;                                                                        \
            w[j] = sh ? e : -e;                                                                         \
        }                                                                                               \
        float sp = 0.0f, sn = 0.0f;                                                                     \
        _Pragma("omp simd reduction(+ : sp, sn)")                                                       \
        for (int j = 0; j < n; ++j) {                                                                   \
            float v = w[j];                                                                             \
            sp += v > 0.0f ? v : 0.0f;                                                                  \
            sn += v < 0.0f ? -v : 0.0f;                                                                 \
        }                                                                                               \
        /* dL/dS = -exp_pos / (1 + sp) on the positives, exp_neg / (1 + sn) on the negatives. */        \
        coef[0] = -inv_count / (1.0f + sp);                                                             \
        coef[1] = -inv_count / (1.0f + sn);                                                             \
        return (double)log1pf(sp) / alpha + (double)log1pf(sn) / beta;                                  \
    }

#define MS_BY_CLASS(j) (key[j] == ki)
#define MS_BY_SHARE(j) (key[j] != 0.0f)
#define MS_BY_BITS(j) ((key[j] & ki) != 0)
MS_ROW(ms_row_class, int64_t, key[i], MS_BY_CLASS)
MS_ROW(ms_row_share, float, 0.0f, MS_BY_SHARE)
MS_ROW(ms_row_bits, uint64_t, key[i], MS_BY_BITS)

/* A batch against itself: sim (n, n); the labels as class indices (mode 0, key int64 (n,)),
 * a 0/1 share matrix (mode 1, key float (n, n)) or 64-bit label masks (mode 2, key uint64
 * (n,)). Writes the mean loss to *loss and, into g (n, n), the gradient of the mean w.r.t.
 * the normalised Gram matrix, symmetrised (G + G^T, so that d/dU = g U); coef (n, 2) is
 * workspace. */
void ms_square_f32(const float *sim, const void *key, int mode, long n, float alpha, float beta, float base,
                   float eps, int mining, float *loss, float *g, float *coef) {
    const float inv_count = 1.0f / (float)n;
    double total = 0.0;
    for (long i = 0; i < n; ++i) {
        const float *si = sim + i * n;
        float *gi = g + i * n, *ci = coef + 2 * i;
        if (mode == 0)
            total += ms_row_class(si, (const int64_t *)key, (int)n, (int)i, alpha, beta, base, eps, mining,
                                  inv_count, gi, ci);
        else if (mode == 1)
            total += ms_row_share(si, (const float *)key + i * n, (int)n, (int)i, alpha, beta, base, eps, mining,
                                  inv_count, gi, ci);
        else
            total += ms_row_bits(si, (const uint64_t *)key, (int)n, (int)i, alpha, beta, base, eps, mining,
                                 inv_count, gi, ci);
    }
    *loss = (float)(total / (double)n);
    /* g <- W + W^T with W_ij = e_ij * coef_i(side): both triangles at once. */
    for (long i = 0; i < n; ++i) {
        const float cpi = coef[2 * i], cni = coef[2 * i + 1];
        g[i * n + i] = 0.0f;
        for (long j = i + 1; j < n; ++j) {
            float a = g[i * n + j], b = g[j * n + i];
            float v = a * (a > 0.0f ? cpi : cni) + b * (b > 0.0f ? coef[2 * j] : coef[2 * j + 1]);
            g[i * n + j] = v;
            g[j * n + i] = v;
        }
    }
}

/* Backward of the row normalisation, in place: gu (n, d) = dL/dU becomes dL/dX =
 * scale * (gu - u <u, gu>) / max(norm, eps) (no projection on a row whose norm was clamped
 * to eps, as F.normalize). */
void ms_project_f32(float *restrict gu, const float *restrict u, const float *restrict norms, long n, long d,
                    float eps, float scale) {
    for (long i = 0; i < n; ++i) {
        float *gi = gu + i * d;
        const float *ui = u + i * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (long k = 0; k < d; ++k)
            dot += ui[k] * gi[k];
        float nrm = norms[i];
        int clamped = !(nrm >= eps);
        dot = clamped ? 0.0f : dot;
        float c = scale / (clamped ? eps : nrm);
        for (long k = 0; k < d; ++k)
            gi[k] = (gi[k] - ui[k] * dot) * c;
    }
}
