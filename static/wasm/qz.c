/* qz.c — the QZ chunk codec (docs/lzw-format.md, versions 1 and 2) in freestanding C.
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
 *                                Validates the header (and a primed chunk's model block); returns the output byte
 *                                count (layout bytes for n_symbols), or -error code.
 *   i32 qz_decode(const u8 *in, u32 in_len, u8 *out, u32 out_cap)
 *                                Decodes one chunk (version 1 or 2); returns the bytes written (>= 0) or -error
 *                                code. On error the contents of out are unspecified.
 *   u32 qz_encode_bound(u32 n, u32 layout, u32 flags)
 *                                An out_cap that is always enough for qz_encode with these arguments.
 *   i32 qz_encode(const u8 *sym, u32 n, u32 alphabet, u32 layout, u32 bias, u32 max_code_bits, u32 flags,
 *                 u8 *out, u32 out_cap)
 *                                Encodes n symbols (one per byte) into one chunk; returns the chunk length or
 *                                -error code (BAD_HEADER bad parameters, BAD_SYMBOL a symbol >= alphabet,
 *                                OUT_TOO_SMALL out_cap too small). flags:
 *                                  QZ_ENC_RESET (0x1)          adaptive LZW: reset-when-full
 *                                  QZ_ENC_FORCE_LZW (0x100)    dictionary codes even if larger than packed
 *                                  QZ_ENC_FORCE_PACKED (0x200) packed
 *                                  QZ_ENC_V2 (0x400)           write version 2 (else version 1: adaptive only)
 *                                  QZ_ENC_ADAPTIVE (0x800)     version 2: only the adaptive LZW dictionary
 *                                  QZ_ENC_PRIMED (0x1000)      version 2: only the primed dictionary
 *                                  QZ_ENC_V3 (0x2000)          with QZ_ENC_V2: the primed dictionary may use an
 *                                                              escape class (such a chunk says version 3)
 *                                Version 2 without either: the smaller of the two (primed on a tie). Neither FORCE
 *                                flag: dictionary codes unless that chunk is larger than the packed one — the same
 *                                choices, byte for byte, as converter/lzw.py.
 *
 * Error codes are those of the spec (1 BAD_HEADER .. 7 BAD_SYMBOL), plus QZ_NO_MEMORY (64): a decode could not get
 * its scratch memory. That one is about this machine, not the chunk; callers raise an out-of-memory error.
 * Outputs larger than 2^31 - 1 bytes cannot be reported in an i32 and are refused with OUT_TOO_SMALL.
 * The codec keeps its dictionaries in static memory: it is not reentrant (wasm instances are single-threaded).
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
/* Hot loops kept in functions of their own: wasmtime (Cranelift) compiles them better than when inlined into their
 * caller (measured: the primed decode 0-18% faster). */
#define QZ_HOT_LOOP static __attribute__((noinline))
/* A loop that must stay a loop: clang -O3 unrolls the rare long-phrase copy inside every inlined copy_phrase, and
 * the bigger hot loops run 6-20 % slower in V8 (measured in Node and Chromium; native code does not care). */
#if defined(__clang__)
#define QZ_NO_UNROLL _Pragma("clang loop vectorize(disable) unroll(disable)")
#elif defined(__GNUC__)
#define QZ_NO_UNROLL _Pragma("GCC unroll 1")
#else
#define QZ_NO_UNROLL
#endif
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
enum { DICT_ADAPTIVE = 0, DICT_PRIMED = 1 };
enum { LAYOUT_U8 = 0, LAYOUT_U4 = 1, LAYOUT_U2 = 2 };
enum { HEADER_SIZE = 16, MIN_CODE_BITS = 9, MAX_CODE_BITS = 16, MAX_CODES = 1 << MAX_CODE_BITS };
enum { QZ_ENC_V3 = 0x2000 };
enum { QZ_ENC_RESET = 0x1, QZ_ENC_FORCE_LZW = 0x100, QZ_ENC_FORCE_PACKED = 0x200, QZ_ENC_V2 = 0x400,
       QZ_ENC_ADAPTIVE = 0x800, QZ_ENC_PRIMED = 0x1000 };
/* Primed dictionary: model block = 8 fixed bytes + perm[A] + costs[M]; strings of at most MAX_PHRASE classes.
 * The encoder uses codes of at most PRIMED_CODE_BITS (an encoder policy, as in converter/lzw.py). */
enum { MODEL_FIXED_SIZE = 8, MAX_SPLIT_BITS = 7, MAX_PHRASE = 64, MAX_THRESHOLD = 0xFFFF, MAX_ESCAPE_BITS = 8 };
enum { PRIMED_CODE_BITS = 12, PRIMED_WIDTH_TRIES = 3, PRIMED_MAX_CLASSES = 64 };
enum { MODEL_MAX_SIZE = MODEL_FIXED_SIZE + 256 + 256 };

/* Slack after the scratch symbols: the match copier moves 16 bytes at a time and may write up to 15 bytes past
 * the end of a string (later strings overwrite them). */
enum { COPY_SLACK = 16 };

QZ_INLINE u64 load64(const u8 *p) { u64 v; __builtin_memcpy(&v, p, 8); return v; }
QZ_INLINE void store32(u8 *p, u32 v) { __builtin_memcpy(p, &v, 4); }
QZ_INLINE void store64(u8 *p, u64 v) { __builtin_memcpy(p, &v, 8); }
QZ_INLINE void store16(u8 *p, u16 v) { __builtin_memcpy(p, &v, 2); }
/* 16-byte vectors (GCC >= 12 and clang vector extensions; v128 on wasm, SSE natively). */
typedef u8 v16u8 __attribute__((vector_size(16)));
typedef u16 v8u16 __attribute__((vector_size(16)));
typedef short v8i16 __attribute__((vector_size(16)));
typedef u32 v4u32 __attribute__((vector_size(16)));
QZ_INLINE v16u8 loadv(const u8 *p) { v16u8 v; __builtin_memcpy(&v, p, 16); return v; }
QZ_INLINE void storev(u8 *p, v16u8 v) { __builtin_memcpy(p, &v, 16); }
/* One 16-byte load, then one store: the ranges may overlap (memcpy(dst, src, 16) would be undefined then). */
QZ_INLINE void copy16(u8 *dst, const u8 *src) { storev(dst, loadv(src)); }
QZ_INLINE u32 bit_length(u32 x) { return x ? 32u - (u32)__builtin_clz(x) : 0u; }

/* lookup16(table, idx): byte i = table[idx[i]] for idx[i] < 16 — wasm i8x16.swizzle, gcc's generic shuffle
 * (pshufb with SSSE3), or clang's pshufb builtin natively with SSSE3 (the fuzz build: tools/fuzz.sh passes -mssse3,
 * so AddressSanitizer watches the SIMD paths too). Other compilers take the scalar paths. */
#if defined(__wasm__)
typedef signed char v16i8 __attribute__((vector_size(16)));
#define HAVE_LOOKUP16 1
QZ_INLINE v16u8 lookup16(v16u8 table, v16u8 idx) {
    return (v16u8)__builtin_wasm_swizzle_i8x16((v16i8)table, (v16i8)idx);
}
#elif defined(__GNUC__) && !defined(__clang__)
#define HAVE_LOOKUP16 1
QZ_INLINE v16u8 lookup16(v16u8 table, v16u8 idx) { return __builtin_shuffle(table, idx); }
#elif defined(__clang__) && defined(__SSSE3__)
typedef char v16qi_pshufb __attribute__((vector_size(16)));
#define HAVE_LOOKUP16 1
QZ_INLINE v16u8 lookup16(v16u8 table, v16u8 idx) {
    return (v16u8)__builtin_ia32_pshufb128((v16qi_pshufb)table, (v16qi_pshufb)idx);
}
#else
#define HAVE_LOOKUP16 0
#endif

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
    u32 version;        /* 1, 2 or 3 */
    u32 method;         /* METHOD_PACKED / METHOD_LZW */
    u32 alphabet;       /* A, 2..256 */
    u32 layout;         /* LAYOUT_U8 / U4 / U2 */
    u32 bias;           /* layout u8 only: output byte = (symbol - bias) mod 256 */
    u32 max_code_bits;  /* adaptive: 9..16, the widest code; primed: 9..16, every code; packed: 0 */
    u32 flags;          /* adaptive: bit 0 = reset-when-full; primed and packed: 0 */
    u32 dictionary;     /* method 1 of version 2: DICT_ADAPTIVE / DICT_PRIMED; otherwise 0 */
    u32 n_symbols;
    u64 out_bytes;      /* derived: layout bytes for n_symbols */
    u32 header_size;    /* derived: 16, plus the model block of a primed chunk */
    /* primed model block (offsets 16..): split_bits, reserved, classes u16, threshold u16, extra u16, perm, costs */
    u32 split_bits;     /* k: raw low bits of each frequency rank */
    u32 classes;        /* M: classes the tree parses, 2..A >> k */
    u32 threshold;      /* T */
    u32 extra;          /* E */
    u32 escape_bits;    /* version 3 (model byte 1, 0 before): class M-1 is an escape, see primed_escapes */
    const u8 *perm;     /* A bytes (inside the chunk): perm[rank] = symbol */
    const u8 *costs;    /* M bytes (inside the chunk): class costs in 1/16 bit, 1..255 */
} qz_header;

static u32 symbols_per_byte(u32 layout) { return layout == LAYOUT_U8 ? 1u : layout == LAYOUT_U4 ? 2u : 4u; }
static u32 max_alphabet(u32 layout) { return layout == LAYOUT_U8 ? 256u : layout == LAYOUT_U4 ? 16u : 4u; }

static u64 layout_nbytes(u32 layout, u32 n) {
    u64 per = symbols_per_byte(layout);
    return ((u64)n + per - 1u) / per;
}

/* The rules of the spec's header table, shared by decoder and encoder (the model block is checked apart). */
static int header_ok(const qz_header *h) {
    if (h->version < 1 || h->version > 3) return 0;
    if (h->method != METHOD_PACKED && h->method != METHOD_LZW) return 0;
    if (h->layout > LAYOUT_U2) return 0;
    if (h->alphabet < 2 || h->alphabet > max_alphabet(h->layout)) return 0;
    if (h->bias > 255 || (h->layout != LAYOUT_U8 && h->bias != 0)) return 0;
    if (h->method == METHOD_PACKED) return h->max_code_bits == 0 && h->flags == 0 && h->dictionary == 0;
    if (h->max_code_bits < MIN_CODE_BITS || h->max_code_bits > MAX_CODE_BITS) return 0;
    if (h->dictionary == DICT_ADAPTIVE) return (1u << h->max_code_bits) > h->alphabet + 1u && (h->flags & ~1u) == 0;
    return h->dictionary == DICT_PRIMED && h->version >= 2 && h->flags == 0;
}

/* The static rules of a primed model block (the tree-size rules are checked while building the tree). */
static int model_ok(const qz_header *h) {
    const u32 a = h->alphabet, k = h->split_bits;
    if (k > MAX_SPLIT_BITS || (a & ((1u << k) - 1u)) != 0) return 0;
    if (h->classes < 2 || h->classes > (a >> k)) return 0;
    u32 seen[8] = {0, 0, 0, 0, 0, 0, 0, 0};  /* perm must be a permutation of 0..A-1 */
    for (u32 r = 0; r < a; r++) {
        u32 s = h->perm[r];
        if (s >= a || (seen[s >> 5] >> (s & 31) & 1u)) return 0;
        seen[s >> 5] |= 1u << (s & 31);
    }
    for (u32 c = 0; c < h->classes; c++) if (h->costs[c] == 0) return 0;  /* costs are 1..255 */
    return h->escape_bits <= MAX_ESCAPE_BITS && (h->escape_bits == 0 || h->version >= 3);
}

static u32 get16(const u8 *p) { return (u32)p[0] | (u32)p[1] << 8; }

static int parse_header(const u8 *in, u32 in_len, qz_header *h) {
    if (in_len < HEADER_SIZE) return 0;
    if (in[0] != 'Q' || in[1] != 'Z') return 0;
    h->version = in[2];
    h->escape_bits = 0;
    if (h->version == 1) {
        if (in[10] != 0 || in[11] != 0) return 0;
        h->dictionary = DICT_ADAPTIVE;
    } else if (h->version == 2 || h->version == 3) {
        if (in[11] != 0) return 0;
        h->dictionary = in[10];
    } else {
        return 0;
    }
    h->method = in[3];
    h->alphabet = get16(in + 4);
    h->layout = in[6];
    h->bias = in[7];
    h->max_code_bits = in[8];
    h->flags = in[9];
    h->n_symbols = (u32)in[12] | (u32)in[13] << 8 | (u32)in[14] << 16 | (u32)in[15] << 24;
    h->out_bytes = layout_nbytes(h->layout, h->n_symbols);
    h->header_size = HEADER_SIZE;
    if (!header_ok(h)) return 0;
    if (h->method == METHOD_LZW && h->dictionary == DICT_PRIMED) {
        if (in_len < HEADER_SIZE + MODEL_FIXED_SIZE) return 0;
        const u8 *m = in + HEADER_SIZE;
        if (m[1] != 0 && h->version < 3) return 0;
        h->escape_bits = m[1];
        h->split_bits = m[0];
        h->classes = get16(m + 2);
        h->threshold = get16(m + 4);
        h->extra = get16(m + 6);
        u32 size = HEADER_SIZE + MODEL_FIXED_SIZE + h->alphabet + h->classes;
        if (in_len < size) return 0;
        h->perm = m + MODEL_FIXED_SIZE;
        h->costs = h->perm + h->alphabet;
        h->header_size = size;
        if (!model_ok(h)) return 0;
    }
    return 1;
}

static void write_header(u8 *out, const qz_header *h) {
    out[0] = 'Q'; out[1] = 'Z'; out[2] = (u8)h->version; out[3] = (u8)h->method;
    out[4] = (u8)h->alphabet; out[5] = (u8)(h->alphabet >> 8);
    out[6] = (u8)h->layout; out[7] = (u8)h->bias; out[8] = (u8)h->max_code_bits; out[9] = (u8)h->flags;
    out[10] = (u8)h->dictionary; out[11] = 0;
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

QZ_HOT_LOOP void pack_symbols(const u8 *sym, u32 n, u32 layout, u8 *out) {
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
/* Method 1, primed dictionary: decoder                                                                          */
/* ============================================================================================================= */

/* The dictionary is the leaf set of a Tunstall tree over the classes 0..M-1 (docs/lzw-format.md, "Primed
 * dictionary"): the root is expanded, and so is every node (the children of an expanded node are visited in class
 * order) shorter than MAX_PHRASE whose cost, the sum of its classes' costs, is <= T, or is T + 1 while fewer than E
 * such nodes were expanded before it in depth-first preorder. Leaves are numbered in preorder; leaf i is code i.
 *
 * Each leaf's string is written once into an arena (already in output form: the output byte of each class when
 * k = 0, class << k when k > 0), and table[code] = (pointer, length): a code is decoded by one copy, as in the
 * adaptive decoder. Codes from the leaf count up to 2^width - 1 get a length no buffer can hold (BAD_CODE on the
 * careful path). */
enum { BAD_LEN = 0x40000000 };

/* Copy a dictionary string (<= MAX_PHRASE bytes): two 16-byte moves whatever its length, more only past 32 bytes
 * (rare), so a short string costs no branch on its length. Reads and writes up to PHRASE_SLACK bytes past the
 * string: src and dst need that much room (later strings overwrite the junk). */
enum { PHRASE_SLACK = 32 };
QZ_INLINE void copy_phrase(u8 *dst, const u8 *src, u32 len) {
    copy16(dst, src);
    copy16(dst + 16, src + 16);
    QZ_NO_UNROLL
    for (u32 i = 32; UNLIKELY(i < len); i += 16) copy16(dst + i, src + i);
}

/* Build the leaves into table[0 .. 2^width) and arena (at least 2^width * MAX_PHRASE + PHRASE_SLACK bytes); return the
 * leaf count, or 0 when the tree breaks a rule (more than 2^width leaves, or fewer than E nodes of cost T + 1 to
 * expand). */
QZ_HOT_LOOP u32 primed_build(const qz_header *h, const u8 *byte_of_class, qz_entry *table, u8 *arena) {
    const u32 m = h->classes, t = h->threshold, e = h->extra, limit = 1u << h->max_code_bits;
    u32 cost[MAX_PHRASE];      /* cost of the node at each depth of the current path */
    u32 next[MAX_PHRASE];      /* next class to visit below it */
    u8 path[MAX_PHRASE + PHRASE_SLACK];
    __builtin_memset(path, 0, sizeof path);
    u32 depth = 0, leaves = 0, extra_used = 0, used = 0;
    cost[0] = 0;
    next[0] = 0;
    for (;;) {
        if (next[depth] == m) {  /* all children done: back to the parent */
            if (depth == 0) break;
            depth--;
            continue;
        }
        u32 c = next[depth]++;
        u32 child = cost[depth] + h->costs[c];
        path[depth] = byte_of_class[c];
        if (depth + 1 < MAX_PHRASE && (child <= t || (child == t + 1 && extra_used < e))) {
            extra_used += child == t + 1;
            depth++;
            cost[depth] = child;
            next[depth] = 0;
        } else {
            if (leaves == limit) return 0;
            copy_phrase(arena + used, path, depth + 1);
            table[leaves].src = arena + used;
            table[leaves].len = depth + 1;
            used += depth + 1;
            leaves++;
        }
    }
    if (extra_used != e) return 0;
    for (u32 code = leaves; code < limit; code++) table[code].len = BAD_LEN;
    return leaves;
}

/* Decode the code section into buf: n classes (or output bytes), writing at most `limit` bytes of buf (n for the
 * caller's output, n + PHRASE_SLACK for scratch). The last phrase may pass n: its tail is dropped. Returns QZ_OK or
 * an error code. Fast loop: while 8 payload bytes remain, refill to >= 56 bits and take up to 3 codes (<= 16 bits
 * each) that fit with PHRASE_SLACK bytes of room; anything else goes to the careful path for one code. */
QZ_INLINE int primed_codes_w(const u8 *payload, u32 plen, const u32 width, const qz_entry *table, u32 leaves,
                             u8 *buf, u32 n, u32 limit, u32 *consumed) {
    const u8 *p = payload, *end = payload + plen;
    const u32 mask = (1u << width) - 1u;
    u64 bitbuf = 0;
    u32 bitcnt = 0, pos = 0;
    while (pos < n) {
        while (end - p >= 8) {
            bitbuf |= load64(p) << bitcnt;  /* branchless refill to 56..63 bits */
            p += (63u - bitcnt) >> 3;
            bitcnt |= 56u;
            const qz_entry *e0 = &table[(u32)bitbuf & mask];
            if (UNLIKELY(e0->len + PHRASE_SLACK > limit - pos)) break;  /* bad code, or near the end */
            bitbuf >>= width; bitcnt -= width;
            copy_phrase(buf + pos, e0->src, e0->len); pos += e0->len;
            const qz_entry *e1 = &table[(u32)bitbuf & mask];
            if (UNLIKELY(e1->len + PHRASE_SLACK > limit - pos)) break;
            bitbuf >>= width; bitcnt -= width;
            copy_phrase(buf + pos, e1->src, e1->len); pos += e1->len;
            const qz_entry *e2 = &table[(u32)bitbuf & mask];
            if (UNLIKELY(e2->len + PHRASE_SLACK > limit - pos)) break;
            bitbuf >>= width; bitcnt -= width;
            copy_phrase(buf + pos, e2->src, e2->len); pos += e2->len;
        }
        if (pos >= n) break;

        /* ---- careful path: one code ---- */
        if (bitcnt < width) {
            while (bitcnt <= 56u && p < end) { bitbuf |= (u64)*p++ << bitcnt; bitcnt += 8u; }
            if (bitcnt < width) return QZ_TRUNCATED;
        }
        u32 code = (u32)bitbuf & mask;
        bitbuf >>= width;
        bitcnt -= width;
        if (code >= leaves) return QZ_BAD_CODE;
        const u8 *src = table[code].src;
        u32 len = table[code].len, take = len < n - pos ? len : n - pos;
        if (take + PHRASE_SLACK <= limit - pos) {
            copy_phrase(buf + pos, src, take);
        } else {
            for (u32 i = 0; i < take; i++) buf[pos + i] = src[i];
        }
        pos += take;
    }
    /* End of stream: the payload ends in the byte holding the last bit read (or, with `consumed`, the code
     * section does: it reports where); that byte's unread bits are 0. */
    u64 bits = (u64)(p - payload) * 8u - bitcnt;
    u64 used = (bits + 7u) / 8u;
    if (consumed) *consumed = (u32)used;
    else if (used != plen) return QZ_TRAILING;
    if ((bits & 7u) && (payload[used - 1] >> (bits & 7u)) != 0) return QZ_TRAILING;
    return QZ_OK;
}

/* One instance per common width (the encoder writes 12 and 11 on SmolLM2's weights): the width and the mask become
 * constants, which frees two of the registers V8 is short of in the loop above (it kept them, and the bit buffer, on
 * the stack). Session 16, Node, SmolLM2's chunks: int8 +8 %, int4-g32 +12 %, ternary +18 %, ternary-g64 +19 %;
 * natively 0 to +6 %. */
QZ_HOT_LOOP int primed_codes(const u8 *payload, u32 plen, u32 width, const qz_entry *table, u32 leaves, u8 *buf, u32 n,
                        u32 limit, u32 *consumed) {
    if (width == 12) return primed_codes_w(payload, plen, 12, table, leaves, buf, n, limit, consumed);
    if (width == 11) return primed_codes_w(payload, plen, 11, table, leaves, buf, n, limit, consumed);
    return primed_codes_w(payload, plen, width, table, leaves, buf, n, limit, consumed);
}

#if HAVE_LOOKUP16
/* The k-bit fields (k = 1..7, LSB first) of 16 symbols, which take 2k bytes: lane i's 16-bit window starts at byte
 * (k*i) >> 3, and multiplying it by 2^(8 - (k*i & 7)) moves its field to bits 8.. of the 16-bit lane; the high bytes
 * of the two halves of 8 lanes are the fields, with the window's bits above each field left over (mask them).
 * fields_for(k) makes the two selectors (the bytes of each window) and the two multipliers for one k. */
typedef struct { v16u8 sel[2]; v8u16 mul[2]; } field_selectors;

QZ_INLINE field_selectors fields_for(const u32 k) {
    u8 sel[2][16];
    u16 mul[2][8];
    for (u32 half = 0; half < 2; half++) {
        for (u32 lane = 0; lane < 8; lane++) {
            const u32 bitpos = k * (8 * half + lane);
            sel[half][2 * lane] = (u8)(bitpos >> 3);
            sel[half][2 * lane + 1] = (u8)((bitpos >> 3) + 1u);   /* <= 14 for k = 7 */
            mul[half][lane] = (u16)(1u << (8u - (bitpos & 7u)));
        }
    }
    /* Keep the selectors opaque: once they are constants, clang rewrites each swizzle as an i8x16.shuffle, which
     * V8 compiles to slower code than a swizzle (session 15: SmolLM2 int4-g32 ~10 % slower in wasm that way). */
#if defined(__wasm__)
    __asm__ volatile("" : : "r"(sel), "r"(mul) : "memory");
#endif
    field_selectors f;
    __builtin_memcpy(&f.sel, sel, sizeof sel);
    __builtin_memcpy(&f.mul, mul, sizeof mul);
    return f;
}

QZ_INLINE v16u8 fields16(const u8 *low, const field_selectors *f) {
    const v16u8 bytes = loadv(low);
    const v8u16 w0 = (v8u16)lookup16(bytes, f->sel[0]) * f->mul[0], w1 = (v8u16)lookup16(bytes, f->sel[1]) * f->mul[1];
#if defined(__wasm__)
    return (v16u8)__builtin_wasm_narrow_u_i8x16_i16x8((v8i16)(w0 >> 8), (v8i16)(w1 >> 8));
#else
    return __builtin_shufflevector((v16u8)w0, (v16u8)w1, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#endif
}

/* 16 symbols at a time, for alphabets <= 16: the ranks are the classes ORed with the fields, and the rank ->
 * output table is one lookup. Returns the symbols done (a multiple of 16). Session 16: the fields by multiplying
 * (fields16) instead of testing one bit of each field at a time: SmolLM2 int4-g32 (k = 3) decodes ~18 % faster in
 * V8 and ~21 % natively. */
QZ_INLINE u32 combine16(const u8 *cls, u32 n, const u8 *low, u32 low_len, const u32 k, const u8 *table, u8 *dst) {
    const field_selectors f = fields_for(k);
    const v16u8 tv = loadv(table);
    const u8 field_mask = (u8)((1u << k) - 1u);
    u32 i = 0, off = 0;   /* off = (i / 16) * 2k */
    for (; i + 16 <= n && off + 16u <= low_len; i += 16, off += 2 * k)
        storev(dst + i, lookup16(tv, loadv(cls + i) | (fields16(low + off, &f) & field_mask)));
    return i;
}
#endif

/* 8 symbols at a time, k a constant in each instance: their k-bit fields are exactly k bytes. Returns the symbols
 * done (a multiple of 8). map is the caller's 256-byte table (a local copy, so stores to dst cannot alias it).
 * Two groups of 8 per iteration, with the offset into `low` carried rather than recomputed: int8 (k = 6) decodes
 * ~15 % faster, in wasm and natively (session 15). */
QZ_INLINE u32 combine8(const u8 *cls, u32 n, const u8 *low, u32 low_len, const u32 k, const u8 *map, u8 *dst) {
    const u32 mask = (1u << k) - 1u;
    u32 i = 0, off = 0;   /* off = (i / 8) * k: where the fields of symbol i start */
    for (; i + 16 <= n && off + k + 8u <= low_len; i += 16, off += 2 * k) {
        const u64 v = load64(low + off), w = load64(low + off + k);
        for (u32 j = 0; j < 8; j++) dst[i + j] = map[cls[i + j] | ((u32)(v >> (j * k)) & mask)];
        for (u32 j = 0; j < 8; j++) dst[i + 8 + j] = map[cls[i + 8 + j] | ((u32)(w >> (j * k)) & mask)];
    }
    for (; i + 8 <= n && off + 8u <= low_len; i += 8, off += k) {
        const u64 v = load64(low + off);
        for (u32 j = 0; j < 8; j++) dst[i + j] = map[cls[i + j] | ((u32)(v >> (j * k)) & mask)];
    }
    return i;
}

#if defined(__wasm__)
/* The wasm build's path for k in 4..7 over up to 256 ranks (int8: k = 6), in two passes over 16 symbols at a time:
 * the ranks in SIMD (fields16), then rank -> byte, four lookups per 32-bit load and store, in place.
 * V8 runs combine8's scalar loop at ~0.66x gcc's speed; this path is ~20 % faster in V8 on SmolLM2 int8 (session
 * 16, Node, same chunks), and ~9 % slower natively, where combine8 stays (looking the table up in SIMD, 16
 * swizzles per 16 bytes, was slower in V8 than either). Returns the symbols done (a multiple of 16). */
QZ_INLINE u32 combine_wide16(const u8 *cls, u32 n, const u8 *low, u32 low_len, const u32 k, const u8 *table, u8 *dst) {
    const field_selectors f = fields_for(k);
    const u8 field_mask = (u8)((1u << k) - 1u);
    u32 i = 0, off = 0;   /* off = (i / 16) * 2k */
    for (; i + 16 <= n && off + 16u <= low_len; i += 16, off += 2 * k)
        storev(dst + i, loadv(cls + i) | (fields16(low + off, &f) & field_mask));
    for (u32 j = 0; j < i; j += 4) {
        u32 r;
        __builtin_memcpy(&r, dst + j, 4);
        store32(dst + j, (u32)table[r & 255u] | (u32)table[(r >> 8) & 255u] << 8 |
                         (u32)table[(r >> 16) & 255u] << 16 | (u32)table[r >> 24] << 24);
    }
    return i;
}
#endif

/* dst[i] = map[cls[i] | low_i], where cls[i] already holds class << k and low_i is bits [i*k, i*k + k) of `low`
 * (LSB first). dst may be cls. */
QZ_HOT_LOOP void primed_combine(const u8 *cls, u32 n, const u8 *low, u32 low_len, u32 k, const u8 *map, u32 map_len,
                           u8 *dst) {
    const u32 mask = (1u << k) - 1u;
    u8 table[256];
    for (u32 r = 0; r < 256; r++) table[r] = r < map_len ? map[r] : 0;
    u32 i = 0;
#if HAVE_LOOKUP16
    if (map_len <= 16) {  /* then k <= 3 (2^k divides A <= 16, and A >> k >= 2) */
        if (k == 1) i = combine16(cls, n, low, low_len, 1, table, dst);
        else if (k == 2) i = combine16(cls, n, low, low_len, 2, table, dst);
        else if (k == 3) i = combine16(cls, n, low, low_len, 3, table, dst);
    }
#endif
#if defined(__wasm__)
    if (map_len > 16 && k >= 4) {
        if (k == 4) i = combine_wide16(cls, n, low, low_len, 4, table, dst);
        else if (k == 5) i = combine_wide16(cls, n, low, low_len, 5, table, dst);
        else if (k == 6) i = combine_wide16(cls, n, low, low_len, 6, table, dst);
        else i = combine_wide16(cls, n, low, low_len, 7, table, dst);
    }
#endif
    /* the rest 8 at a time (all of it when there is no 16-lane path); i is a multiple of 16 here */
    const u32 at = i, off = at / 8 * k;
    const u8 *c8 = cls + at, *l8 = low + off;
    u8 *d8 = dst + at;
    switch (k) {  /* one instance per k: constant shifts */
        case 1: i += combine8(c8, n - at, l8, low_len - off, 1, table, d8); break;
        case 2: i += combine8(c8, n - at, l8, low_len - off, 2, table, d8); break;
        case 3: i += combine8(c8, n - at, l8, low_len - off, 3, table, d8); break;
        case 4: i += combine8(c8, n - at, l8, low_len - off, 4, table, d8); break;
        case 5: i += combine8(c8, n - at, l8, low_len - off, 5, table, d8); break;
        case 6: i += combine8(c8, n - at, l8, low_len - off, 6, table, d8); break;
        default: i += combine8(c8, n - at, l8, low_len - off, 7, table, d8); break;
    }
    for (; i < n; i++) {
        u64 bitpos = (u64)i * k;
        u32 byte = (u32)(bitpos >> 3), v = low[byte];
        if (byte + 1 < low_len) v |= (u32)low[byte + 1] << 8;
        dst[i] = table[cls[i] | ((v >> (bitpos & 7u)) & mask)];
    }
}

/* The last TREE_CACHE trees built, kept for later chunks: the tree depends only on (width, k, M, T, E, costs) and
 * what the arena holds per class, and the chunks of a model share few of those (4 entries hit on 2 chunks in 3 for
 * SmolLM2 int4 and int2). Trees up to PRIMED_CODE_BITS wide (all that the encoder writes) are cached, least
 * recently used first out; wider ones are built into the shared ent[] and a scratch arena. */
enum { TREE_CACHE = 4 };
typedef struct {
    u32 valid, used;  /* used: the cache clock when last used */
    u32 width, k, classes, threshold, extra, leaves;
    u8 costs[256], byte_of_class[256];
    qz_entry table[1u << PRIMED_CODE_BITS];
    u8 arena[(1u << PRIMED_CODE_BITS) * MAX_PHRASE + PHRASE_SLACK];
} cached_tree;
static cached_tree tree_cache[TREE_CACHE];
static u32 tree_clock;

static int same_tree(const cached_tree *t, const qz_header *h, const u8 *byte_of_class) {
    if (!t->valid || t->width != h->max_code_bits || t->k != h->split_bits || t->classes != h->classes ||
        t->threshold != h->threshold || t->extra != h->extra)
        return 0;
    for (u32 c = 0; c < h->classes; c++) {
        if (t->costs[c] != h->costs[c] || t->byte_of_class[c] != byte_of_class[c]) return 0;
    }
    return 1;
}

/* The cached tree of this model, building it (into the least recently used entry) if needed; 0 if the tree
 * breaks a rule. */
static cached_tree *cached_primed_tree(const qz_header *h, const u8 *byte_of_class) {
    cached_tree *victim = &tree_cache[0];
    for (u32 i = 0; i < TREE_CACHE; i++) {
        cached_tree *t = &tree_cache[i];
        if (same_tree(t, h, byte_of_class)) {
            t->used = ++tree_clock;
            return t;
        }
        if (!t->valid || (victim->valid && t->used < victim->used)) victim = t;
    }
    victim->valid = 0;
    u32 leaves = primed_build(h, byte_of_class, victim->table, victim->arena);
    if (!leaves) return 0;
    victim->width = h->max_code_bits; victim->k = h->split_bits; victim->classes = h->classes;
    victim->threshold = h->threshold; victim->extra = h->extra; victim->leaves = leaves;
    for (u32 c = 0; c < h->classes; c++) {
        victim->costs[c] = h->costs[c];
        victim->byte_of_class[c] = byte_of_class[c];
    }
    victim->valid = 1;
    victim->used = ++tree_clock;
    return victim;
}

/* One-bit escapes, four classes at a time: deposit4[(m << 4) | b] spreads the low popcount(m) bits of b, in order,
 * onto the set bits of the 4-bit escape mask m, one per byte (byte j = bit of class j): what a branch per class
 * would add to the four classes. pop4[m] = popcount(m). Filled on first use (1 KiB + 16 bytes). */
static u32 deposit4[256];
static u8 pop4[16];
static int deposit4_ready;

static void deposit4_init(void) {
    for (u32 m = 0; m < 16u; m++) {
        pop4[m] = (u8)((m & 1u) + ((m >> 1) & 1u) + ((m >> 2) & 1u) + ((m >> 3) & 1u));
        for (u32 b = 0; b < 16u; b++) {
            u32 spread = 0, used = 0;
            for (u32 j = 0; j < 4u; j++) {
                if (!(m >> j & 1u)) continue;
                spread |= ((b >> used) & 1u) << (8u * j);
                used++;
            }
            deposit4[(m << 4) | b] = spread;
        }
    }
    deposit4_ready = 1;
}

/* The escape section's bits from bit `off` on (at least 32 of them; zeros past its end). */
QZ_INLINE u64 escape_bits_at(const u8 *sec, u32 len, u64 off) {
    const u64 at = off >> 3;
    if (at + 8u <= len) return load64(sec + at) >> (off & 7u);
    u64 v = 0;
    for (u64 b = at; b < len && b < at + 8u; b++) v |= (u64)sec[b] << (8u * (b - at));
    return v >> (off & 7u);
}

/* Version 3 with one-bit escapes that can never name an invalid class (the case of ternary codes whose two signs
 * share the escape: an escape in ~40 % of the symbols). Eight classes at a time: the escape mask of the group, and
 * its bits read at the group's own offset in the section (no chain of refills from group to group), spread onto
 * the escapes by two lookups in deposit4. The only errors possible are the reference's TRUNCATED (more escapes than
 * bits) and TRAILING, both decided by the total. */
QZ_HOT_LOOP int escapes_one_bit(u8 *cls, u32 n, const u8 *sec, u32 len, u8 esc, u8 flip) {
    const u64 ones = 0x0101010101010101ull, highs = 0x8080808080808080ull, lows = 0x7F7F7F7F7F7F7F7Full;
    const u64 pattern = ones * esc, flips = (u64)flip;
    u64 off = 0;
    u32 i = 0;
    for (; i + 8u <= n; i += 8u) {
        const u64 x = load64(cls + i) ^ pattern;
        const u64 zero = ~(((x & lows) + lows) | x) & highs;         /* 0x80 in each byte that is the escape */
        const u32 m = (u32)(((zero >> 7) * 0x0102040810204080ull) >> 56);   /* bit j: class j is the escape */
        if (!m) continue;
        const u32 lo = m & 15u, hi = m >> 4, t_lo = pop4[lo];
        const u32 b = (u32)escape_bits_at(sec, len, off);
        const u64 spread = deposit4[(lo << 4) | (b & 15u)] | (u64)deposit4[(hi << 4) | ((b >> t_lo) & 15u)] << 32;
        store64(cls + i, load64(cls + i) ^ spread * flips);                  /* bytes 0/1 times flip: no carries */
        off += t_lo + pop4[hi];
    }
    for (; i < n; i++) {
        if (cls[i] != esc) continue;
        cls[i] ^= (u8)(flip & (0u - ((u32)escape_bits_at(sec, len, off) & 1u)));
        off++;
    }
    if (off > (u64)len * 8u) return QZ_TRUNCATED;
    if ((off + 7u) / 8u != len || ((off & 7u) && (sec[len - 1u] >> (off & 7u)) != 0)) return QZ_TRAILING;
    return QZ_OK;
}

/* Version 3: each escape in cls (class M-1, held as byte_of[M-1]) becomes the class M-1 + the next escape_bits of
 * the escape section `sec` (held as byte_of[that class]), which must hold exactly those bits, zero-padded
 * (converter/lzw.py _escapes). byte_of: the class's output byte (k = 0, layout u8), its symbol (k = 0, u4/u2), or
 * class << k (the raw low bits are combined after). One-bit escapes go to escapes_one_bit; wider ones (int8-eB's
 * rare classes) class by class, skipping eight at a time while none is the escape (SWAR). A branch per class is
 * cheap there, where escapes are rare (a branchless version measured ~10 % slower in wasmtime). */
static int primed_escapes(u8 *cls, u32 n, const qz_header *h, const u8 *sec, u32 len, const u8 *byte_of) {
    const u32 k = h->split_bits, e = h->escape_bits, top = h->classes - 1u, limit = h->alphabet >> k;
    const u32 emask = (1u << e) - 1u;
    const u8 esc = byte_of[top];
    if (e == 1u && top + 1u < limit) {
        if (!deposit4_ready) deposit4_init();
        return escapes_one_bit(cls, n, sec, len, esc, (u8)(byte_of[top] ^ byte_of[top + 1u]));
    }
    u64 bitbuf = 0, bits = 0;
    u32 bitcnt = 0, pos = 0;
    const u64 ones = 0x0101010101010101ull, highs = 0x8080808080808080ull, pattern = ones * esc;
    for (u32 i = 0; i < n; i++) {
        /* 8 classes at a time while none is the escape (SWAR: a zero byte of x ^ pattern is a match) */
        while (i + 8u <= n) {
            u64 x = load64(cls + i) ^ pattern;
            if ((x - ones) & ~x & highs) break;
            i += 8u;
        }
        if (i >= n) break;
        if (cls[i] != esc) continue;
        while (bitcnt < e) {
            if (pos >= len) return QZ_TRUNCATED;
            bitbuf |= (u64)sec[pos++] << bitcnt;
            bitcnt += 8u;
        }
        u32 c = top + ((u32)bitbuf & emask);
        bitbuf >>= e; bitcnt -= e; bits += e;
        if (c >= limit) return QZ_BAD_CODE;
        cls[i] = byte_of[c];
    }
    if ((bits + 7u) / 8u != len || bitbuf != 0) return QZ_TRAILING;
    return QZ_OK;
}

static int primed_decode(const qz_header *h, const u8 *payload, u32 plen, u8 *out) {
    const u32 n = h->n_symbols, k = h->split_bits, width = h->max_code_bits;
    u8 map[256];            /* rank -> output byte (layout u8) or symbol (u4 / u2) */
    u8 byte_of_class[256];  /* what the arena holds for a class: its output byte / symbol (k = 0), or class << k */
    for (u32 r = 0; r < h->alphabet; r++) map[r] = h->layout == LAYOUT_U8 ? (u8)(h->perm[r] - h->bias) : h->perm[r];
    /* every class the escapes can name too (they resolve to these bytes in place); the rest stays 0 */
    for (u32 c = 0; c < 256u; c++) byte_of_class[c] = c >= h->alphabet >> k ? 0u : k ? (u8)(c << k) : map[c];

    u8 *arena = 0;  /* scratch arena of a wide tree (freed below), else 0 */
    const qz_entry *table;
    u32 leaves;
    if (width <= PRIMED_CODE_BITS) {
        cached_tree *t = cached_primed_tree(h, byte_of_class);
        if (!t) return QZ_BAD_HEADER;
        table = t->table;
        leaves = t->leaves;
    } else {
        arena = scratch_get((1u << width) * MAX_PHRASE + PHRASE_SLACK);
        if (!arena) return QZ_NO_MEMORY;
        leaves = primed_build(h, byte_of_class, ent, arena);
        if (!leaves) { scratch_put(arena); return QZ_BAD_HEADER; }
        table = ent;
    }

    /* the raw low bits come first: length, then zero padding */
    u64 low_bits = (u64)n * k;
    u32 low_len = (u32)((low_bits + 7u) / 8u);
    int err = QZ_OK;
    if (plen < low_len) err = QZ_TRUNCATED;
    else if ((low_bits & 7u) && (payload[low_len - 1] >> (low_bits & 7u)) != 0) err = QZ_TRAILING;

    int direct = k == 0 && h->layout == LAYOUT_U8;  /* the arena holds output bytes: in place */
    u8 *scratch = 0;  /* the class / symbol buffer when not direct */
    if (!err && !direct) {
        scratch = n <= 0xFFFFFFFFu - PHRASE_SLACK ? scratch_get(n + PHRASE_SLACK) : 0;
        if (!scratch) err = QZ_NO_MEMORY;
    }
    u32 codes_len = 0;
    if (!err) err = primed_codes(payload + low_len, plen - low_len, width, table, leaves, direct ? out : scratch, n,
                                 direct ? n : n + PHRASE_SLACK, h->escape_bits ? &codes_len : 0);
    if (err == QZ_OK && h->escape_bits)
        err = primed_escapes(direct ? out : scratch, n, h, payload + low_len + codes_len, plen - low_len - codes_len,
                             byte_of_class);
    if (err == QZ_OK && !direct) {
        u8 *sym = h->layout == LAYOUT_U8 ? out : scratch;  /* u8: straight to the output; u4/u2: symbols, pack */
        if (k) primed_combine(scratch, n, payload, low_len, k, map, h->alphabet, sym);
        if (h->layout != LAYOUT_U8) pack_symbols(scratch, n, h->layout, out);
    }
    if (scratch) scratch_put(scratch);
    if (arena) scratch_put(arena);
    return err;
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
    const u8 *payload = in + h.header_size;
    u32 plen = in_len - h.header_size;
    if (h.method == METHOD_PACKED) return decode_packed(&h, payload, plen, out);

    int err;
    if (h.dictionary == DICT_PRIMED) {
        err = primed_decode(&h, payload, plen, out);
    } else {
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
/* Method 1, primed dictionary: encoder                                                                          */
/* ============================================================================================================= */

/* Exactly the choices of converter/lzw.py (_primed_encode): rank the symbols, and for each candidate
 * (split_bits k, width w) fit the model, build the tree, count the codes of the greedy parse; keep the smallest
 * chunk (the first on ties), then write it. Widths are at most PRIMED_CODE_BITS, so the tables below are small. */
enum { ENC_MAX_LEAVES = 1 << PRIMED_CODE_BITS, LEAF = 0x80000000u };

/* A transition table: table[row + c] for an internal node whose row is `row` (= preorder number * M) is the row of
 * child c, or LEAF | code. At most 2 * leaves entries (M >= 2), plus one row. One table per candidate evaluated
 * together (MAX_CANDIDATES: the split_bits 0..7, or the widths); enc_table is the one written with. */
enum { TABLE_SIZE = 2 * ENC_MAX_LEAVES + 256, MAX_CANDIDATES = MAX_SPLIT_BITS + 1 };
static u32 cand_tables[MAX_CANDIDATES][TABLE_SIZE];
static u8 cand_cmaps[MAX_CANDIDATES][256];  /* rank -> the class the tree of each candidate sees */
/* version 3: tree classes (the escape included) the encoder tries (converter/lzw.py ESCAPE_CLASS_TRIES) */
static const u32 escape_class_tries[] = {2, 3, 4, 6, 8};
enum { ESCAPE_TRIES = sizeof escape_class_tries / sizeof escape_class_tries[0] };
static u32 enc_table[TABLE_SIZE];
/* The chunk being encoded: symbol counts, perm (symbols by decreasing count) and each symbol's rank. */
static u32 counts[256];
static u8 perm[256], rank_of[256];
/* choose_threshold: N(b), the strings of cost <= b. b stays below 256 * (PRIMED_CODE_BITS + 1): with M >= 2 classes
 * of cost <= 255, N(b) >= 2^floor(b / 255), which passes 2^PRIMED_CODE_BITS before that. */
static u32 n_at[256 * (PRIMED_CODE_BITS + 1) + 2];

/* floor(log2(x) * 2^16) for 1 <= x < 2^33, bit for bit as converter/lzw.py log2_q16 (repeated squaring). */
static u32 log2_q16(u64 x) {
    u32 e = 63u - (u32)__builtin_clzll(x);
    u64 m = e <= 31 ? x << (31 - e) : x >> (e - 31);  /* m / 2^31 in [1, 2) */
    u32 frac = 0;
    for (int i = 0; i < 16; i++) {
        m = (m * m) >> 31;
        frac <<= 1;
        if (m >= (1ull << 32)) { m >>= 1; frac |= 1u; }
    }
    return e << 16 | frac;
}

/* round(16 * log2(total / count)) clamped to 1..255; 255 for a class that never occurs. */
static u32 class_cost(u64 count, u64 total) {
    if (count == 0) return 255;
    i32 c = ((i32)log2_q16(total) - (i32)log2_q16(count) + (1 << 11)) >> 12;
    return c < 1 ? 1u : c > 255 ? 255u : (u32)c;
}

/* Leaves (and nodes of cost T + 1 that could be expanded) of the tree with extra = 0; 0 past `limit` leaves. */
static int tree_size(const u8 *costs, u32 m, u32 t, u32 limit, u32 *leaves_out, u32 *eligible_out) {
    u32 cost[MAX_PHRASE], next[MAX_PHRASE];
    u32 depth = 0, leaves = 0, eligible = 0;
    cost[0] = 0;
    next[0] = 0;
    for (;;) {
        if (next[depth] == m) {
            if (depth == 0) break;
            depth--;
            continue;
        }
        u32 child = cost[depth] + costs[next[depth]++];
        if (depth + 1 < MAX_PHRASE && child <= t) {
            depth++;
            cost[depth] = child;
            next[depth] = 0;
        } else {
            leaves++;
            eligible += depth + 1 < MAX_PHRASE && child == t + 1;
            if (leaves > limit) return 0;
        }
    }
    *leaves_out = leaves;
    *eligible_out = eligible;
    return 1;
}

/* The largest T whose tree (E = 0) has at most 2^width leaves, then the largest E (converter/lzw.py
 * _choose_threshold: the recurrence N(b) = 1 + sum_c N(b - cost_c) while the depth cap cannot matter, else a
 * binary search counting trees). */
static void choose_threshold(const u8 *costs, u32 m, u32 width, u32 *t_out, u32 *e_out) {
    const u32 limit = 1u << width;
    u32 b = 0, cmin = 255;
    u64 nb;
    for (u32 c = 0; c < m; c++) if (costs[c] < cmin) cmin = costs[c];
    for (;;) {
        nb = 1;
        for (u32 c = 0; c < m; c++) if (costs[c] <= b) nb += n_at[b - costs[c]];
        if (1u + (u64)(m - 1) * nb > limit || b > MAX_THRESHOLD) break;
        n_at[b++] = (u32)nb;  /* N(b) <= limit, and b < limit (N(b) > b): fits */
    }
    u32 t = b - 1, leaves, eligible;
    if ((u64)MAX_PHRASE * cmin > (u64)t + 1u) {
        leaves = 1u + (m - 1) * n_at[t];
        eligible = (u32)(nb - n_at[t]);
    } else {
        if (tree_size(costs, m, MAX_THRESHOLD, limit, &leaves, &eligible)) {
            t = MAX_THRESHOLD;
        } else {
            u32 lo = t, hi = MAX_THRESHOLD;  /* lo fits (the cap only removes leaves), hi does not */
            while (hi - lo > 1) {
                u32 mid = lo + (hi - lo) / 2;
                if (tree_size(costs, m, mid, limit, &leaves, &eligible)) lo = mid; else hi = mid;
            }
            t = lo;
        }
        tree_size(costs, m, t, limit, &leaves, &eligible);
    }
    u32 room = (limit - leaves) / (m - 1);
    *t_out = t;
    *e_out = eligible < room ? eligible : room;
}

/* Build a transition table (see enc_table) for (costs, T, E), in the same preorder as primed_build. */
static void enc_build(u32 *table, const u8 *costs, u32 m, u32 t, u32 e) {
    u32 cost[MAX_PHRASE], next[MAX_PHRASE], row[MAX_PHRASE];
    u32 depth = 0, leaves = 0, rows = 1, extra_used = 0;
    cost[0] = 0; next[0] = 0; row[0] = 0;
    for (;;) {
        if (next[depth] == m) {
            if (depth == 0) break;
            depth--;
            continue;
        }
        u32 c = next[depth]++;
        u32 child = cost[depth] + costs[c];
        if (depth + 1 < MAX_PHRASE && (child <= t || (child == t + 1 && extra_used < e))) {
            extra_used += child == t + 1;
            table[row[depth] + c] = rows * m;
            depth++;
            cost[depth] = child; next[depth] = 0; row[depth] = rows * m;
            rows++;
        } else {
            table[row[depth] + c] = LEAF | leaves++;
        }
    }
}

/* Greedy parse with enc_table, writing the codes. A phrase cut short by the end is sent as the first leaf below
 * its node (following class 0). */
static void enc_write_codes(const u8 *sym, u32 n, const u8 *cls_of, bit_writer *w, u32 width) {
    u32 row = 0;
    for (u32 i = 0; i < n; i++) {
        u32 r = enc_table[row + cls_of[sym[i]]];
        if (r & LEAF) {
            put_code(w, r & ~LEAF, width);
            row = 0;
        } else {
            row = r;
        }
    }
    if (row) {
        u32 r = row;
        while (!(r & LEAF)) r = enc_table[r];
        put_code(w, r & ~LEAF, width);
    }
}

/* The code counts of `count` candidates at once: the same greedy parse as enc_write_codes, over cand_tables[j]
 * with classes cand_cmaps[j][rank]. Each walk is a chain of dependent loads; walking them side by side lets the
 * processor overlap the chains. Branch-free: a leaf resets the row to 0 (the root). */
static void enc_count_codes(const u8 *sym, u32 n, u32 count, u32 *codes) {
    u32 row[MAX_CANDIDATES] = {0}, got[MAX_CANDIDATES] = {0};
    for (u32 i = 0; i < n; i++) {
        u32 rank = rank_of[sym[i]];
        for (u32 j = 0; j < count; j++) {
            u32 r = cand_tables[j][row[j] + cand_cmaps[j][rank]];
            got[j] += r >> 31;
            row[j] = r & ((r >> 31) - 1u);
        }
    }
    for (u32 j = 0; j < count; j++) codes[j] = got[j] + (row[j] != 0);
}

typedef struct {
    u32 k, width, classes, t, e;
    u32 escape_bits;  /* version 3: class classes - 1 is the escape */
    u64 escaped;      /* symbols whose class is the escape's or above */
    u8 costs[256];
    u64 size;  /* the whole chunk */
} primed_choice;


/* Symbol counts per class of split k (converter/lzw.py class_counts_of); returns the classes used (nonzero). */
static u32 class_counts_of(u32 a, u32 k, u64 *class_counts) {
    u32 g = 1u << k, mfull = a >> k, nonzero = 0;
    for (u32 j = 0; j < mfull; j++) {
        u64 s = 0;
        for (u32 i = 0; i < g; i++) s += counts[perm[j * g + i]];
        class_counts[j] = s;
        nonzero += s != 0;
    }
    return nonzero;
}

/* Fit the model of (k, width[, tree classes m > 0: version 3, class m - 1 the escape]) to counts/perm, build its
 * tree into `table` and the rank -> class map into `cmap`; the size is filled in later (lzw.py fit_model). */
static void primed_fit(u32 n, u32 a, u32 k, u32 width, u32 m, primed_choice *ch, u32 *table, u8 *cmap) {
    u64 class_counts[256];
    u32 used = class_counts_of(a, k, class_counts);
    if (used < 2) used = 2;
    ch->k = k;
    ch->width = width;
    ch->escape_bits = 0;
    ch->escaped = 0;
    if (m) {
        u32 e = bit_length(used - m);
        ch->escape_bits = e ? e : 1u;
        for (u32 c = m; c < (a >> k); c++) class_counts[m - 1] += class_counts[c];
        ch->escaped = class_counts[m - 1];
        used = m;
    }
    ch->classes = used;
    for (u32 c = 0; c < ch->classes; c++) ch->costs[c] = (u8)class_cost(class_counts[c], n);
    choose_threshold(ch->costs, ch->classes, width, &ch->t, &ch->e);
    enc_build(table, ch->costs, ch->classes, ch->t, ch->e);
    for (u32 r = 0; r < 256; r++) {
        u32 c = r >> k;
        cmap[r] = (u8)(m && c > m - 1 ? m - 1 : c);
    }
}

/* Fill in the sizes of cand[0..count) (their trees are in cand_tables) from one shared pass over the symbols. */
static void primed_sizes(const u8 *sym, u32 n, u32 a, primed_choice *cand, u32 count) {
    u32 codes[MAX_CANDIDATES];
    enc_count_codes(sym, n, count, codes);
    for (u32 j = 0; j < count; j++) {
        cand[j].size = HEADER_SIZE + MODEL_FIXED_SIZE + a + cand[j].classes + ((u64)n * cand[j].k + 7u) / 8u
                       + ((u64)codes[j] * cand[j].width + 7u) / 8u
                       + (cand[j].escaped * cand[j].escape_bits + 7u) / 8u;
    }
}

/* Choose and return the size of the best primed chunk (converter/lzw.py _primed_encode); fills *best. */
static u64 primed_choose(const u8 *sym, u32 n, u32 a, u32 max_code_bits, int escapes, primed_choice *best) {
    for (u32 s = 0; s < 256; s++) counts[s] = 0;
    for (u32 i = 0; i < n; i++) counts[sym[i]]++;
    /* perm: symbols by decreasing count, ties by symbol value (insertion sort, A <= 256) */
    for (u32 s = 0; s < a; s++) {
        u32 j = s;
        while (j > 0 && counts[perm[j - 1]] < counts[s]) { perm[j] = perm[j - 1]; j--; }
        perm[j] = (u8)s;
    }
    for (u32 r = 0; r < a; r++) rank_of[perm[r]] = (u8)r;
    for (u32 s = a; s < 256; s++) rank_of[s] = 0;

    /* every split at the widest width, then the best split at narrower widths; the first of equal sizes wins */
    const u32 top = max_code_bits < PRIMED_CODE_BITS ? max_code_bits : PRIMED_CODE_BITS;
    primed_choice cand[MAX_CANDIDATES];
    u32 count = 0;
    for (u32 k = 0; k <= MAX_SPLIT_BITS; k++) {
        if ((a & ((1u << k) - 1u)) || (a >> k) < 2 || (a >> k) > PRIMED_MAX_CLASSES) continue;
        primed_fit(n, a, k, top, 0, &cand[count], cand_tables[count], cand_cmaps[count]);
        count++;
    }
    if (count == 0) {  /* no split fits PRIMED_MAX_CLASSES: k = 0 */
        primed_fit(n, a, 0, top, 0, &cand[0], cand_tables[0], cand_cmaps[0]);
        count = 1;
    }
    primed_sizes(sym, n, a, cand, count);
    *best = cand[0];
    for (u32 j = 1; j < count; j++) if (cand[j].size < best->size) *best = cand[j];

    count = 0;
    for (u32 width = top - 1; width + PRIMED_WIDTH_TRIES >= top && width >= MIN_CODE_BITS; width--) {
        primed_fit(n, a, best->k, width, 0, &cand[count], cand_tables[count], cand_cmaps[count]);
        count++;
    }
    if (count) primed_sizes(sym, n, a, cand, count);
    for (u32 j = 0; j < count; j++) if (cand[j].size < best->size) *best = cand[j];
    if (!escapes) return best->size;

    /* version 3, a separate search taken only when strictly smaller (never larger than version 2): every split
     * with >= 2 classes and each tried tree size that leaves >= 2 used classes behind the escape (lzw.py
     * escape_candidates), in batches of MAX_CANDIDATES; then the best of them at the narrower widths */
    primed_choice esc;
    esc.size = (u64)-1;
    count = 0;
    for (u32 k = 0; k <= MAX_SPLIT_BITS; k++) {
        if ((a & ((1u << k) - 1u)) || (a >> k) < 2) continue;
        u64 cc[256];
        u32 used = class_counts_of(a, k, cc);
        for (u32 t = 0; t < ESCAPE_TRIES; t++) {
            if (escape_class_tries[t] >= used) continue;
            primed_fit(n, a, k, top, escape_class_tries[t], &cand[count], cand_tables[count], cand_cmaps[count]);
            if (++count == MAX_CANDIDATES) {
                primed_sizes(sym, n, a, cand, count);
                for (u32 j = 0; j < count; j++) if (cand[j].size < esc.size) esc = cand[j];
                count = 0;
            }
        }
    }
    if (count) {
        primed_sizes(sym, n, a, cand, count);
        for (u32 j = 0; j < count; j++) if (cand[j].size < esc.size) esc = cand[j];
    }
    if (esc.size == (u64)-1) return best->size;
    count = 0;
    for (u32 width = top - 1; width + PRIMED_WIDTH_TRIES >= top && width >= MIN_CODE_BITS; width--) {
        primed_fit(n, a, esc.k, width, esc.classes, &cand[count], cand_tables[count], cand_cmaps[count]);
        count++;
    }
    if (count) primed_sizes(sym, n, a, cand, count);
    for (u32 j = 0; j < count; j++) if (cand[j].size < esc.size) esc = cand[j];
    if (esc.size + (esc.size >> 6) < best->size) *best = esc;  /* >= 1/64 smaller: escapes cost decode time */
    return best->size;
}

/* Write the chunk of `best` (its size was checked against the capacity). */
static u32 primed_write(const u8 *sym, u32 n, const qz_header *h, const primed_choice *best, u8 *out) {
    qz_header hh = *h;
    hh.max_code_bits = best->width;
    if (best->escape_bits) hh.version = 3;
    write_header(out, &hh);
    u8 *m = out + HEADER_SIZE;
    m[0] = (u8)best->k; m[1] = (u8)best->escape_bits;
    m[2] = (u8)best->classes; m[3] = (u8)(best->classes >> 8);
    m[4] = (u8)best->t; m[5] = (u8)(best->t >> 8);
    m[6] = (u8)best->e; m[7] = (u8)(best->e >> 8);
    for (u32 r = 0; r < h->alphabet; r++) m[MODEL_FIXED_SIZE + r] = perm[r];
    for (u32 c = 0; c < best->classes; c++) m[MODEL_FIXED_SIZE + h->alphabet + c] = best->costs[c];
    u32 at = HEADER_SIZE + MODEL_FIXED_SIZE + h->alphabet + best->classes;
    u32 room = (u32)best->size - at;
    bit_writer w = {out + at, room, room, 0, 0, 0, 0};
    if (best->k) {
        const u32 mask = (1u << best->k) - 1u;
        for (u32 i = 0; i < n; i++) put_code(&w, rank_of[sym[i]] & mask, best->k);
        finish_bits(&w);
    }
    u32 low_len = w.len;
    bit_writer wc = {out + at + low_len, room - low_len, room - low_len, 0, 0, 0, 0};
    enc_build(enc_table, best->costs, best->classes, best->t, best->e);
    u8 cls_of[256];
    const u32 top = best->classes - 1u;
    for (u32 s = 0; s < 256; s++) {
        u32 c = rank_of[s] >> best->k;
        cls_of[s] = (u8)(best->escape_bits && c > top ? top : c);
    }
    enc_write_codes(sym, n, cls_of, &wc, best->width);
    finish_bits(&wc);
    u32 codes_len = wc.len;
    if (!best->escape_bits) return at + low_len + codes_len;
    u32 used = low_len + codes_len;
    bit_writer we = {out + at + used, room - used, room - used, 0, 0, 0, 0};
    for (u32 i = 0; i < n; i++) {
        u32 c = rank_of[sym[i]] >> best->k;
        if (c >= top) put_code(&we, c - top, best->escape_bits);
    }
    finish_bits(&we);
    return at + used + we.len;
}

/* ============================================================================================================= */
/* Encode API                                                                                                    */
/* ============================================================================================================= */

QZ_API u32 qz_encode_bound(u32 n, u32 layout, u32 flags) {
    u64 packed = layout_nbytes(layout > LAYOUT_U2 ? LAYOUT_U8 : layout, n);
    /* forced dictionary codes: adaptive, at most one 16-bit code and one 16-bit CLEAR per symbol, +8 for the last
     * flush; primed, a model block, at most 7 raw bits and one 12-bit code per symbol (less than that) */
    u64 bound = (flags & QZ_ENC_FORCE_LZW) ? (u64)n * 4u + 8u + MODEL_MAX_SIZE : packed;
    bound += HEADER_SIZE;
    return bound > 0xFFFFFFFFu ? 0xFFFFFFFFu : (u32)bound;
}

QZ_API i32 qz_encode(const u8 *sym, u32 n, u32 alphabet, u32 layout, u32 bias, u32 max_code_bits, u32 flags,
                     u8 *out, u32 out_cap) {
    const u32 known = QZ_ENC_RESET | QZ_ENC_FORCE_LZW | QZ_ENC_FORCE_PACKED | QZ_ENC_V2 | QZ_ENC_ADAPTIVE |
                      QZ_ENC_PRIMED | QZ_ENC_V3;
    if (flags & ~known) return -QZ_BAD_HEADER;
    if ((flags & QZ_ENC_V3) && !(flags & QZ_ENC_V2)) return -QZ_BAD_HEADER;
    if ((flags & QZ_ENC_FORCE_LZW) && (flags & QZ_ENC_FORCE_PACKED)) return -QZ_BAD_HEADER;
    if ((flags & QZ_ENC_ADAPTIVE) && (flags & QZ_ENC_PRIMED)) return -QZ_BAD_HEADER;
    if (!(flags & QZ_ENC_V2) && (flags & QZ_ENC_PRIMED)) return -QZ_BAD_HEADER;  /* version 1 has no primed */
    const int try_lzw = !(flags & QZ_ENC_FORCE_PACKED);
    const int auto_method = !(flags & (QZ_ENC_FORCE_LZW | QZ_ENC_FORCE_PACKED));
    const int v2 = (flags & QZ_ENC_V2) != 0;
    const int try_primed = try_lzw && v2 && !(flags & QZ_ENC_ADAPTIVE);
    const int try_adaptive = try_lzw && !(flags & QZ_ENC_PRIMED);
    qz_header h;  /* checked once per dictionary that will be tried */
    h.version = v2 ? 2u : 1u;
    h.alphabet = alphabet; h.layout = layout; h.bias = bias;
    h.n_symbols = n;
    h.method = METHOD_PACKED; h.max_code_bits = 0; h.flags = 0; h.dictionary = DICT_ADAPTIVE;
    if (!header_ok(&h)) return -QZ_BAD_HEADER;
    h.method = METHOD_LZW; h.max_code_bits = max_code_bits;
    if (try_adaptive) {
        h.flags = flags & QZ_ENC_RESET;
        if (!header_ok(&h)) return -QZ_BAD_HEADER;
    }
    if (try_primed) {
        h.flags = 0; h.dictionary = DICT_PRIMED;
        if (!header_ok(&h)) return -QZ_BAD_HEADER;
    }
    h.out_bytes = layout_nbytes(layout, n);

    u8 any_bad = 0;
    for (u32 i = 0; i < n; i++) any_bad |= sym[i] >= alphabet;
    if (any_bad) return -QZ_BAD_SYMBOL;
    if (out_cap < HEADER_SIZE) return -QZ_OUT_TOO_SMALL;

    const u32 cap = out_cap - HEADER_SIZE;
    const u64 packed = h.out_bytes;
    /* the best chunk so far: its size; compared with `<`, so the earlier of equal sizes stays */
    u64 best = try_lzw ? (u64)-1 : 0;
    primed_choice choice;
    if (try_primed) best = primed_choose(sym, n, alphabet, max_code_bits, (flags & QZ_ENC_V3) != 0, &choice);
    int adaptive_won = 0;
    i32 adaptive_len = 0;
    if (try_adaptive) {
        /* written straight to out; stop as soon as it cannot beat `best` (or packed, in auto mode, or the
         * capacity). put_code flushes 4 bytes at a time: 3 bytes of headroom so the flush past a limit happens. */
        u64 limit = cap;
        if (best != (u64)-1 && best - HEADER_SIZE - 1u < limit) limit = best - HEADER_SIZE - 1u;  /* must be < best */
        if (auto_method && packed < limit) limit = packed;
        u32 stop = limit + 3u < cap ? (u32)limit + 3u : cap;
        bit_writer w = {out + HEADER_SIZE, cap, stop, 0, 0, 0, 0};
        adaptive_len = lzw_encode(sym, n, alphabet, max_code_bits, flags & QZ_ENC_RESET, &w);
        if (adaptive_len >= 0 && (u64)adaptive_len <= limit) {
            adaptive_won = 1;
            best = HEADER_SIZE + (u64)adaptive_len;
        }
    }
    if (try_lzw && (!auto_method || best <= HEADER_SIZE + packed)) {
        if (best == (u64)-1) return -QZ_OUT_TOO_SMALL;  /* forced adaptive that did not fit the capacity */
        if (adaptive_won) {
            h.dictionary = DICT_ADAPTIVE; h.flags = flags & QZ_ENC_RESET;
            write_header(out, &h);
            return (i32)best;
        }
        if (best > out_cap) return -QZ_OUT_TOO_SMALL;
        return (i32)primed_write(sym, n, &h, &choice, out);
    }
    /* packed: forced, or auto with every dictionary chunk larger than the packed one */
    if (packed > cap) return -QZ_OUT_TOO_SMALL;
    h.method = METHOD_PACKED; h.max_code_bits = 0; h.flags = 0; h.dictionary = DICT_ADAPTIVE;
    write_header(out, &h);
    u8 *o = out + HEADER_SIZE;
    if (layout == LAYOUT_U8) {
        for (u32 i = 0; i < n; i++) o[i] = (u8)(sym[i] - (u8)bias);
    } else {
        pack_symbols(sym, n, layout, o);
    }
    return HEADER_SIZE + (i32)packed;
}
