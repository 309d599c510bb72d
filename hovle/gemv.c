/* CPU decode kernels: matrix-vector products y[m, n] = sum_k x[m, k] * w[n, k] for a few rows x (M = batch),
 * and decode_stack, one new token through a whole decoder stack in one call.
 *
 * Decode reads every weight once per new token, so its speed is how fast weights stream from memory.
 * PyTorch's int8 GEMV is compute-bound (slower than its bf16 one on this class of CPU) and its bf16 GEMV
 * pays ~50-100 us per call on small matrices. These kernels read each weight row once for all M rows and
 * keep four output rows in flight, so four accumulators hide the dot-product latency. Built with
 * `-march=native` for x86 CPUs with AVX512-BF16 and AVX512-VNNI (Intel Sapphire Rapids and later, AMD Zen 4
 * and later); hovle/kernels.py falls back to PyTorch elsewhere.
 *
 * Layout: w is [N, K] row-major (int8: packed, see gemv_int8), x is [M, K] and y is [M, N], all contiguous;
 * K % 64 == 0.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#if !defined(__AVX512BF16__) || !defined(__AVX512VNNI__)
#error "hovle's CPU kernels need AVX512-BF16 and AVX512-VNNI"
#endif

#define QBLOCK 64    /* int8 kernel: the k's of one vpdpbusd */
#define PREFETCH 1024 /* bytes ahead in each bf16 weight row */
#define SHORT_ROWS 2048 /* k's: up to this row length, bf16 prefetches the next four rows instead */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Store `rows` fp32 dot products as bf16 outputs, plus the bias if there is one. */
static inline void store(uint16_t *y, int64_t rows, const float acc[4], const uint16_t *bias) {
    for (int r = 0; r < rows; r++) y[r] = f32_to_bf16(bias ? acc[r] + bf16_to_f32(bias[r]) : acc[r]);
}

/* bf16 weights and activations: vdpbf16ps multiplies 32 pairs and accumulates them in fp32. Long rows: each
 * row stream is prefetched PREFETCH bytes ahead (measured: +8-15% over the hardware prefetcher alone). Rows
 * up to SHORT_ROWS: the next group of four rows is prefetched instead (on a 2-core EPYC, 576-wide GEMVs went
 * from 11-15 to 19-25 GB/s; HoVLE-Tiny decode 43-45 -> 60-64 tok/s, 2.6B 5.2-5.4 -> 5.9-7.0 tok/s). */
static void gemv_bf16_shared(const uint16_t *w, const uint16_t *bias, const uint16_t *x, uint16_t *y, int64_t M,
                             int64_t N, int64_t K) {
    /* Orphaned worksharing: inside decode_stack's parallel region the threads split the rows and meet at
     * the loop's closing barrier; gemv_bf16 opens a region of its own. */
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n += 4) {
        /* Past the last row (N % 4 != 0) the pointers repeat row n; those sums are not stored. */
        const int64_t rows = N - n < 4 ? N - n : 4;
        const uint16_t *w0 = w + n * K, *w1 = w0 + (rows > 1) * K, *w2 = w0 + (rows > 2) * 2 * K,
                       *w3 = w0 + (rows > 3) * 3 * K;
        /* Short rows: the next four rows (contiguous after these) are prefetched, 256 bytes per step, so that
         * they arrive during this group; a few hundred bytes ahead inside each row would come too late. */
        const char *next = (const char *)(w + (n + 4) * K);
        const int short_rows = K <= SHORT_ROWS;
        for (int64_t m = 0; m < M; m++) {
            const uint16_t *xm = x + m * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + k);
                if (short_rows) {
                    const char *p = next + 8 * k; /* 4 rows x 64 bytes per 32 k's */
                    _mm_prefetch(p, _MM_HINT_T0), _mm_prefetch(p + 64, _MM_HINT_T0);
                    _mm_prefetch(p + 128, _MM_HINT_T0), _mm_prefetch(p + 192, _MM_HINT_T0);
                } else {
                    _mm_prefetch((const char *)(w0 + k + PREFETCH / 2), _MM_HINT_T0); /* 2 bytes per element */
                    _mm_prefetch((const char *)(w1 + k + PREFETCH / 2), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w2 + k + PREFETCH / 2), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w3 + k + PREFETCH / 2), _MM_HINT_T0);
                }
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), xv);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + k), xv);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + k), xv);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + k), xv);
            }
            float acc[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                            _mm512_reduce_add_ps(a3)};
            store(y + m * N + n, rows, acc, bias ? bias + n : NULL);
        }
    }
}

void gemv_bf16(const uint16_t *w, const uint16_t *bias, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel
    gemv_bf16_shared(w, bias, x, y, M, N, K);
}

/* int8 weights (symmetric, one fp32 scale per row and group of 64 k's) times int8-quantized activations.
 *
 * vpdpbusd multiplies unsigned by signed bytes, 64 pairs at a time into 16 int32 lanes. Flipping the
 * weight's sign bit reads it as w + 128 (unsigned), so sum (w + 128) q = sum w q + 128 sum q; each lane
 * starts from -128 sum q of its 4 activations instead of zero, so the int32 sums are exact. Activations are
 * quantized per group of 4 (absmax / 127): the k's that one int32 lane sums, so each lane takes its own
 * scale at no cost in the inner loop. Coarser groups let one outlier flatten its neighbours: on SmolLM2
 * decode logits, groups of 64 gave cosine 0.991 to bf16, groups of 4 0.995 (int8 weights alone: 0.997).
 * A weight scale per 64 k's (one vpdpbusd) rather than per row: the weight rounding alone costs SmolLM2
 * prose logits cosine 0.9990 to bf16 instead of 0.9986.
 *
 * The weight is packed (hovle.kernels.pack_int8) as [N/4, K/64, 4, 64]: the 64-byte chunks of four rows
 * interleaved, so each thread reads one sequential stream that the prefetcher follows, plus an explicit
 * prefetch INT8_PREFETCH bytes ahead. Measured on 2 cores: ~28 GB/s against ~21 GB/s for four row streams.
 */
#define INT8_PREFETCH 4096
/* Quantize M activation rows [M, K] to int8 per group of 4: xq [M, K], xscale [M, K/4], and xneg [M, K/4] =
 * -128 * sum q over each group, which cancels what the sign flip adds (see gemv_int8). */
static void quantize_rows(const uint16_t *x, int64_t M, int64_t K, int8_t *xq, float *xscale, int32_t *xneg) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k += 16) {
            /* 16 activations as fp32 (bf16 bits shifted up), and each group of 4's absmax in all 4 places */
            const __m512 v = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + m * K + k))), 16));
            __m512 a = _mm512_abs_ps(v);
            a = _mm512_max_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(2, 3, 0, 1)));
            a = _mm512_max_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));
            const __m512 s = _mm512_div_ps(a, _mm512_set1_ps(127.f));
            const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                   _mm512_set1_ps(127.f), a);
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv)); /* round to nearest even */
            _mm_store_si128((__m128i *)(xq + m * K + k), _mm512_cvtepi32_epi8(q));
            _mm_storeu_ps(xscale + (m * K + k) / 4, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, s)));
            __m512i g = _mm512_add_epi32(q, _mm512_shuffle_epi32(q, _MM_PERM_CDAB)); /* each group's sum, 4 times */
            g = _mm512_add_epi32(g, _mm512_shuffle_epi32(g, _MM_PERM_BADC));
            g = _mm512_mullo_epi32(g, _mm512_set1_epi32(-128));
            _mm_storeu_si128((__m128i *)(xneg + (m * K + k) / 4), _mm512_castsi512_si128(_mm512_maskz_compress_epi32(0x1111, g)));
        }
    }
}

/* The row loop of gemv_int8 on activations from quantize_rows; orphaned worksharing like gemv_bf16_shared.
 * scale: [N, K/64] fp32, one per row and block of 64 k's. */
static void gemv_int8_shared(const int8_t *w, const float *scale, const uint16_t *bias, const int8_t *xq,
                             const float *xscale, const int32_t *xneg, uint16_t *y, int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = K / QBLOCK;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n += 4) {
        const int8_t *wn = w + n * K; /* four rows' chunks, interleaved */
        /* The packed tail is zero-padded to four rows; past row N the scale pointers repeat row n. */
        const int64_t rows = N - n < 4 ? N - n : 4;
        const float *s0 = scale + n * blocks, *s1 = s0 + (rows > 1) * blocks, *s2 = s0 + (rows > 2) * 2 * blocks,
                    *s3 = s0 + (rows > 3) * 3 * blocks;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *sm = xscale + m * K / 4;
            const int32_t *cm = xneg + m * K / 4;
            __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
            for (int64_t b = 0; b < blocks; b++) {
                const int8_t *wb = wn + 4 * b * QBLOCK;
                for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(wb + INT8_PREFETCH + 64 * i), _MM_HINT_T0);
                const __m512i xv = _mm512_load_si512(xm + b * QBLOCK), c = _mm512_load_si512(cm + 16 * b);
                const __m512 sv = _mm512_load_ps(sm + 16 * b); /* the 16 lanes' activation scales */
                __m512i d0 = _mm512_dpbusd_epi32(c, _mm512_xor_si512(_mm512_loadu_si512(wb), flip), xv);
                __m512i d1 = _mm512_dpbusd_epi32(c, _mm512_xor_si512(_mm512_loadu_si512(wb + 64), flip), xv);
                __m512i d2 = _mm512_dpbusd_epi32(c, _mm512_xor_si512(_mm512_loadu_si512(wb + 128), flip), xv);
                __m512i d3 = _mm512_dpbusd_epi32(c, _mm512_xor_si512(_mm512_loadu_si512(wb + 192), flip), xv);
                f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(sv, _mm512_set1_ps(s0[b])), f0);
                f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(sv, _mm512_set1_ps(s1[b])), f1);
                f2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d2), _mm512_mul_ps(sv, _mm512_set1_ps(s2[b])), f2);
                f3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d3), _mm512_mul_ps(sv, _mm512_set1_ps(s3[b])), f3);
            }
            float acc[4] = {_mm512_reduce_add_ps(f0), _mm512_reduce_add_ps(f1), _mm512_reduce_add_ps(f2),
                            _mm512_reduce_add_ps(f3)};
            store(y + m * N + n, rows, acc, bias ? bias + n : NULL);
        }
    }
}

int gemv_int8(const int8_t *w, const float *scale, const uint16_t *bias, const uint16_t *x, uint16_t *y,
              int64_t M, int64_t N, int64_t K) {
    int8_t *xq = aligned_alloc(64, M * K);
    float *xscale = aligned_alloc(64, sizeof(float) * M * K / 4); /* one scale per group of 4 = per int32 lane */
    int32_t *xneg = aligned_alloc(64, sizeof(int32_t) * M * K / 4);
    if (!xq || !xscale || !xneg) {
        free(xq), free(xscale), free(xneg);
        return 1;
    }
    quantize_rows(x, M, K, xq, xscale, xneg);
#pragma omp parallel
    gemv_int8_shared(w, scale, bias, xq, xscale, xneg, y, M, N, K);
    free(xq), free(xscale), free(xneg);
    return 0;
}

/* Dequantize an int8 weight packed for gemv_int8 (scale: [N, K/64]) into bf16 rows [N, K], for prefill,
 * which multiplies many rows with the dense bf16 matmul. */
void unpack_int8_bf16(const int8_t *w, const float *scale, uint16_t *out, int64_t N, int64_t K) {
    const int64_t blocks = K / QBLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n += 4) {
        const int8_t *wn = w + n * K;
        const int64_t rows = N - n < 4 ? N - n : 4;
        for (int64_t b = 0; b < blocks; b++)
            for (int64_t r = 0; r < rows; r++) {
                const __m512 s = _mm512_set1_ps(scale[(n + r) * blocks + b]);
                for (int i = 0; i < QBLOCK; i += 32) {
                    const int8_t *src = wn + 4 * b * QBLOCK + r * QBLOCK + i;
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 16))));
                    _mm512_storeu_si512(out + (n + r) * K + b * QBLOCK + i,
                                        (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s), _mm512_mul_ps(lo, s)));
                }
            }
    }
}

/* ---- one decode step of a whole decoder stack ------------------------------------------------------------
 *
 * For one sequence and one new token, the layers of hovle.model.DecoderLayer (pre-norm GQA attention with
 * rotate-half RoPE over the KV cache, then a SwiGLU MLP), all in one OpenMP region: one call per stack and
 * per token instead of ~13 PyTorch ops per layer, whose dispatch cost more than the weights' streaming on
 * small models (SmolLM2-135M: ~13 ms of ~28 ms per token). Intermediate values are rounded to bf16 where
 * PyTorch's bf16 ops round them, so the two paths agree to bf16 rounding.
 */

/* Per layer: the two norms' weights, the caches, and each linear's (weight, int8 scales or NULL for bf16, bias or NULL). */
enum { P_ATTN_NORM, P_FFN_NORM, P_K, P_V, P_WQKV, P_WO = P_WQKV + 3, P_W13 = P_WO + 3, P_W2 = P_W13 + 3, P_COUNT = P_W2 + 3 };

struct int8_work {
    int8_t *xq;
    float *xscale;
    int32_t *xneg;
};

/* y [N] = x [K] times the linear at p (bf16 or packed int8), all threads together. */
static void linear_shared(const void *const *p, const uint16_t *x, uint16_t *y, int64_t N, int64_t K,
                          struct int8_work *work) {
    if (!p[1]) {
        gemv_bf16_shared(p[0], p[2], x, y, 1, N, K);
        return;
    }
#pragma omp single
    quantize_rows(x, 1, K, work->xq, work->xscale, work->xneg);
    gemv_int8_shared(p[0], p[1], p[2], work->xq, work->xscale, work->xneg, y, 1, N, K);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* out = weight * bf16(x / rms(x)), as hovle.model.RMSNorm (fp32 statistics). */
static void rms_norm(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t C, float eps) {
    float ss = 0.f;
    for (int64_t c = 0; c < C; c++) ss += bf16_to_f32(x[c]) * bf16_to_f32(x[c]);
    const float r = 1.f / sqrtf(ss / C + eps);
    for (int64_t c = 0; c < C; c++) out[c] = f32_to_bf16(bf16_to_f32(weight[c]) * round_bf16(bf16_to_f32(x[c]) * r));
}

/* In place on `heads` heads of D values: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), bf16 products. */
static void rope(uint16_t *x, int64_t heads, int64_t D, const uint16_t *cos, const uint16_t *sin) {
    for (int64_t h = 0; h < heads; h++) {
        uint16_t *x1 = x + h * D, *x2 = x1 + D / 2;
        for (int64_t i = 0; i < D / 2; i++) {
            const float a = bf16_to_f32(x1[i]), b = bf16_to_f32(x2[i]), c = bf16_to_f32(cos[i]), s = bf16_to_f32(sin[i]);
            x1[i] = f32_to_bf16(round_bf16(a * c) - round_bf16(b * s));
            x2[i] = f32_to_bf16(round_bf16(b * c) + round_bf16(a * s));
        }
    }
}

static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t D) { /* D % 32 == 0 */
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + d), (__m512bh)_mm512_loadu_si512(b + d));
    return _mm512_reduce_add_ps(acc);
}

/* Query head h attends to the cached slots s <= slot that are valid (and always its own): softmax in fp32.
 * k, v: this head's [L, D] cache rows; scores: slot + 1 floats of scratch. */
static void attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid, int64_t slot,
                   int64_t D, float *scores, uint16_t *out) {
    const float scale = 1.f / sqrtf((float)D);
    float top = -INFINITY;
    for (int64_t s = 0; s <= slot; s++) {
        scores[s] = (valid[s] || s == slot) ? dot_bf16(q, k + s * D, D) * scale : -INFINITY;
        top = scores[s] > top ? scores[s] : top;
    }
    float acc[512], total = 0.f; /* D <= 512 */
    for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
    for (int64_t s = 0; s <= slot; s++) {
        if (scores[s] == -INFINITY) continue;
        const float p = expf(scores[s] - top);
        total += p;
        const uint16_t *vs = v + s * D;
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 vv = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vs + d))), 16));
            _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(_mm512_set1_ps(p), vv, _mm512_loadu_ps(acc + d)));
        }
    }
    for (int64_t d = 0; d < D; d++) out[d] = f32_to_bf16(acc[d] / total);
}

/* x [C] (bf16, the residual stream) is updated in place by `layers` layers. params: per layer P_COUNT
 * pointers (P_K / P_V point at the layer's cache [KVH, L, D]). The new token's key and
 * value are written at `slot`; valid [L] marks the cached slots to attend to. cos, sin: [D/2] of the token's
 * position. scratch: H * L floats. buf: bf16 work space of 2 * C + (2 * H + 2 * KVH) * D + 3 * I values.
 * dims: C, H, KVH, D, I, L. Returns 1 if it could not allocate (then x is unchanged). */
int decode_stack(uint16_t *x, const void *const *params, int64_t layers, const uint8_t *valid, int64_t slot,
                  const uint16_t *cos, const uint16_t *sin, const int64_t *dims, float eps, float *scratch,
                  uint16_t *buf) {
    const int64_t C = dims[0], H = dims[1], KVH = dims[2], D = dims[3], I = dims[4], L = dims[5];
    const int64_t QKV = (H + 2 * KVH) * D, widest = I > C ? (I > H * D ? I : H * D) : (C > H * D ? C : H * D);
    uint16_t *h = buf, *qkv = h + C, *att = qkv + QKV, *gu = att + H * D, *act = gu + 2 * I, *o = act + I;
    struct int8_work work = {aligned_alloc(64, widest), aligned_alloc(64, sizeof(float) * widest / 4),
                             aligned_alloc(64, sizeof(int32_t) * widest / 4)};
    if (!work.xq || !work.xscale || !work.xneg) {
        free(work.xq), free(work.xscale), free(work.xneg);
        return 1;
    }
#pragma omp parallel
    for (int64_t l = 0; l < layers; l++) {
        const void *const *p = params + l * P_COUNT;
        uint16_t *kc = (uint16_t *)p[P_K], *vc = (uint16_t *)p[P_V];
#pragma omp single
        rms_norm(x, p[P_ATTN_NORM], h, C, eps);
        linear_shared(p + P_WQKV, h, qkv, QKV, C, &work);
#pragma omp single
        {
            rope(qkv, H + KVH, D, cos, sin); /* the query heads and the key heads are contiguous */
            for (int64_t g = 0; g < KVH; g++) {
                memcpy(kc + (g * L + slot) * D, qkv + (H + g) * D, D * sizeof(uint16_t));
                memcpy(vc + (g * L + slot) * D, qkv + (H + KVH + g) * D, D * sizeof(uint16_t));
            }
        }
#pragma omp for schedule(static)
        for (int64_t hd = 0; hd < H; hd++) {
            const int64_t g = hd / (H / KVH);
            attend(qkv + hd * D, kc + g * L * D, vc + g * L * D, valid, slot, D, scratch + hd * L, att + hd * D);
        }
        linear_shared(p + P_WO, att, o, C, H * D, &work);
#pragma omp single
        {
            for (int64_t c = 0; c < C; c++) x[c] = f32_to_bf16(bf16_to_f32(x[c]) + bf16_to_f32(o[c]));
            rms_norm(x, p[P_FFN_NORM], h, C, eps);
        }
        linear_shared(p + P_W13, h, gu, 2 * I, C, &work);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < I; i++) { /* silu(gate) * up, each rounded to bf16 as F.silu and * do */
            const float g = bf16_to_f32(gu[i]);
            act[i] = f32_to_bf16(round_bf16(g / (1.f + expf(-g))) * bf16_to_f32(gu[I + i]));
        }
        linear_shared(p + P_W2, act, o, C, I, &work);
#pragma omp single
        for (int64_t c = 0; c < C; c++) x[c] = f32_to_bf16(bf16_to_f32(x[c]) + bf16_to_f32(o[c]));
    }
    free(work.xq), free(work.xscale), free(work.xneg);
    return 0;
}
