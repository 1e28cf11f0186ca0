/* Hand-fused CPU kernels for the group norms of f in solver steps (no autograd); see kernels.py.
 *
 * gn_fused works on M matrices of R rows of C channels in G groups, every operand addressed by a matrix and a
 * row stride (channels contiguous; a row stride 0 broadcasts a [C] vector over the rows), channel parameters
 * [M, C] with matrix stride ps0. Per row and group, all in one pass over the group while it sits in L1:
 *
 *     v = pre(x + add)                       pre: ReLU if `pre`, add optional
 *     h = post(GN(v) * w + b + res)          post: ReLU if `post`, res optional
 *     y = GN(h) * w3 + b3  if w3, else h     a second norm over the same groups (f's block tail, Eq. 7-8)
 *
 * GN(v) = (v - mean) / sqrt(var + eps) over the group, the variance biased and computed about the mean (two
 * passes over the group, as torch's group norm). y may be x (in place). */
#include <math.h>

#define RELU(v) ((v) < 0.f ? 0.f : (v))   /* NaN passes, as in torch.relu */

/* for k < n: v = V (an expression of k); y[k] = v; s += v (vectorised) */
#define STORE_SUM(n, y, s, V) do {                                                                    \
        _Pragma("omp simd reduction(+:s)")                                                            \
        for (long k = 0; k < (n); k++) { const float v = (V); (y)[k] = v; (s) += v; }               \
    } while (0)

/* y = pre(x + add) over one group, returning its sum (one pass; the variants keep the loops branch-free) */
static inline float load(const float *x, const float *a, float *y, long n, int pre) {
    float s = 0.f;
    if (a && pre) STORE_SUM(n, y, s, RELU(x[k] + a[k]));
    else if (a) STORE_SUM(n, y, s, x[k] + a[k]);
    else if (pre) STORE_SUM(n, y, s, RELU(x[k]));
    else STORE_SUM(n, y, s, x[k]);
    return s;
}

/* 1 / sqrt(var + eps) of the group y about its mean (a second pass, as torch's norms) */
static inline float rstd_of(const float *y, long n, float mean, float eps) {
    float q = 0.f;
    #pragma omp simd reduction(+:q)
    for (long k = 0; k < n; k++) { const float d = y[k] - mean; q += d * d; }
    return 1.f / sqrtf(q / (float)n + eps);
}

/* y = post((y - mean) * rstd * w + b + res) in place, returning the sum of the result (for a second norm) */
static inline float affine(float *y, long n, float mean, float rstd, const float *w, const float *b,
                           const float *res, int post) {
    float s = 0.f;
    if (res && post) STORE_SUM(n, y, s, RELU((y[k] - mean) * rstd * w[k] + b[k] + res[k]));
    else if (res) STORE_SUM(n, y, s, (y[k] - mean) * rstd * w[k] + b[k] + res[k]);
    else if (post) STORE_SUM(n, y, s, RELU((y[k] - mean) * rstd * w[k] + b[k]));
    else STORE_SUM(n, y, s, (y[k] - mean) * rstd * w[k] + b[k]);
    return s;
}

void gn_fused(long M, long R, long C, long G,
              const float *x, long xs0, long xs1, const float *add, long as0, long as1,
              const float *w, const float *b, long ps0, const float *res, long rs0, long rs1,
              const float *w3, const float *b3, float *y, long ys0, long ys1,
              float eps, int pre, int post, int nt) {
    const long cg = C / G;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
    for (long m = 0; m < M; m++) {
        for (long r = 0; r < R; r++) {
            for (long g = 0; g < G; g++) {
                const long c0 = g * cg, p0 = m * ps0 + c0;
                float *yg = y + m * ys0 + r * ys1 + c0;
                float mean = load(x + m * xs0 + r * xs1 + c0, add ? add + m * as0 + r * as1 + c0 : 0, yg, cg, pre)
                             / (float)cg;
                float rstd = rstd_of(yg, cg, mean, eps);
                mean = affine(yg, cg, mean, rstd, w + p0, b + p0, res ? res + m * rs0 + r * rs1 + c0 : 0, post)
                       / (float)cg;
                if (w3) {
                    rstd = rstd_of(yg, cg, mean, eps);
                    affine(yg, cg, mean, rstd, w3 + p0, b3 + p0, 0, 0);
                }
            }
        }
    }
}

/* A solver step's bookkeeping, one pass per row r < R of C entries (rows addressed by row strides):
 *     g[r] = fx[r] - x[r];  f[r] = fx[r] (if f);  gn[r] = ||g[r]||;  fn[r] = ||fx[r]||
 * the residual and Anderson's history slots written while the row is read once. */
void residual(long R, long C, const float *fx, long fxs, const float *x, long xs, float *f, long fs,
              float *g, long gs, float *gn, float *fn, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (long r = 0; r < R; r++) {
        const float *a = fx + r * fxs, *b = x + r * xs;
        float *gr = g + r * gs, sg = 0.f, sf = 0.f;
        if (f) {
            float *fr = f + r * fs;
            #pragma omp simd reduction(+:sg, sf)
            for (long k = 0; k < C; k++) { const float d = a[k] - b[k]; gr[k] = d; fr[k] = a[k]; sg += d * d; sf += a[k] * a[k]; }
        } else {
            #pragma omp simd reduction(+:sg, sf)
            for (long k = 0; k < C; k++) { const float d = a[k] - b[k]; gr[k] = d; sg += d * d; sf += a[k] * a[k]; }
        }
        gn[r] = sqrtf(sg);
        fn[r] = sqrtf(sf);
    }
}

/* best[rows[r]] = x[r] for the rows r < R with take[r] (rows NULL: best[r]); the best-iterate update of a
 * solver step, touching only the rows that improved */
void copy_rows(long R, long C, const float *x, long xs, const unsigned char *take, const long *rows,
               float *best, long bs, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (long r = 0; r < R; r++) {
        if (!take[r]) continue;
        const float *src = x + r * xs;
        float *dst = best + (rows ? rows[r] : r) * bs;
        for (long k = 0; k < C; k++) dst[k] = src[k];
    }
}
