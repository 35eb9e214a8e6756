/* qz.c — the QZ chunk codec (docs/lzw-format.md, version 1) in freestanding C.
 *
 * One source, two builds (tools/build_wasm.py):
 *   wasm32:  zig cc --target=wasm32-freestanding -O3 -msimd128 -mbulk-memory -nostdlib  ->  static/wasm/qz.wasm
 *   native:  gcc -O3 -shared -fPIC (benchmark) / clang -fsanitize=fuzzer,address (tools/fuzz_qz.c)
 * No libc and no headers: the wasm-specific parts (heap, memory.grow) sit under #ifdef __wasm__; the native build
 * takes scratch memory from malloc instead.
 *
 * ---------------------------------------------------------------------------------------------------------------
 * Exported ABI (all integers are i32/u32; pointers are offsets into the exported `memory`)
 * ---------------------------------------------------------------------------------------------------------------
 *   u8 *qz_alloc(u32 n)          Bump-allocate n bytes (16-aligned), growing memory as needed. 0 if memory.grow
 *                                fails. Growing detaches JS ArrayBuffers: re-read memory.buffer after a call.
 *   void qz_reset_heap(void)     Forget every allocation (the usual pattern: reset, alloc in, alloc out, call).
 *   i32 qz_decoded_size(const u8 *in, u32 in_len)
 *                                Validates the header; returns the output byte count (layout bytes for
 *                                n_symbols), or -error code.
 *   i32 qz_decode(const u8 *in, u32 in_len, u8 *out, u32 out_cap)
 *                                Decodes one chunk; returns the bytes written (>= 0) or -error code.
 *                                On error the contents of out are unspecified.
 *   u32 qz_encode_bound(u32 n, u32 layout, u32 flags)
 *                                An out_cap that is always enough for qz_encode with these arguments.
 *   i32 qz_encode(const u8 *sym, u32 n, u32 alphabet, u32 layout, u32 bias, u32 max_code_bits, u32 flags,
 *                 u8 *out, u32 out_cap)
 *                                Encodes n symbols (one per byte) into one chunk (header + payload); returns the
 *                                chunk length or -error code (BAD_HEADER bad parameters, BAD_SYMBOL a symbol
 *                                >= alphabet, OUT_TOO_SMALL out_cap too small).
 *                                flags: bit 0 (QZ_ENC_RESET) = reset-when-full; QZ_ENC_FORCE_LZW (0x100) or
 *                                QZ_ENC_FORCE_PACKED (0x200) force a method, neither = LZW unless its payload is
 *                                larger than the packed one (the same choice as converter/lzw.py).
 *
 * Error codes are those of the spec (1 BAD_HEADER .. 7 BAD_SYMBOL), plus QZ_NO_MEMORY (64): a decode could not get
 * its scratch memory. That one is about this machine, not the chunk; callers raise an out-of-memory error.
 * Outputs larger than 2^31 - 1 bytes cannot be reported in an i32 and are refused with OUT_TOO_SMALL.
 * The codec keeps its dictionary in static memory: it is not reentrant (wasm instances are single-threaded).
 */

/* ============================================================================================================= */
/* Types and small helpers                                                                                       */
/* ============================================================================================================= */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef __SIZE_TYPE__ usize;

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "qz.c assumes a little-endian target (wasm32, x86-64, arm64)"
#endif

#define QZ_API __attribute__((visibility("default")))
#define QZ_INLINE static inline __attribute__((always_inline))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

enum {
    QZ_OK = 0,
    QZ_BAD_HEADER = 1,
    QZ_TRUNCATED = 2,
    QZ_BAD_CODE = 3,
    QZ_OVERRUN = 4,
    QZ_TRAILING = 5,
    QZ_OUT_TOO_SMALL = 6,
    QZ_BAD_SYMBOL = 7,
    QZ_NO_MEMORY = 64,
};

enum { METHOD_PACKED = 0, METHOD_LZW = 1 };
enum { LAYOUT_U8 = 0, LAYOUT_U4 = 1, LAYOUT_U2 = 2 };
enum { HEADER_SIZE = 16, MIN_CODE_BITS = 9, MAX_CODE_BITS = 16, MAX_CODES = 1 << MAX_CODE_BITS };
enum { QZ_ENC_RESET = 0x1, QZ_ENC_FORCE_LZW = 0x100, QZ_ENC_FORCE_PACKED = 0x200 };

/* Slack after the scratch symbols: the match copier moves 16 bytes at a time and may write up to 15 bytes past
 * the end of a string (later strings overwrite them). */
enum { COPY_SLACK = 16 };

QZ_INLINE u64 load64(const u8 *p) { u64 v; __builtin_memcpy(&v, p, 8); return v; }
QZ_INLINE void store32(u8 *p, u32 v) { __builtin_memcpy(p, &v, 4); }
QZ_INLINE void store16(u8 *p, u16 v) { __builtin_memcpy(p, &v, 2); }
/* 16-byte vectors (GCC >= 12 and clang vector extensions; v128 on wasm, SSE natively). */
typedef u8 v16u8 __attribute__((vector_size(16)));
typedef u16 v8u16 __attribute__((vector_size(16)));
typedef u32 v4u32 __attribute__((vector_size(16)));
QZ_INLINE v16u8 loadv(const u8 *p) { v16u8 v; __builtin_memcpy(&v, p, 16); return v; }
QZ_INLINE void storev(u8 *p, v16u8 v) { __builtin_memcpy(p, &v, 16); }
/* One 16-byte load, then one store: the ranges may overlap (memcpy(dst, src, 16) would be undefined then). */
QZ_INLINE void copy16(u8 *dst, const u8 *src) { storev(dst, loadv(src)); }
QZ_INLINE u32 bit_length(u32 x) { return x ? 32u - (u32)__builtin_clz(x) : 0u; }

/* ============================================================================================================= */
/* Memory: a bump heap on wasm (grown with memory.grow), malloc natively                                         */
/* ============================================================================================================= */

#ifdef __wasm__

/* With -nostdlib nobody provides these; the compiler may still call them. -mbulk-memory turns the builtins into
 * memory.copy / memory.fill, so these do not recurse. */
void *memcpy(void *dst, const void *src, usize n) { return __builtin_memcpy(dst, src, n); }
void *memmove(void *dst, const void *src, usize n) { return __builtin_memmove(dst, src, n); }
void *memset(void *dst, int c, usize n) { return __builtin_memset(dst, c, n); }

extern u8 __heap_base;  /* provided by wasm-ld: first byte after the stack and static data */
static usize heap_top;  /* next free byte; 0 until first use */

static usize heap_start(void) { return ((usize)&__heap_base + 15u) & ~(usize)15u; }

QZ_API void qz_reset_heap(void) { heap_top = heap_start(); }

QZ_API u8 *qz_alloc(u32 n) {
    if (heap_top == 0) heap_top = heap_start();
    usize start = heap_top;
    usize room = (usize)0 - start;  /* bytes left below the 4 GiB top of the address space */
    if ((usize)n + 15u >= room) return 0;
    usize end = (start + n + 15u) & ~(usize)15u;
    usize have = __builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        usize pages = (end - have + 65535u) / 65536u;
        if (__builtin_wasm_memory_grow(0, pages) == (usize)-1) return 0;
    }
    heap_top = end;
    return (u8 *)start;
}

/* Decode scratch is taken from the top of the heap and given back before qz_decode returns. */
static u8 *scratch_get(u32 n) { return qz_alloc(n); }
static void scratch_put(u8 *p) { heap_top = (usize)p; }

#else  /* native */

void *malloc(usize n);
void free(void *p);
static u8 *scratch_get(u32 n) { return (u8 *)malloc(n ? n : 1); }
static void scratch_put(u8 *p) { free(p); }

#endif

/* ============================================================================================================= */
/* Header                                                                                                        */
/* ============================================================================================================= */

typedef struct {
    u32 method;         /* METHOD_PACKED / METHOD_LZW */
    u32 alphabet;       /* A, 2..256 */
    u32 layout;         /* LAYOUT_U8 / U4 / U2 */
    u32 bias;           /* layout u8 only: output byte = (symbol - bias) mod 256 */
    u32 max_code_bits;  /* LZW: 9..16; packed: 0 */
    u32 flags;          /* LZW: bit 0 = reset-when-full; packed: 0 */
    u32 n_symbols;
    u64 out_bytes;      /* derived: layout bytes for n_symbols */
} qz_header;

static u32 symbols_per_byte(u32 layout) { return layout == LAYOUT_U8 ? 1u : layout == LAYOUT_U4 ? 2u : 4u; }
static u32 max_alphabet(u32 layout) { return layout == LAYOUT_U8 ? 256u : layout == LAYOUT_U4 ? 16u : 4u; }

static u64 layout_nbytes(u32 layout, u32 n) {
    u64 per = symbols_per_byte(layout);
    return ((u64)n + per - 1u) / per;
}

/* The rules of the spec's header table, shared by decoder and encoder. */
static int header_ok(const qz_header *h) {
    if (h->method != METHOD_PACKED && h->method != METHOD_LZW) return 0;
    if (h->layout > LAYOUT_U2) return 0;
    if (h->alphabet < 2 || h->alphabet > max_alphabet(h->layout)) return 0;
    if (h->bias > 255 || (h->layout != LAYOUT_U8 && h->bias != 0)) return 0;
    if (h->method == METHOD_PACKED) return h->max_code_bits == 0 && h->flags == 0;
    if (h->max_code_bits < MIN_CODE_BITS || h->max_code_bits > MAX_CODE_BITS) return 0;
    if ((1u << h->max_code_bits) <= h->alphabet + 1u) return 0;
    return (h->flags & ~1u) == 0;
}

static int parse_header(const u8 *in, u32 in_len, qz_header *h) {
    if (in_len < HEADER_SIZE) return 0;
    if (in[0] != 'Q' || in[1] != 'Z' || in[2] != 1 || in[10] != 0 || in[11] != 0) return 0;
    h->method = in[3];
    h->alphabet = (u32)in[4] | (u32)in[5] << 8;
    h->layout = in[6];
    h->bias = in[7];
    h->max_code_bits = in[8];
    h->flags = in[9];
    h->n_symbols = (u32)in[12] | (u32)in[13] << 8 | (u32)in[14] << 16 | (u32)in[15] << 24;
    h->out_bytes = layout_nbytes(h->layout, h->n_symbols);
    return header_ok(h);
}

static void write_header(u8 *out, const qz_header *h) {
    out[0] = 'Q'; out[1] = 'Z'; out[2] = 1; out[3] = (u8)h->method;
    out[4] = (u8)h->alphabet; out[5] = (u8)(h->alphabet >> 8);
    out[6] = (u8)h->layout; out[7] = (u8)h->bias; out[8] = (u8)h->max_code_bits; out[9] = (u8)h->flags;
    out[10] = 0; out[11] = 0;
    for (int i = 0; i < 4; i++) out[12 + i] = (u8)(h->n_symbols >> (8 * i));
}

/* ============================================================================================================= */
/* Layouts: symbols (one per byte) -> u4 nibbles / u2 crumbs                                                     */
/* ============================================================================================================= */

/* 8 symbols (each < 16) in a u64, byte i = s_i  ->  4 bytes s0|s1<<4, s2|s3<<4, ... (SWAR, for the tail). */
QZ_INLINE u32 pack8_u4(u64 x) {
    x = (x | (x >> 4)) & 0x00FF00FF00FF00FFull;
    x = (x | (x >> 8)) & 0x0000FFFF0000FFFFull;
    return (u32)(x | (x >> 16));
}

/* 8 symbols (each < 4)  ->  2 bytes s0|s1<<2|s2<<4|s3<<6, ... */
QZ_INLINE u16 pack8_u2(u64 x) {
    x = (x | (x >> 6)) & 0x000F000F000F000Full;
    x = (x | (x >> 12)) & 0x000000FF000000FFull;
    return (u16)(x | (x >> 24));
}


/* 32 symbols (< 16) -> 16 bytes. In each u16 lane s0 | s1 << 8, lane | lane >> 4 has s0 | s1 << 4 in its
 * low byte; keep the low bytes. */
QZ_INLINE v16u8 pack32_u4(v16u8 lo, v16u8 hi) {
    v8u16 a = (v8u16)lo, b = (v8u16)hi;
    a |= a >> 4;
    b |= b >> 4;
    return __builtin_shufflevector((v16u8)a, (v16u8)b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}

/* 16 symbols (< 4) -> the packed byte of symbols 4j..4j+3 in byte 4j of the result (other bytes junk):
 * u16 lanes get s0 | s1 << 2 in their low nibble, then u32 lanes get both pairs in their low byte. */
QZ_INLINE v16u8 crumbs16(v16u8 x) {
    v8u16 a = (v8u16)x;
    a |= a >> 6;
    v4u32 b = (v4u32)a;
    b |= b >> 12;
    return (v16u8)b;
}

/* 64 symbols (< 4) -> 16 bytes. */
QZ_INLINE v16u8 pack64_u2(const u8 *sym) {
    v16u8 c0 = crumbs16(loadv(sym)), c1 = crumbs16(loadv(sym + 16));
    v16u8 c2 = crumbs16(loadv(sym + 32)), c3 = crumbs16(loadv(sym + 48));
    v16u8 lo = __builtin_shufflevector(c0, c1, 0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    v16u8 hi = __builtin_shufflevector(c2, c3, 0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
}

static void pack_symbols(const u8 *sym, u32 n, u32 layout, u8 *out) {
    u32 i = 0;
    if (layout == LAYOUT_U4) {
        for (; i + 32 <= n; i += 32) storev(out + i / 2, pack32_u4(loadv(sym + i), loadv(sym + i + 16)));
        for (; i + 8 <= n; i += 8) store32(out + i / 2, pack8_u4(load64(sym + i)));
        for (; i < n; i += 2) out[i / 2] = (u8)(sym[i] | (i + 1 < n ? sym[i + 1] << 4 : 0));
    } else {
        for (; i + 64 <= n; i += 64) storev(out + i / 4, pack64_u2(sym + i));
        for (; i + 8 <= n; i += 8) store16(out + i / 4, pack8_u2(load64(sym + i)));
        for (; i < n; i += 4) {
            u32 b = 0;
            for (u32 j = 0; j < 4 && i + j < n; j++) b |= (u32)sym[i + j] << (2 * j);
            out[i / 4] = (u8)b;
        }
    }
}

/* ============================================================================================================= */
/* Method 0: packed                                                                                              */
/* ============================================================================================================= */

/* Checks in the reference's order: payload length, zero padding bits, every symbol < A. */
static i32 decode_packed(const qz_header *h, const u8 *p, u32 plen, u8 *out) {
    u32 nbytes = (u32)h->out_bytes;
    if (plen != nbytes) return -QZ_TRAILING;
    u32 per = symbols_per_byte(h->layout);
    u32 used = h->n_symbols % per;  /* symbols in a partial last byte */
    if (used && (p[nbytes - 1] >> (used * (8 / per))) != 0) return -QZ_TRAILING;
    u32 a = h->alphabet;
    u32 bad = 0;
    if (h->layout == LAYOUT_U8) {
        if (a < 256) {
            u8 bias = (u8)h->bias;
            for (u32 i = 0; i < nbytes; i++) bad |= (u8)(p[i] + bias) >= a;
        }
    } else if (a < max_alphabet(h->layout)) {
        u32 bits = 8 / per, mask = (1u << bits) - 1u;
        for (u32 i = 0; i < h->n_symbols; i++) bad |= ((p[i / per] >> (bits * (i % per))) & mask) >= a;
    }
    if (bad) return -QZ_BAD_SYMBOL;
    __builtin_memcpy(out, p, nbytes);
    return (i32)nbytes;
}

/* ============================================================================================================= */
/* Method 1: LZW decoder                                                                                         */
/* ============================================================================================================= */

/* Every dictionary string is a substring of what was already decoded, so an entry is just (pointer, length) and a
 * code is decoded by one copy, never by walking a prefix chain. Codes 0..A-1 point into `alpha`, a 16-byte-padded
 * table of the single symbols in output form, so every code takes the same path. ent[A] (CLEAR) has a length no
 * buffer can hold, which sends it to the careful path; ent[2^16] is a write-only sink for the entry "added" once
 * the dictionary is full (branchless). */
typedef struct { const u8 *src; u32 len; } qz_entry;
static qz_entry ent[MAX_CODES + 1];
static u8 alpha[256 + 16];
enum { CLEAR_LEN = 0x40000000 };

/* Copy `len` bytes from src to dst 16 at a time, writing up to 15 junk bytes past dst + len.
 * Valid when src + len <= dst (bytes read at or after dst are junk that only junk positions receive), or when
 * dst - src >= 16 (each load reads bytes already stored). */
QZ_INLINE void copy_wide(u8 *dst, const u8 *src, u32 len) {
    copy16(dst, src);
    for (u32 i = 16; i < len; i += 16) copy16(dst + i, src + i);
}

/* Decode n symbols into buf as bytes (symbol - bias) mod 256. limit = bytes of buf that may be written: n when
 * buf is the caller's output, n + COPY_SLACK for a scratch buffer. Returns QZ_OK or an error code.
 *
 * Two loops share one state. The careful loop is the spec, step by step, with every check. The fast loop runs
 * while at least 8 payload bytes remain and handles the common code (an existing entry, not CLEAR, that fits
 * with 16 bytes of room); anything else leaves it without consuming the code, and the careful loop takes over
 * for one code. */
static int lzw_decode(const qz_header *h, const u8 *payload, u32 plen, u8 *buf, u32 limit) {
    const u32 a = h->alphabet, n = h->n_symbols, mcb = h->max_code_bits;
    const u32 full = 1u << mcb;           /* next == full: no more entries */
    const u32 a_width = bit_length(a);    /* width of code k = 0 */
    const u8 bias = (u8)h->bias;

    for (u32 c = 0; c < a; c++) {
        alpha[c] = (u8)((u8)c - bias);
        ent[c].src = alpha + c;
        ent[c].len = 1;
    }
    ent[a].src = alpha;
    ent[a].len = CLEAR_LEN;

    /* Bit reader: bitbuf holds bitcnt valid bits (LSB = next bit); p is the next byte to load. Bits above bitcnt
     * are either 0 or the true next bits, so reloading overlapping bytes is harmless. */
    const u8 *p = payload, *end = payload + plen;
    u64 bitbuf = 0;
    u32 bitcnt = 0;

    u32 width = a_width, mask = (1u << width) - 1u;
    u32 top = a;        /* A + k, the largest code that can be valid now (only tracked while width < mcb) */
    int fresh = 1;      /* k == 0: the next code must be a single symbol */
    u32 next = a + 1;   /* next entry code */
    u32 pos = 0;        /* symbols written */
    const u8 *prev = buf;  /* the previous code's string, always inside buf */
    u32 prev_len = 0;

    while (pos < n) {
        /* ---- fast loop ---- */
        if (!fresh) {
            while (end - p >= 8) {
                bitbuf |= load64(p) << bitcnt;  /* branchless refill to 56..63 bits */
                p += (63u - bitcnt) >> 3;
                bitcnt |= 56u;
                u32 code = (u32)bitbuf & mask;
                if (UNLIKELY(code >= next)) break;             /* KwKwK or a bad code */
                const u8 *src = ent[code].src;
                u32 len = ent[code].len;
                if (UNLIKELY(len + COPY_SLACK > limit - pos)) break;  /* CLEAR, overrun, or near the end */
                bitbuf >>= width;
                bitcnt -= width;
                if (width < mcb && ++top == (1u << width)) { width++; mask = (1u << width) - 1u; }
                ent[next].src = prev;  /* prev + S[0]; a sink write when full */
                ent[next].len = prev_len + 1;
                next += next < full;
                u8 *dst = buf + pos;
                copy_wide(dst, src, len);
                prev = dst; prev_len = len; pos += len;
                /* at pos == n the room check fails for any code: no separate test needed here */
            }
            if (pos == n) break;
        }

        /* ---- careful loop: one code ---- */
        if (bitcnt < width) {
            while (bitcnt <= 56u && p < end) { bitbuf |= (u64)*p++ << bitcnt; bitcnt += 8u; }
            if (bitcnt < width) return QZ_TRUNCATED;
        }
        u32 code = (u32)bitbuf & mask;
        bitbuf >>= width;
        bitcnt -= width;
        /* width of the following code: bit_length(min(A + k + 1, 2^mcb - 1)) */
        if (width < mcb && ++top == (1u << width)) { width++; mask = (1u << width) - 1u; }

        if (code < a) {  /* a single symbol: fits, since pos < n */
            if (!fresh && next < full) { ent[next].src = prev; ent[next].len = prev_len + 1; next++; }
            buf[pos] = alpha[code];
            prev = buf + pos; prev_len = 1; pos++;
            fresh = 0;
            continue;
        }
        if (fresh) return QZ_BAD_CODE;  /* CLEAR or a string right after a reset */
        if (code == a) {                /* CLEAR */
            next = a + 1; width = a_width; mask = (1u << width) - 1u; top = a; fresh = 1;
            continue;
        }
        const u8 *src;
        u32 len;
        int overlap = 0;
        if (code < next) {
            src = ent[code].src; len = ent[code].len;
        } else if (code == next && next < full) {  /* KwKwK: prev + prev[0], reaching one past prev's end */
            src = prev; len = prev_len + 1; overlap = 1;
        } else {
            return QZ_BAD_CODE;
        }
        if (len > n - pos) return QZ_OVERRUN;
        if (next < full) { ent[next].src = prev; ent[next].len = prev_len + 1; next++; }
        u8 *dst = buf + pos;
        if ((!overlap || dst - src >= 16) && len + COPY_SLACK <= limit - pos) {
            copy_wide(dst, src, len);
        } else {
            for (u32 i = 0; i < len; i++) dst[i] = src[i];  /* forward, byte by byte: right for overlaps */
        }
        prev = dst; prev_len = len; pos += len;
    }

    /* End of stream: the payload ends in the byte holding the last bit read; its unread bits are 0. */
    u64 bits = (u64)(p - payload) * 8u - bitcnt;
    u64 used = (bits + 7u) / 8u;
    if (used != plen) return QZ_TRAILING;
    if ((bits & 7u) && (payload[used - 1] >> (bits & 7u)) != 0) return QZ_TRAILING;
    return QZ_OK;
}

/* ============================================================================================================= */
/* Decode API                                                                                                    */
/* ============================================================================================================= */

QZ_API i32 qz_decoded_size(const u8 *in, u32 in_len) {
    qz_header h;
    if (!parse_header(in, in_len, &h)) return -QZ_BAD_HEADER;
    if (h.out_bytes > 0x7FFFFFFFu) return -QZ_OUT_TOO_SMALL;
    return (i32)h.out_bytes;
}

QZ_API i32 qz_decode(const u8 *in, u32 in_len, u8 *out, u32 out_cap) {
    qz_header h;
    if (!parse_header(in, in_len, &h)) return -QZ_BAD_HEADER;
    if (h.out_bytes > 0x7FFFFFFFu || h.out_bytes > out_cap) return -QZ_OUT_TOO_SMALL;
    const u8 *payload = in + HEADER_SIZE;
    u32 plen = in_len - HEADER_SIZE;
    if (h.method == METHOD_PACKED) return decode_packed(&h, payload, plen, out);

    int err;
    if (h.layout == LAYOUT_U8) {  /* output bytes are the (biased) symbols: decode in place */
        err = lzw_decode(&h, payload, plen, out, h.n_symbols);
    } else {
        if (h.n_symbols > 0xFFFFFFFFu - COPY_SLACK) return -QZ_NO_MEMORY;
        u8 *sym = scratch_get(h.n_symbols + COPY_SLACK);
        if (!sym) return -QZ_NO_MEMORY;
        err = lzw_decode(&h, payload, plen, sym, h.n_symbols + COPY_SLACK);
        if (err == QZ_OK) pack_symbols(sym, h.n_symbols, h.layout, out);
        scratch_put(sym);
    }
    return err ? -err : (i32)h.out_bytes;
}

/* ============================================================================================================= */
/* Method 1: LZW encoder                                                                                         */
/* ============================================================================================================= */

/* Dictionary (code of P, symbol c) -> code of P+c as an open-addressing hash table. A slot is
 * epoch << 40 | key << 16 | code, key = P << 8 | c (24 bits); slots of an older epoch are empty, so a reset
 * is one increment instead of clearing the table. At most 2^16 entries in 2^18 slots (load <= 1/4). */
enum { HASH_BITS = 18, HASH_SLOTS = 1 << HASH_BITS };
static u64 slots[HASH_SLOTS];
static u64 epoch;  /* 24 bits, never 0 while in use (a zeroed slot is empty) */

static void dict_reset(void) {
    if (++epoch >= (1u << 24)) {  /* wrapped: really clear (once per 16M resets) */
        for (u32 i = 0; i < HASH_SLOTS; i++) slots[i] = 0;
        epoch = 1;
    }
}

QZ_INLINE u32 dict_hash(u32 key) { return (key * 0x9E3779B1u) >> (32 - HASH_BITS); }

/* Returns the slot index holding key, or the empty slot where it belongs. */
QZ_INLINE u32 dict_find(u32 key, u64 want) {
    u32 i = dict_hash(key);
    for (;;) {
        u64 s = slots[i];
        if ((s >> 16) == want || (s >> 40) != epoch) return i;
        i = (i + 1u) & (HASH_SLOTS - 1u);
    }
}

typedef struct {
    u8 *out;      /* payload start */
    u32 cap;      /* payload bytes available */
    u32 stop_at;  /* give up once the payload would exceed this many bytes (auto mode: the packed size) */
    u32 len;      /* payload bytes written */
    u64 acc;      /* pending bits, oldest in bit 0 */
    u32 nbits;
    int over;     /* 1: stop_at was passed */
} bit_writer;

QZ_INLINE void put_code(bit_writer *w, u32 code, u32 width) {
    w->acc |= (u64)code << w->nbits;
    w->nbits += width;
    if (w->nbits >= 32) {
        if (w->len + 4 > w->stop_at) { w->over = 1; w->nbits = 0; w->acc = 0; return; }
        store32(w->out + w->len, (u32)w->acc);
        w->len += 4; w->acc >>= 32; w->nbits -= 32;
    }
}

static void finish_bits(bit_writer *w) {
    while (w->nbits > 0 && !w->over) {
        if (w->len + 1 > w->stop_at) { w->over = 1; break; }
        w->out[w->len++] = (u8)w->acc;
        w->acc >>= 8;
        w->nbits = w->nbits > 8 ? w->nbits - 8 : 0;
    }
}

/* Greedy longest match, exactly as converter/lzw.py:_lzw_encode. Returns the payload length, or -1 when it
 * would exceed w->stop_at. */
static i32 lzw_encode(const u8 *sym, u32 n, u32 a, u32 mcb, int reset, bit_writer *w) {
    const u32 full = 1u << mcb, clear = a, a_width = bit_length(a);
    u32 width = a_width, top = a;  /* width of code k = bit_length(min(A + k, 2^mcb - 1)), top = A + k */
    u32 next = a + 1;
    dict_reset();
    if (n == 0) return 0;
    u32 prefix = sym[0];
    for (u32 i = 1; i < n; i++) {
        u32 c = sym[i];
        u32 key = prefix << 8 | c;
        u64 want = (u64)epoch << 24 | key;
        u32 slot = dict_find(key, want);
        if ((slots[slot] >> 16) == want) { prefix = (u32)slots[slot] & 0xFFFFu; continue; }
        put_code(w, prefix, width);
        if (width < mcb && ++top == (1u << width)) width++;
        if (next < full) { slots[slot] = want << 16 | next; next++; }
        prefix = c;
        if (next == full && reset) {
            put_code(w, clear, width);
            dict_reset();
            next = a + 1; width = a_width; top = a;
        }
        if (UNLIKELY(w->over)) return -1;
    }
    put_code(w, prefix, width);
    finish_bits(w);
    return w->over ? -1 : (i32)w->len;
}

/* ============================================================================================================= */
/* Encode API                                                                                                    */
/* ============================================================================================================= */

QZ_API u32 qz_encode_bound(u32 n, u32 layout, u32 flags) {
    u64 packed = layout_nbytes(layout > LAYOUT_U2 ? LAYOUT_U8 : layout, n);
    /* forced LZW: at most one 16-bit code and one 16-bit CLEAR per symbol, +8 for the last flush */
    u64 bound = (flags & QZ_ENC_FORCE_LZW) ? (u64)n * 4u + 8u : packed;
    bound += HEADER_SIZE;
    return bound > 0xFFFFFFFFu ? 0xFFFFFFFFu : (u32)bound;
}

QZ_API i32 qz_encode(const u8 *sym, u32 n, u32 alphabet, u32 layout, u32 bias, u32 max_code_bits, u32 flags,
                     u8 *out, u32 out_cap) {
    if (flags & ~(u32)(QZ_ENC_RESET | QZ_ENC_FORCE_LZW | QZ_ENC_FORCE_PACKED)) return -QZ_BAD_HEADER;
    if ((flags & QZ_ENC_FORCE_LZW) && (flags & QZ_ENC_FORCE_PACKED)) return -QZ_BAD_HEADER;
    int try_lzw = !(flags & QZ_ENC_FORCE_PACKED), auto_method = !(flags & (QZ_ENC_FORCE_LZW | QZ_ENC_FORCE_PACKED));
    qz_header h;
    h.method = try_lzw ? METHOD_LZW : METHOD_PACKED;
    h.alphabet = alphabet; h.layout = layout; h.bias = bias;
    h.max_code_bits = try_lzw ? max_code_bits : 0;
    h.flags = try_lzw ? (flags & QZ_ENC_RESET) : 0;
    h.n_symbols = n;
    if (!header_ok(&h)) return -QZ_BAD_HEADER;
    h.out_bytes = layout_nbytes(layout, n);

    u8 any_bad = 0;
    for (u32 i = 0; i < n; i++) any_bad |= sym[i] >= alphabet;
    if (any_bad) return -QZ_BAD_SYMBOL;
    if (out_cap < HEADER_SIZE) return -QZ_OUT_TOO_SMALL;

    u32 cap = out_cap - HEADER_SIZE;
    u64 packed = h.out_bytes;
    if (try_lzw) {
        bit_writer w = {out + HEADER_SIZE, cap, cap, 0, 0, 0, 0};
        /* put_code flushes 4 bytes at a time: leave room so a flush never passes cap */
        w.stop_at = auto_method && packed + 3u < cap ? (u32)packed + 3u : cap;
        i32 len = lzw_encode(sym, n, alphabet, max_code_bits, flags & QZ_ENC_RESET, &w);
        if (len >= 0 && (!auto_method || (u64)len <= packed)) {
            write_header(out, &h);
            return HEADER_SIZE + len;
        }
        if (!auto_method) return -QZ_OUT_TOO_SMALL;
        /* auto: LZW would be larger than packed (or was cut off past packed + 3, so certainly larger) */
    }
    if (packed > cap) return -QZ_OUT_TOO_SMALL;
    h.method = METHOD_PACKED; h.max_code_bits = 0; h.flags = 0;
    write_header(out, &h);
    u8 *o = out + HEADER_SIZE;
    if (layout == LAYOUT_U8) {
        for (u32 i = 0; i < n; i++) o[i] = (u8)(sym[i] - (u8)bias);
    } else {
        pack_symbols(sym, n, layout, o);
    }
    return HEADER_SIZE + (i32)packed;
}
