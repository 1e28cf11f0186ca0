/* Hand-fused CPU kernels for the group norms of f in solver steps (no autograd); see kernels.py.
 *
 * gn_fused works on M matrices of R rows of C channels in G groups, every operand addressed by a matrix and a
 * row stride (channels contiguous; a row stride 0 broadcasts a [C] vector over the rows), channel parameters
 * [M, C] with matrix stride ps0. Per row and group, in passes over the group while it sits in L1 (four rows at once):
 *
 *     v = pre(x + add)                       pre: ReLU if `pre`, add optional
 *     h = post(GN(v) * w + b + res)          post: ReLU if `post`, res optional
 *     y = GN(h) * w3 + b3  if w3, else h     a second norm over the same groups (f's block tail, Eq. 7-8)
 *
 * GN(v) = (v - mean) / sqrt(var + eps) over the group, the variance biased and computed about the mean (two
 * passes over the group, as torch's group norm). y may be x (in place). */
#include <math.h>

#define RELU(v) ((v) < 0.f ? 0.f : (v))   /* NaN passes, as in torch.relu */

/* Up to four rows of a group at once (nr, a constant where inlined): each row's sums are their own chain of
 * additions, independent of the others' (one row alone is bound by the latency of its chain: 1.3-1.8x slower at
 * groups of 125 channels). Row j's entries are p[j * ps + k], k < n; every row is computed as alone. */
#define EACH_ROW(E, V) do { E(V, 0); if (nr > 1) E(V, 1); if (nr > 2) E(V, 2); if (nr > 3) E(V, 3); } while (0)
#define STORE_ADD(V, j) { const float v = V(j); y[j * ys + k] = v; s##j += v; }
#define SQUARES(V, j) { const float d = y[j * ys + k] - mean[j]; s##j += d * d; }
#define STORE(V, j) { y[j * ys + k] = V(j); }
/* for k < n, rows j < nr: s_j = sum of E's terms (E: STORE_ADD, SQUARES), into out[j] */
#define ROWS_SUM(E, V, out) do {                                                                      \
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                                 \
        _Pragma("omp simd reduction(+:s0, s1, s2, s3)")                                               \
        for (long k = 0; k < n; k++) EACH_ROW(E, V);                                                  \
        (out)[0] = s0; (out)[1] = s1; (out)[2] = s2; (out)[3] = s3;                                   \
    } while (0)

/* for k < n, rows j < nr: y_j = V(j) */
#define ROWS_STORE(V) do {                                                                            \
        _Pragma("omp simd")                                                                           \
        for (long k = 0; k < n; k++) EACH_ROW(STORE, V);                                              \
    } while (0)

/* Over matrices m < M, blocks of up to four rows from r0 (nr of them) and groups g < G (channels from c0, cg of them),
 * the (m, block) pairs in parallel: the body (the variadic argument) does one group of one block. */
#define EACH_GROUP_OF_ROWS(...) do {                                                                  \
        const long cg = C / G, blocks = (R + 3) / 4;                                                  \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(nt)")                      \
        for (long m = 0; m < M; m++)                                                                  \
            for (long rb = 0; rb < blocks; rb++) {                                                    \
                const long r0 = 4 * rb, nr = R - r0 < 4 ? R - r0 : 4;                                 \
                for (long g = 0; g < G; g++) { const long c0 = g * cg; __VA_ARGS__ }                   \
            }                                                                                         \
    } while (0)
/* CALL(n) with the block's row count n a constant: one instance per count, each with only its rows' chains */
#define BY_ROW_COUNT(CALL) switch (nr) { case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; \
                                         default: CALL(1); }

/* the terms of the passes, of row j at entry k */
#define X(j) x[j * xs + k]
#define X_A(j) (x[j * xs + k] + a[j * as + k])
#define RELU_X(j) RELU(X(j))
#define RELU_X_A(j) RELU(X_A(j))
#define AFF(j) ((y[j * ys + k] - mean[j]) * rstd[j] * w[k] + b[k])
#define AFF_R(j) (AFF(j) + r[j * rs + k])
#define RELU_AFF(j) RELU(AFF(j))
#define RELU_AFF_R(j) RELU(AFF_R(j))

/* mean and 1 / sqrt(var + eps) of each row's group y (the variance biased and about the mean, as torch's norms),
 * from the rows' sums s */
static inline __attribute__((always_inline)) void moments(const int nr, const float *y, long ys, long n, float eps,
                                                          const float *s, float *mean, float *rstd) {
    float q[4];
    for (int j = 0; j < 4; j++) mean[j] = s[j] / (float)n;
    ROWS_SUM(SQUARES, _, q);
    for (int j = 0; j < 4; j++) rstd[j] = 1.f / sqrtf(q[j] / (float)n + eps);
}

/* y = post(GN(pre(x + a)) * w + b + r), then GN(y) * w3 + b3 if w3: one group of nr rows, in L1 while done */
static inline __attribute__((always_inline)) void group_rows(
        const int nr, long n, const float *x, long xs, const float *a, long as, const float *w, const float *b,
        const float *r, long rs, const float *w3, const float *b3, float *y, long ys, float eps, int pre, int post) {
    float s[4], mean[4], rstd[4];
    if (a && pre) ROWS_SUM(STORE_ADD, RELU_X_A, s);       /* the branches keep the loops branch-free */
    else if (a) ROWS_SUM(STORE_ADD, X_A, s);
    else if (pre) ROWS_SUM(STORE_ADD, RELU_X, s);
    else ROWS_SUM(STORE_ADD, X, s);
    moments(nr, y, ys, n, eps, s, mean, rstd);
    if (!w3) {
        if (r && post) ROWS_STORE(RELU_AFF_R);
        else if (r) ROWS_STORE(AFF_R);
        else if (post) ROWS_STORE(RELU_AFF);
        else ROWS_STORE(AFF);
        return;
    }
    if (r && post) ROWS_SUM(STORE_ADD, RELU_AFF_R, s);
    else if (r) ROWS_SUM(STORE_ADD, AFF_R, s);
    else if (post) ROWS_SUM(STORE_ADD, RELU_AFF, s);
    else ROWS_SUM(STORE_ADD, AFF, s);
    moments(nr, y, ys, n, eps, s, mean, rstd);
    w = w3, b = b3;
    ROWS_STORE(AFF);
}

void gn_fused(long M, long R, long C, long G,
              const float *x, long xs0, long xs1, const float *add, long as0, long as1,
              const float *w, const float *b, long ps0, const float *res, long rs0, long rs1,
              const float *w3, const float *b3, float *y, long ys0, long ys1,
              float eps, int pre, int post, int nt) {
    #define GROUP(NR) group_rows(NR, cg, xg, xs1, ag, as1, w + p0, b + p0, rg, rs1, w3g, b3g, yg, ys1, eps, pre, post)
    EACH_GROUP_OF_ROWS(
        const long p0 = m * ps0 + c0;
        const float *xg = x + m * xs0 + r0 * xs1 + c0, *ag = add ? add + m * as0 + r0 * as1 + c0 : 0;
        const float *rg = res ? res + m * rs0 + r0 * rs1 + c0 : 0, *w3g = w3 ? w3 + p0 : 0, *b3g = b3 ? b3 + p0 : 0;
        float *yg = y + m * ys0 + r0 * ys1 + c0;
        BY_ROW_COUNT(GROUP);
    );
    #undef GROUP
}

/* The VJP of a GroupNorm with its neighbours in f's backward-solve steps (vjp.py), per row and group:
 *
 *     t = pre(v + a) * w                     pre: zero where pm <= 0 (a ReLU's mask, from its input), if pm
 *     y = post(rstd * (t - mean(t) - xh * mean(t * xh)))      post: zero where qm <= 0, if qm
 *
 * with xh the normalised input GN saved in the forward and rstd [M, R, G] its 1 / sqrt(var + eps): the gradient
 * of y = GN(u) * w + b with respect to u, given v. Operands addressed as in gn_fused (a may broadcast over the
 * matrices with as0 = 0); y may be v (in place). */
#define T_V(j) (v[j * vs + k] * w[k])
#define T_VA(j) ((v[j * vs + k] + a[j * as + k]) * w[k])
#define T_VM(j) ((pm[j * ps + k] > 0.f ? v[j * vs + k] : 0.f) * w[k])
#define T_VAM(j) ((pm[j * ps + k] > 0.f ? v[j * vs + k] + a[j * as + k] : 0.f) * w[k])
#define STORE_ADD2(V, j) { const float t = V(j); y[j * ys + k] = t; s##j += t; q##j += t * xh[j * hs + k]; }
#define BACK(j) (rstd[j] * (y[j * ys + k] - ms[j] - xh[j * hs + k] * mq[j]))
#define BACK_M(j) (qm[j * qs + k] > 0.f ? BACK(j) : 0.f)
/* for k < n, rows j < nr: y_j = t = V(j); sums of t and of t * xh into ms, mq (then divided by n) */
#define ROWS_SUM2(V) do {                                                                             \
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, q0 = 0.f, q1 = 0.f, q2 = 0.f, q3 = 0.f;         \
        _Pragma("omp simd reduction(+:s0, s1, s2, s3, q0, q1, q2, q3)")                               \
        for (long k = 0; k < n; k++) EACH_ROW(STORE_ADD2, V);                                        \
        ms[0] = s0 / n; ms[1] = s1 / n; ms[2] = s2 / n; ms[3] = s3 / n;                               \
        mq[0] = q0 / n; mq[1] = q1 / n; mq[2] = q2 / n; mq[3] = q3 / n;                               \
    } while (0)

static inline __attribute__((always_inline)) void group_rows_back(
        const int nr, long n, const float *v, long vs, const float *a, long as, const float *pm, long ps,
        const float *xh, long hs, const float *rstd, const float *w, const float *qm, long qs, float *y, long ys) {
    float ms[4], mq[4];
    if (a && pm) ROWS_SUM2(T_VAM);
    else if (a) ROWS_SUM2(T_VA);
    else if (pm) ROWS_SUM2(T_VM);
    else ROWS_SUM2(T_V);
    if (qm) ROWS_STORE(BACK_M);
    else ROWS_STORE(BACK);
}

void gn_backward(long M, long R, long C, long G, const float *v, long vs0, long vs1, const float *add, long as0,
                 long as1, const float *pm, long ps0, long ps1, const float *xh, long hs0, long hs1,
                 const float *rstd, const float *w, long ws0, const float *qm, long qs0, long qs1, float *y, long ys0,
                 long ys1, int nt) {
    #define GROUP(NR) group_rows_back(NR, cg, vg, vs1, ag, as1, pg, ps1, hg, hs1, rs, w + m * ws0 + c0, qg, qs1, yg, ys1)
    EACH_GROUP_OF_ROWS(
        float rs[4];
        for (long j = 0; j < nr; j++) rs[j] = rstd[(m * R + r0 + j) * G + g];
        const float *vg = v + m * vs0 + r0 * vs1 + c0, *ag = add ? add + m * as0 + r0 * as1 + c0 : 0;
        const float *pg = pm ? pm + m * ps0 + r0 * ps1 + c0 : 0, *hg = xh + m * hs0 + r0 * hs1 + c0;
        const float *qg = qm ? qm + m * qs0 + r0 * qs1 + c0 : 0;
        float *yg = y + m * ys0 + r0 * ys1 + c0;
        BY_ROW_COUNT(GROUP);
    );
    #undef GROUP
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
