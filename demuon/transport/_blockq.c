/* Stochastic block quantization in one pass per block (see demuon/transport/kernels.py,
 * _stochastic_grid and _stochastic_sign, for the rules; demuon/transport/native.py builds and
 * loads this file).
 *
 * The same arithmetic as the torch path, entry by entry: y = x / divisor (float32), the draws of
 * NumPy's SFC64 stream read as little-endian int16 lanes, u = k + 2^15 + 1/2 + 2^16 (L + 1)
 * (exact), and the code plus L + 1 is the truncation of y + u * 2^-16 (a product by a power of two
 * is exact, so there is one rounding, as in torch's add with alpha). The codes are therefore the
 * torch path's bit for bit; the per-block sums are taken in double here, so a scale can differ from
 * the torch path's in its last bits. Compile without fast-math or FP contraction. */
#include <math.h>
#include <stdint.h>

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* NumPy's SFC64 (numpy/random/src/sfc64): state a, b, c, counter. */
static inline uint64_t sfc64_next(uint64_t *s) {
    const uint64_t tmp = s[0] + s[1] + s[3]++;
    s[0] = s[1] ^ (s[1] >> 11);
    s[1] = s[2] + (s[2] << 3);
    s[2] = rotl(s[2], 24) + tmp;
    return tmp;
}

void demuon_sfc64_fill(uint64_t *state, uint64_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = sfc64_next(state);
}

/* GCC / Clang vector extensions: eight lanes (two SSE2 or NEON registers without any -m flag, one
 * AVX2 register in the AVX2 clone), the same IEEE operations lane by lane as scalar code. */
#define W 8 /* lanes of vf, vi, vh, vb */
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef int16_t vh __attribute__((vector_size(2 * W)));
typedef int8_t vb __attribute__((vector_size(W)));

/* On x86-64 an AVX2 clone is picked at load time where the CPU has it (GCC's ifunc dispatch). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define MAX_BLOCK 65536

/* Macros, not functions: a vector passed by value would change the ABI between the clones. */
#define LOAD(v, p) __builtin_memcpy(&(v), (p), sizeof(v))
#define FABS(v) ((vf)((vi)(v) & 0x7fffffff))

typedef int16_t v8s __attribute__((vector_size(16)));
typedef int32_t v4s __attribute__((vector_size(16)));
typedef uint8_t v8u __attribute__((vector_size(8)));
typedef uint8_t v4u __attribute__((vector_size(4)));

/* Codes plus L + 1 (1 ... 2L + 1) packed as kernels.pack_codes packs the codes: code i in bits
 * [bits (i % k), bits (i % k + 1)) of byte i / k, k = 8 / bits, two's complement. Adding L + 1 =
 * 2^(bits - 1) modulo 2^bits flips the top bit, so XOR with it gives the code's low bits. Reading
 * k code bytes as one little-endian integer, shifts fold the fields together. */
static inline void pack(const int8_t *codes, int64_t len, int bits, uint8_t *out) {
    int64_t i = 0;
    if (bits == 4) {
        for (; i + 16 <= len; i += 16) {
            v8s l;
            LOAD(l, codes + i);
            l ^= 0x0808;
            const v8u p = __builtin_convertvector((l & 0x0F) | ((l >> 4) & 0xF0), v8u);
            __builtin_memcpy(out + i / 2, &p, sizeof p);
        }
    } else {
        for (; i + 16 <= len; i += 16) {
            v4s l;
            LOAD(l, codes + i);
            l ^= 0x02020202;
            const v4s f = (l & 0x03) | ((l >> 6) & 0x0C) | ((l >> 12) & 0x30) | ((l >> 18) & 0xC0);
            const v4u p = __builtin_convertvector(f, v4u);
            __builtin_memcpy(out + i / 4, &p, sizeof p);
        }
    }
    const int k = 8 / bits, half = 1 << (bits - 1), mask = (1 << bits) - 1;
    for (; i < len; i += k) { /* the last 8 codes of a block of 8 mod 16 */
        unsigned v = 0;
        for (int m = 0; m < k; m++) v |= (unsigned)((codes[i + m] ^ half) & mask) << (bits * m);
        out[i / k] = (uint8_t)v;
    }
}

/* x: n float32 (n a multiple of 8, zero-padded), blocks of `block` entries (a multiple of 8, at
 * most MAX_BLOCK; the last one holds the rest), levels 7 (4 bits) or 1 (2 bits); packed: n bits / 8
 * bytes (the packed codes); scales: one float32 per block. Returns 0, or < 0 for arguments it does
 * not take. */
CLONES int demuon_stochastic_grid(const float *x, int64_t n, int64_t block, int32_t levels, uint64_t *state,
                                  uint8_t *packed, float *scales) {
    static _Thread_local int16_t draws[MAX_BLOCK];
    static _Thread_local int8_t codes[MAX_BLOCK];
    const int bits = (levels == 7) ? 4 : (levels == 1) ? 2 : 0;
    if (!bits) return -2;
    if (block <= 0 || block > MAX_BLOCK || block % 8 || n % 8) return -1;
    const float offset = 32768.5f + 65536.0f * (float)(levels + 1);
    int64_t index = 0;
    for (int64_t start = 0; start < n; start += block, index++) {
        const int64_t len = (n - start < block) ? n - start : block;
        const float *b = x + start;
        int8_t *out = codes;
        vf top = {0};
        vi nan = {0};
        for (int64_t i = 0; i < len; i += W) {
            vf a;
            LOAD(a, b + i);
            a = FABS(a);
            nan |= (a != a);
            const vi more = (a > top);
            top = (vf)((more & (vi)a) | (~more & (vi)top));
        }
        float peak = 0.0f;
        int any_nan = 0;
        for (int l = 0; l < W; l++) {
            peak = (top[l] > peak) ? top[l] : peak;
            any_nan |= nan[l];
        }
        for (int64_t j = 0; j < len / 4; j++) { /* the stream's 16-bit lanes, little-endian */
            const uint64_t w = sfc64_next(state);
            __builtin_memcpy(draws + 4 * j, &w, sizeof w);
        }
        const float step = any_nan ? NAN : peak / (float)levels;
        const float divisor = (step == 0.0f) ? 1.0f : step;
        const vf d = divisor - (vf){0}; /* broadcast */
        vf energy = {0}, total = {0}, squares = {0};
        for (int64_t i = 0; i < len; i += W) {
            vf xi;
            LOAD(xi, b + i);
            const vf y = xi / d;
            const vf f = FABS(y - __builtin_convertvector(__builtin_convertvector(y, vi), vf));
            energy += y * y;
            total += f;
            squares += f * f;
            vh k;
            LOAD(k, draws + i);
            const vf u = __builtin_convertvector(__builtin_convertvector(k, vi), vf) + offset;
            const vi c = __builtin_convertvector(y + u * 0x1p-16f, vi); /* truncation = floor: > 0 */
            const vb code = __builtin_convertvector(c, vb);
            __builtin_memcpy(out + i, &code, sizeof code);
        }
        double e = 0.0, var = 0.0;
        for (int l = 0; l < W; l++) {
            e += energy[l];
            var += (double)total[l] - (double)squares[l];
        }
        scales[index] = (e > 0.0) ? (float)((double)step * e / (e + var)) : step;
        pack(codes, len, bits, packed + start / 8 * bits);
    }
    return 0;
}

/* The stochastic scaled sign (kernels._stochastic_sign): entry i is negative (code 1) when
 * k + 1/2 < x_i * slope, slope = fl(1/s) * -2^15, s = max|block| (1 for a zero block), k the
 * signed 16-bit draw; the scale is ||block||^2 / (count s) (count: the block's real entries, d in
 * all), 0 for a zero block, NaN for a block holding one. */
CLONES int demuon_stochastic_sign(const float *x, int64_t n, int64_t d, int64_t block, uint64_t *state,
                                  uint8_t *codes, float *scales) {
    static _Thread_local int16_t draws[MAX_BLOCK];
    if (block <= 0 || block > MAX_BLOCK || block % 8 || n % 8) return -1;
    int64_t index = 0;
    for (int64_t start = 0; start < n; start += block, index++) {
        const int64_t len = (n - start < block) ? n - start : block;
        const int64_t count = (d - start < block) ? d - start : block;
        const float *b = x + start;
        uint8_t *out = codes + start;
        vf top = {0}, energy = {0};
        vi nan = {0};
        for (int64_t i = 0; i < len; i += W) {
            vf v;
            LOAD(v, b + i);
            energy += v * v;
            const vf a = FABS(v);
            nan |= (a != a);
            const vi more = (a > top);
            top = (vf)((more & (vi)a) | (~more & (vi)top));
        }
        float peak = 0.0f;
        int any_nan = 0;
        double e = 0.0;
        for (int l = 0; l < W; l++) {
            peak = (top[l] > peak) ? top[l] : peak;
            any_nan |= nan[l];
            e += energy[l];
        }
        if (any_nan) peak = NAN;
        for (int64_t j = 0; j < len / 4; j++) {
            const uint64_t w = sfc64_next(state);
            __builtin_memcpy(draws + 4 * j, &w, sizeof w);
        }
        const float safe = (peak > 0.0f) ? peak : 1.0f;
        const float slope = (1.0f / safe) * -32768.0f;
        const vf sl = slope - (vf){0};
        for (int64_t i = 0; i < len; i += W) {
            vf v;
            LOAD(v, b + i);
            vh k;
            LOAD(k, draws + i);
            const vf u = __builtin_convertvector(__builtin_convertvector(k, vi), vf) + 0.5f;
            const vi neg = (u < v * sl); /* -1 where true */
            const vb code = __builtin_convertvector(-neg, vb);
            __builtin_memcpy(out + i, &code, sizeof code);
        }
        scales[index] = (peak > 0.0f) ? (float)(e / ((double)count * (double)safe)) : peak;
    }
    return 0;
}
