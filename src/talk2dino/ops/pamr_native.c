/*
 * PAMR propagation on the CPU, all iterations in one sweep: m'(x) = sum_k alpha(x, k) m(x + delta_k), repeated,
 * method.md section 4.7.
 *
 * Compiled at first use by ops/pamr_native.py with the machine's C compiler and loaded through ctypes (no
 * torch headers, so it builds in well under a second). Plain C99 plus the GCC/Clang vector extension, which
 * lowers to whatever SIMD the target has (SSE2, AVX2, AVX-512, NEON).
 *
 * Why one sweep: one step at a time streams the affinities (48 floats per pixel, 38 MB for a 448x448 window)
 * and two copies of the masks through main memory at every step, and that traffic, not arithmetic, bounded
 * the step. Here the steps form a wavefront: while step 1 produces row Y, step s produces row Y - (s-1) P,
 * which needs only rows of step s-1 that are already done (P = the largest vertical offset). Each step keeps
 * just a ring of 2P + 1 rows, so the masks never leave the cache. The affinity rows in use span T P rows (about
 * 20 MB for a 448-wide window), so each row comes back from the last-level cache, or from memory on a smaller
 * one, at each step; hence their block layout below, which makes them one stream.
 *
 * Layout (all float32, row-major):
 *   alpha   [H][Wa / XBLOCK][K][XBLOCK]   pixel block b of row y holds the K offsets' weights of its XBLOCK
 *                          pixels, one block after the other, so that a block's propagation reads one contiguous
 *                          stream of weights rather than K rows apart (one stream instead of 48: the hardware
 *                          prefetchers follow it; 25 % less time on one Zen 4 core, measured); the weights of
 *                          pixels W..Wa-1 are zero; Wa % XBLOCK == 0.
 *   masks   [C][H][W]      the input maps (only channels c0..c1-1 are read).
 *   out     [C][H][W]      the refined maps (only channels c0..c1-1 are written).
 * The scratch, iterations * (2P + 1) rows of (c1 - c0) * (Wa + 2Q) floats (Q = the largest |dx|; about 10 MB
 * for 21 classes of a 448x448 window), is allocated here in 2 MB-aligned memory advised for huge pages: the
 * sweep reads 13 rows per class group at once, and with 4 kB pages their translations overflow the TLB.
 *
 * Every output value is the sum over k = 0..K-1, in that order, of alpha * m, accumulated in float32 from zero
 * with separate multiply and add (the build passes -ffp-contract=off), lane by lane, so the result does not
 * depend on the vector width, how channels are split across threads, or the machine (it differs from the torch
 * path's by float rounding). Borders replicate the edge pixel (clamped rows and columns).
 */
#define _GNU_SOURCE /* madvise's MADV_HUGEPAGE on glibc */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

#if defined(__AVX__)
/* One AVX register. AVX-512 builds too: 16 lanes were no faster on a Zen 4 core (which splits 512-bit work in
   two), and on AVX2 they would need twice the registers and spill the accumulators (3x slower, measured). */
#define LANES 8
#else
#define LANES 4 /* one SSE2 / NEON register, for the same reason */
#endif
#define XBLOCK (2 * LANES)      /* pixels per block; Wa is a multiple of it */
#define MAX_OFFSETS 1024 /* neighbour offsets per call (stack tables); MAX_OFFSETS in pamr_native.py */
#define MAXG 6                   /* channels per pass: 12 accumulators and 2 weight vectors in registers */
/* Floats ahead to prefetch in the mask rows a block reads (one prefetch per offset and channel, up to 48 x MAXG,
   over 13 distinct rows per channel: more streams than the hardware prefetchers follow). Two blocks: about 10 %
   faster on a Zen 4 core than none, and one block was 1.7x slower than two; a prefetch past a row's end touches
   only the next row. The weights, one contiguous stream per block, are left to the hardware. */
#define PREFETCH (2 * XBLOCK)

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* NCH channels of one block of XBLOCK pixels at column x. rows[k] points at the source row (column 0 of the
   first channel) that offset k reads, already shifted by its dx; channel c sits `stride` floats further. */
#define DEFINE_BLOCK(NCH)                                                                                        \
    static void block_##NCH(const float *restrict alpha, const float *const *rows,                                \
                            ptrdiff_t x, ptrdiff_t stride, float *restrict dst, int K) {                          \
        vec acc0[NCH], acc1[NCH];                                                                                \
        for (int c = 0; c < NCH; ++c) {                                                                          \
            acc0[c] = (vec){0};                                                                                  \
            acc1[c] = (vec){0};                                                                                  \
        }                                                                                                        \
        for (int k = 0; k < K; ++k) {                                                                            \
            const vec a0 = load(alpha + x * K + k * XBLOCK), a1 = load(alpha + x * K + k * XBLOCK + LANES);       \
            const float *s = rows[k] + x;                                                                        \
            for (int c = 0; c < NCH; ++c)                                                                        \
                __builtin_prefetch(s + c * stride + PREFETCH);                                                   \
            for (int c = 0; c < NCH; ++c) {                                                                      \
                acc0[c] = acc0[c] + a0 * load(s + c * stride);                                                   \
                acc1[c] = acc1[c] + a1 * load(s + c * stride + LANES);                                           \
            }                                                                                                    \
        }                                                                                                        \
        for (int c = 0; c < NCH; ++c) {                                                                          \
            store(dst + c * stride + x, acc0[c]);                                                                \
            store(dst + c * stride + x + LANES, acc1[c]);                                                        \
        }                                                                                                        \
    }

DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)
DEFINE_BLOCK(5)
DEFINE_BLOCK(6)

/* The version of this interface; ops/pamr_native.py refuses a library that answers anything else. */
int t2d_pamr_abi(void) { return 4; }

/* The pixels per block, which the caller's padded row length Wa must be a multiple of. */
int t2d_pamr_xblock(void) { return XBLOCK; }

static inline int clamp(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* The largest |dy| and |dx| of n offsets, into *P and *Q (which hold a lower bound on entry). */
static void reach(const int *dy, const int *dx, int n, int *P, int *Q) {
    for (int i = 0; i < n; ++i) {
        const int ay = dy[i] < 0 ? -dy[i] : dy[i], ax = dx[i] < 0 ? -dx[i] : dx[i];
        *P = ay > *P ? ay : *P;
        *Q = ax > *Q ? ax : *Q;
    }
}

/* Replicate the edge columns of one row of `channels` channels, each Wp long (a ring row of the masks, or a
   guide row of the affinities): Q columns left, and right of W. */
static void pad_row(float *row, int channels, ptrdiff_t Wp, int Q, int W) {
    for (int c = 0; c < channels; ++c) {
        float *r = row + c * Wp;
        const float left = r[Q], right = r[Q + W - 1];
        for (int x = 0; x < Q; ++x) r[x] = left;
        for (ptrdiff_t x = Q + W; x < Wp; ++x) r[x] = right;
    }
}

/*
 * All `iterations` steps for channels c0..c1-1 of one sample. dy/dx: the K offsets, in alpha's order. Calls for
 * disjoint channel ranges may run at once on different threads, each with its own `work`.
 * Returns 0, -1 when the arguments are inconsistent, -2 when the scratch cannot be allocated.
 */
int t2d_pamr(const float *alpha, const float *masks, float *out, const int *dy, const int *dx, int K, int C, int H,
             int W, int Wa, int iterations, int c0, int c1) {
    if (K <= 0 || K > MAX_OFFSETS || C <= 0 || H <= 0 || W <= 0 || Wa < W || Wa % XBLOCK != 0 || iterations < 1 ||
        c0 < 0 || c1 > C || c0 >= c1)
        return -1;
    int P = 0, Q = 0;
    reach(dy, dx, K, &P, &Q);
    const int G = c1 - c0, R = 2 * P + 1, T = iterations;
    const ptrdiff_t Wp = (ptrdiff_t)Wa + 2 * Q, ring_row = (ptrdiff_t)G * Wp, ring = R * ring_row;
    const ptrdiff_t plane = (ptrdiff_t)H * W;
    /* Ring s (0..T-1) holds rows of step s (step 0: the input); step T writes `out` through `last`. */
    const size_t huge = (size_t)2 << 20;
    const size_t bytes = (((size_t)(T * ring + ring_row) * sizeof(float)) + huge - 1) / huge * huge;
    float *work = NULL;
    if (posix_memalign((void **)&work, huge, bytes) != 0)
        return -2;
#ifdef MADV_HUGEPAGE
    madvise(work, bytes, MADV_HUGEPAGE); /* advice only: without transparent huge pages nothing changes */
#endif
    float *last = work + (ptrdiff_t)T * ring; /* one row of G channels, Wp long */
    const float *rows[MAX_OFFSETS];

    for (ptrdiff_t Y = 0; Y < (ptrdiff_t)H + (ptrdiff_t)T * P; ++Y) {
        /* Step 0: the input row Y, with its border columns. */
        if (Y < H) {
            float *dst = work + (Y % R) * ring_row;
            for (int c = 0; c < G; ++c)
                memcpy(dst + c * Wp + Q, masks + (c0 + c) * plane + Y * W, (size_t)W * sizeof(float));
            pad_row(dst, G, Wp, Q, W);
        }
        for (int s = 1; s <= T; ++s) {
            const ptrdiff_t r = Y - (ptrdiff_t)s * P;
            if (r < 0 || r >= H)
                continue;
            const float *prev = work + (ptrdiff_t)(s - 1) * ring;
            for (int k = 0; k < K; ++k)
                rows[k] = prev + (clamp((int)r + dy[k], 0, H - 1) % R) * ring_row + Q + dx[k];
            float *dst = s < T ? work + (ptrdiff_t)s * ring + (r % R) * ring_row : last;
            const float *a = alpha + r * K * Wa;
            for (int c = 0; c < G;) {
                const int n = G - c >= MAXG ? MAXG : G - c;
                const float *const *shifted = rows;
                const float *cr[MAX_OFFSETS];
                if (c > 0) { /* the same rows, `c` channels further */
                    for (int k = 0; k < K; ++k)
                        cr[k] = rows[k] + c * Wp;
                    shifted = cr;
                }
                float *d = dst + c * Wp + Q;
                for (ptrdiff_t x = 0; x < Wa; x += XBLOCK) {
                    switch (n) {
                    case 6: block_6(a, shifted, x, Wp, d, K); break;
                    case 5: block_5(a, shifted, x, Wp, d, K); break;
                    case 4: block_4(a, shifted, x, Wp, d, K); break;
                    case 3: block_3(a, shifted, x, Wp, d, K); break;
                    case 2: block_2(a, shifted, x, Wp, d, K); break;
                    default: block_1(a, shifted, x, Wp, d, K); break;
                    }
                }
                c += n;
            }
            if (s < T)
                pad_row(dst, G, Wp, Q, W);
            else
                for (int c = 0; c < G; ++c)
                    memcpy(out + (c0 + c) * plane + r * W, last + c * Wp + Q, (size_t)W * sizeof(float));
        }
    }
    free(work);
    return 0;
}

typedef int ivec __attribute__((vector_size(LANES * sizeof(int))));

/* Lane by lane `mask ? a : b`, mask lanes all ones or zero (what vector comparisons give; C has no vector ?:). */
static inline vec pick(ivec mask, vec a, vec b) {
    ivec ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const ivec bits = (ai & mask) | (bi & ~mask);
    vec out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline vec splat(float value) { return (vec){0} + value; }

/* e^x for every lane: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes expf), within 2 ulp of
   the libm value; lanes below -87.3 give 0, as expf's result would be flushed below the normal range. */
static inline vec vexp(vec x) {
    const ivec underflow = x < -87.3f;
    x = pick(underflow, splat(-87.3f), x);
    x = pick(x > 88.7f, splat(88.7f), x);
    const vec t = x * 1.44269504088896341f + 0.5f;
    ivec n = __builtin_convertvector(t, ivec);
    n = n + (__builtin_convertvector(n, vec) > t); /* floor, not truncation: true lanes are -1 */
    const vec fn = __builtin_convertvector(n, vec);
    const vec r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    vec p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const ivec bits = (n + 127) << 23;
    vec scale;
    memcpy(&scale, &bits, sizeof scale);
    const vec result = p * scale;
    return pick(underflow, splat(0.0f), result);
}

/*
 * Rows y0..y1-1 of the affinities alpha (layout above) from the guide image, method.md section 4.7:
 * sigma_ch(x) the sample standard deviation of the S stencil values (sy, sx; centre included at every dilation),
 * kappa(x, k) = -(1/3) sum_ch |I_ch(x) - I_ch(x + delta_k)| / (1e-8 + 0.1 sigma_ch(x)), alpha = softmax over k.
 * image: [3][H][W] float32. The rows this call reads, with a replicate border (P = the largest |dy|, |sy|; Q =
 * the largest |dx|, |sx|; plus the columns up to Wa), are copied into a private buffer first, so that every
 * neighbour read below is a plain load; doing that here rather than with a torch op before the call keeps
 * torch's OpenMP workers, which spin for a few ms after each parallel region, off the cores this call runs on.
 * Weights below the smallest normal float are stored as 0, so that no subnormal reaches the propagation (their
 * products would take the CPU's slow path for no visible change). Calls on disjoint row ranges may run at once.
 * Returns 0, -1 when the arguments are inconsistent, -2 when the buffer cannot be allocated.
 */
int t2d_pamr_affinities(const float *image, float *alpha, const int *dy, const int *dx, int K, const int *sy,
                        const int *sx, int S, int H, int W, int Wa, int y0, int y1) {
    if (K <= 0 || K > MAX_OFFSETS || S < 2 || H <= 0 || W <= 0 || Wa < W || Wa % XBLOCK != 0 || y0 < 0 || y1 > H ||
        y0 > y1)
        return -1;
    if (y0 == y1)
        return 0;
    int P = 0, Q = 0;
    reach(dy, dx, K, &P, &Q);
    reach(sy, sx, S, &P, &Q);
    /* Band row b holds image row clamp(y0 - P + b); column Q + x holds image column clamp(x). */
    const ptrdiff_t Gw = (ptrdiff_t)Wa + 2 * Q, rows = (ptrdiff_t)(y1 - y0) + 2 * P, Gplane = rows * Gw;
    float *band = malloc((size_t)(3 * Gplane) * sizeof(float));
    if (band == NULL)
        return -2;
    for (int ch = 0; ch < 3; ++ch)
        for (ptrdiff_t b = 0; b < rows; ++b) {
            const float *src = image + ((ptrdiff_t)ch * H + clamp((int)(y0 - P + b), 0, H - 1)) * W;
            float *row = band + ch * Gplane + b * Gw;
            memcpy(row + Q, src, (size_t)W * sizeof(float));
            pad_row(row, 1, Gw, Q, W);
        }
    vec kappa[MAX_OFFSETS];
    for (ptrdiff_t y = y0; y < y1; ++y) {
        const float *centre_row = band + (P + y - y0) * Gw + Q; /* channel 0; channel ch is ch * Gplane further */
        float *a = alpha + y * K * Wa;
        for (ptrdiff_t x = 0; x < Wa; x += LANES) {
            vec centre[3], scale[3];
            for (int ch = 0; ch < 3; ++ch) {
                const float *g = centre_row + ch * Gplane + x;
                vec total = (vec){0};
                for (int i = 0; i < S; ++i)
                    total = total + load(g + sy[i] * Gw + sx[i]);
                const vec mean = total / (float)S;
                vec squares = (vec){0};
                for (int i = 0; i < S; ++i) {
                    const vec d = load(g + sy[i] * Gw + sx[i]) - mean;
                    squares = squares + d * d;
                }
                const vec variance = squares / (float)(S - 1);
                vec deviation = splat(0.0f);
                for (int l = 0; l < LANES; ++l) /* sqrt lane by lane: compilers vectorise it (correctly rounded) */
                    deviation[l] = __builtin_sqrtf(variance[l]);
                scale[ch] = deviation * 0.1f + 1e-8f;
                centre[ch] = load(g);
            }
            vec top = splat(-3.4e38f);
            for (int k = 0; k < K; ++k) {
                vec sum = (vec){0};
                for (int ch = 0; ch < 3; ++ch) {
                    const vec d = centre[ch] - load(centre_row + ch * Gplane + dy[k] * Gw + x + dx[k]);
                    const vec magnitude = pick(d < 0.0f, -d, d);
                    sum = ch == 0 ? magnitude / scale[ch] : sum + magnitude / scale[ch];
                }
                kappa[k] = sum / -3.0f;
                top = pick(kappa[k] > top, kappa[k], top);
            }
            vec total = (vec){0};
            for (int k = 0; k < K; ++k) {
                kappa[k] = vexp(kappa[k] - top);
                total = total + kappa[k];
            }
            /* Columns beyond W get zero weights, so that the propagation's padded blocks add nothing. */
            ivec outside = (ivec){0};
            for (int l = 0; l < LANES; ++l)
                outside[l] = x + l >= W ? -1 : 0;
            float *dst = a + (x / XBLOCK) * K * XBLOCK + x % XBLOCK;
            for (int k = 0; k < K; ++k) {
                const vec w = kappa[k] / total;
                store(dst + k * XBLOCK, pick((w < 1.17549435e-38f) | outside, splat(0.0f), w));
            }
        }
    }
    free(band);
    return 0;
}
