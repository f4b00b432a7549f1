/*
 * Bilinear resampling with antialiasing of packed RGB uint8 images: Pillow's BILINEAR filter,
 * arithmetic and rounding, computed as Pillow's two passes (horizontal, then vertical), only
 * faster (SSE4.1 on x86).
 *
 * Definition (Pillow's Resample.c, 8-bit path). For one axis, input size n, box [in0, in1)
 * (float32, as Pillow parses it), output size m:
 *     scale = (double)(in1 - in0) / m;  fs = max(scale, 1);  support = fs  (the filter's 1 × fs)
 *     ksize = 2 * ceil(support) + 1
 *     output i: centre c = in0 + (i + 0.5) * scale
 *               taps x in [lo, hi), lo = max((int)(c - support + 0.5), 0),
 *                                   hi = min((int)(c + support + 0.5), n)
 *               w_x = max(0, 1 - |x - c + 0.5| / fs), normalised to sum 1 (double),
 *               then fixed point: k_x = (int)(0.5 + w_x * 2^22)
 *     value = clip((2^21 + sum_x k_x * p_x) >> 22, 0, 255)
 * The horizontal pass runs first (over the rows the vertical taps reach) and is rounded to
 * uint8; the vertical pass reads it. A pass is skipped when Pillow skips it (the output size
 * equals the input size along that axis and the box spans it from 0).
 *
 * Pillow up to 12 always computes the passes in this order; Pillow 13 may run the vertical pass
 * first, which moves some outputs by one grey level. hdml_jax's Python fallback composes two
 * single-axis Pillow resizes, so both give these pixels on any Pillow
 * (``hdml_jax/data/resample.py``; ``tests/test_resample.py`` checks the equality).
 *
 * Built as an optional extension (``setup.py``); loaded with ctypes. No Python API is used
 * besides the empty module that makes the file importable.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS 22
#define HALF (1 << (PRECISION_BITS - 1))

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HDML_X86_SIMD 1
#endif

#if defined(_WIN32)
#define HDML_EXPORT __declspec(dllexport)
#else
#define HDML_EXPORT __attribute__((visibility("default")))
#endif

/* Taps of one axis: output i reads `count[i]` inputs from `first[i]` with weights
   `weights[i * ksize + t]` (zero past count[i]). */
typedef struct {
    int ksize;
    int *first;
    int *count;
    int32_t *weights;
} Taps;

static void free_taps(Taps *taps) {
    free(taps->first);
    free(taps->count);
    free(taps->weights);
    taps->first = taps->count = NULL;
    taps->weights = NULL;
}

/* Returns 0, or -1 when out of memory. */
static int bilinear_taps(int in_size, float in0, float in1, int out_size, Taps *taps) {
    double scale = (double)(in1 - in0) / out_size;
    double filter_scale = scale < 1.0 ? 1.0 : scale;
    double support = filter_scale; /* the triangle's half-width, 1, stretched when shrinking */
    int ksize = (int)ceil(support) * 2 + 1;
    double *raw = malloc(sizeof(double) * ksize);
    taps->ksize = ksize;
    taps->first = malloc(sizeof(int) * out_size);
    taps->count = malloc(sizeof(int) * out_size);
    taps->weights = malloc(sizeof(int32_t) * (size_t)out_size * ksize);
    if (!raw || !taps->first || !taps->count || !taps->weights) {
        free(raw);
        free_taps(taps);
        return -1;
    }
    double inverse = 1.0 / filter_scale;
    for (int i = 0; i < out_size; i++) {
        double centre = in0 + (i + 0.5) * scale;
        int lo = (int)(centre - support + 0.5);
        int hi = (int)(centre + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in_size) hi = in_size;
        int count = hi - lo;
        double total = 0.0;
        for (int t = 0; t < count; t++) {
            double distance = fabs((t + lo - centre + 0.5) * inverse);
            raw[t] = distance < 1.0 ? 1.0 - distance : 0.0;
            total += raw[t];
        }
        int32_t *weights = taps->weights + (size_t)i * ksize;
        for (int t = 0; t < ksize; t++) {
            double w = t < count ? (total != 0.0 ? raw[t] / total : raw[t]) : 0.0;
            weights[t] = (int32_t)(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
        }
        taps->first[i] = lo;
        taps->count[i] = count;
    }
    free(raw);
    return 0;
}

static inline uint8_t clip8(int32_t sum) {
    sum >>= PRECISION_BITS;
    return sum < 0 ? 0 : sum > 255 ? 255 : (uint8_t)sum;
}

/* One output pixel of the horizontal pass, scalar. */
static inline void horizontal_pixel(const uint8_t *row, const Taps *taps, int i, uint8_t *out) {
    const int32_t *k = taps->weights + (size_t)i * taps->ksize;
    const uint8_t *p = row + (size_t)taps->first[i] * 3;
    int32_t r = HALF, g = HALF, b = HALF;
    for (int t = 0; t < taps->count[i]; t++) {
        r += p[3 * t] * k[t];
        g += p[3 * t + 1] * k[t];
        b += p[3 * t + 2] * k[t];
    }
    out[0] = clip8(r);
    out[1] = clip8(g);
    out[2] = clip8(b);
}

/* Where output pixel i goes in its row: i, or out_w - 1 - i for a mirrored (flipped) output. */
static inline size_t place(int i, int out_w, int flip) { return (size_t)(flip ? out_w - 1 - i : i) * 3; }

static void horizontal_scalar(const uint8_t *src, ptrdiff_t stride, int rows, uint8_t *dst, int out_w,
                              const Taps *taps, int flip) {
    for (int y = 0; y < rows; y++)
        for (int i = 0; i < out_w; i++)
            horizontal_pixel(src + y * stride, taps, i, dst + (size_t)y * out_w * 3 + place(i, out_w, flip));
}

#ifdef HDML_X86_SIMD
/* Outputs [0, n) whose taps end before the row's last pixel, so that a 4-byte load per tap
   stays inside the row (taps only move right along the row). */
static int outputs_with_spare_byte(const Taps *taps, int out_w, int in_w) {
    int n = out_w;
    while (n > 0 && taps->first[n - 1] + taps->count[n - 1] >= in_w) n--;
    return n;
}

/* One output pixel per 128-bit vector: each tap loads 4 bytes (RGB plus the next pixel's red,
   whose lane is ignored), widens them to int32 and adds them times the tap's weight. Two rows go
   together, sharing each weight (25% faster than one; a 256-bit version, two output pixels per
   vector, measured no faster than one row at a time). */
/* The sum's three lanes, shifted and saturated to bytes, written as one RGB pixel at o. */
__attribute__((target("sse4.1"))) static inline void sse41_store(__m128i sum, uint8_t *o) {
    sum = _mm_srai_epi32(sum, PRECISION_BITS);
    sum = _mm_packus_epi16(_mm_packs_epi32(sum, sum), sum);
    uint32_t bytes = (uint32_t)_mm_cvtsi128_si32(sum);
    o[0] = (uint8_t)bytes, o[1] = (uint8_t)(bytes >> 8), o[2] = (uint8_t)(bytes >> 16);
}

__attribute__((target("sse4.1"))) static void horizontal_sse41(const uint8_t *src, ptrdiff_t stride, int rows,
                                                               int in_w, uint8_t *dst, int out_w,
                                                               const Taps *taps, int flip) {
    int fast = outputs_with_spare_byte(taps, out_w, in_w);
    const __m128i half = _mm_set1_epi32(HALF);
    int y = 0;
    for (; y + 1 < rows; y += 2) {  /* two rows share each tap's weight */
        const uint8_t *row0 = src + y * stride, *row1 = row0 + stride;
        uint8_t *out0 = dst + (size_t)y * out_w * 3, *out1 = out0 + (size_t)out_w * 3;
        for (int i = 0; i < fast; i++) {
            const int32_t *k = taps->weights + (size_t)i * taps->ksize;
            size_t at = (size_t)taps->first[i] * 3;
            const uint8_t *p0 = row0 + at, *p1 = row1 + at;
            __m128i sum0 = half, sum1 = half;
            for (int t = 0; t < taps->count[i]; t++) {
                int32_t a, b;
                memcpy(&a, p0 + 3 * t, 4);
                memcpy(&b, p1 + 3 * t, 4);
                __m128i w = _mm_set1_epi32(k[t]);
                sum0 = _mm_add_epi32(sum0, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(a)), w));
                sum1 = _mm_add_epi32(sum1, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(b)), w));
            }
            size_t o = place(i, out_w, flip);
            sse41_store(sum0, out0 + o);
            sse41_store(sum1, out1 + o);
        }
        for (int i = fast; i < out_w; i++) {
            horizontal_pixel(row0, taps, i, out0 + place(i, out_w, flip));
            horizontal_pixel(row1, taps, i, out1 + place(i, out_w, flip));
        }
    }
    for (; y < rows; y++) {
        const uint8_t *row = src + y * stride;
        uint8_t *out = dst + (size_t)y * out_w * 3;
        for (int i = 0; i < fast; i++) {
            const int32_t *k = taps->weights + (size_t)i * taps->ksize;
            const uint8_t *p = row + (size_t)taps->first[i] * 3;
            __m128i sum = half;
            for (int t = 0; t < taps->count[i]; t++) {
                int32_t a;
                memcpy(&a, p + 3 * t, 4);
                sum = _mm_add_epi32(sum, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(a)), _mm_set1_epi32(k[t])));
            }
            sse41_store(sum, out + place(i, out_w, flip));
        }
        for (int i = fast; i < out_w; i++) horizontal_pixel(row, taps, i, out + place(i, out_w, flip));
    }
}
#endif

/* The calling convention's version: resample.py refuses a built file whose version differs (an
   editable install does not rebuild it when the source changes). Raise it with any change to an
   exported function's arguments or meaning. */
HDML_EXPORT int hdml_resample_abi_version(void) { return 1; }

/* 1: the SSE4.1 horizontal kernel where the CPU has it; 0: scalar only (tests switch it to
   check one against the other). */
static int widest_kernel = 1;

HDML_EXPORT int hdml_resample_limit_kernel(int widest) {
    int previous = widest_kernel;
    widest_kernel = widest;
    return previous;
}

static void horizontal(const uint8_t *src, ptrdiff_t stride, int rows, int in_w, uint8_t *dst, int out_w,
                       const Taps *taps, int flip) {
#ifdef HDML_X86_SIMD
    if (widest_kernel >= 1 && __builtin_cpu_supports("sse4.1")) {
        horizontal_sse41(src, stride, rows, in_w, dst, out_w, taps, flip);
        return;
    }
#endif
    horizontal_scalar(src, stride, rows, dst, out_w, taps, flip);
}

/* Vertical pass: each output row is a weighted sum of whole input rows, so the loop over the
   row's bytes is contiguous and the compiler vectorises it (an AVX2 clone where supported). */
#if defined(HDML_X86_SIMD) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
__attribute__((target_clones("avx2", "default")))
#endif
#endif
static void vertical(const uint8_t *src, ptrdiff_t stride, int row_bytes, uint8_t *dst, int out_h,
                     const Taps *taps, int32_t *sums) {
    for (int i = 0; i < out_h; i++) {
        const int32_t *k = taps->weights + (size_t)i * taps->ksize;
        for (int x = 0; x < row_bytes; x++) sums[x] = HALF;
        for (int t = 0; t < taps->count[i]; t++) {
            const uint8_t *row = src + (ptrdiff_t)(taps->first[i] + t) * stride;
            int32_t w = k[t];
            for (int x = 0; x < row_bytes; x++) sums[x] += row[x] * w;
        }
        uint8_t *out = dst + (size_t)i * row_bytes;
        for (int x = 0; x < row_bytes; x++) out[x] = clip8(sums[x]);
    }
}

/*
 * src: in_h × in_w RGB pixels, rows `stride` bytes apart; dst: out_h × out_w × 3, contiguous.
 * box = (left, top, right, bottom) in src pixels, 0 <= left < right <= in_w (same for y).
 * flip: mirror the output left to right, at no cost (the horizontal pass writes each pixel to
 * its mirrored place; where no horizontal resampling is needed, its identity taps run).
 * Returns 0, or -1 when out of memory (dst is then undefined).
 */
HDML_EXPORT int hdml_resize_bilinear_rgb(const uint8_t *src, int in_h, int in_w, ptrdiff_t stride, uint8_t *dst,
                                         int out_h, int out_w, float left, float top, float right,
                                         float bottom, int flip) {
    int horizontal_needed = out_w != in_w || left != 0.0f || right != (float)out_w || flip;
    int vertical_needed = out_h != in_h || top != 0.0f || bottom != (float)out_h;
    Taps rows = {0}, cols = {0};
    uint8_t *between = NULL;
    int32_t *sums = NULL;
    int status = -1;
    if (bilinear_taps(in_h, top, bottom, out_h, &rows) != 0) return -1;
    const uint8_t *v_src = src;
    ptrdiff_t v_stride = stride;
    if (horizontal_needed) {
        int first = rows.first[0];
        int last = rows.first[out_h - 1] + rows.count[out_h - 1];
        if (bilinear_taps(in_w, left, right, out_w, &cols) != 0) goto done;
        uint8_t *h_dst = vertical_needed ? (between = malloc((size_t)(last - first) * out_w * 3)) : dst;
        if (!h_dst) goto done;
        horizontal(src + (ptrdiff_t)first * stride, stride, vertical_needed ? last - first : out_h, in_w, h_dst,
                   out_w, &cols, flip);
        for (int i = 0; i < out_h; i++) rows.first[i] -= first;
        v_src = between;
        v_stride = (ptrdiff_t)out_w * 3;
    }
    if (vertical_needed) {
        if (!(sums = malloc(sizeof(int32_t) * (size_t)out_w * 3))) goto done;
        vertical(v_src, v_stride, out_w * 3, dst, out_h, &rows, sums);
    } else if (!horizontal_needed) {
        for (int y = 0; y < out_h; y++) memcpy(dst + (size_t)y * out_w * 3, src + y * stride, (size_t)out_w * 3);
    }
    status = 0;
done:
    free_taps(&rows);
    free_taps(&cols);
    free(between);
    free(sums);
    return status;
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_resample",
    .m_doc = "Native bilinear resampling (hdml_resize_bilinear_rgb, called through ctypes).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__resample(void) { return PyModule_Create(&module); }
