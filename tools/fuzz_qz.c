/* fuzz_qz.c — libFuzzer harness for static/wasm/qz.c (run it with tools/fuzz.sh).
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined tools/fuzz_qz.c -o fuzz_qz
 *
 * Each input is used twice:
 *   1. as a chunk: qz_decode into a heap buffer of exactly the declared output size (ASan catches any write past
 *      it, or any read past the input). A chunk that decodes is unpacked to symbols, re-encoded with the same
 *      parameters and decoded again: the output must not change.
 *   2. as symbols: bytes 0..3 choose alphabet, layout, bias, max_code_bits, flags, format version / dictionary
 *      and method; the rest (mod the alphabet) is encoded, decoded, and must come back unchanged. Forced LZW and
 *      forced packed must also decode to the same bytes as the automatic choice.
 * Any mismatch aborts (a crash for libFuzzer).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../static/wasm/qz.c"

enum { MAX_OUTPUT = 1 << 20 };  /* skip chunks declaring more than 1 MiB of output (allocation cost, not bugs) */

static void check(int ok) {
    if (!ok) abort();
}

static u32 per_byte(u32 layout) { return layout == LAYOUT_U8 ? 1u : layout == LAYOUT_U4 ? 2u : 4u; }

/* output bytes -> symbols (one per byte), the inverse of the layouts */
static void unpack(const u8 *out, u32 n, u32 layout, u32 bias, u8 *sym) {
    u32 per = per_byte(layout), bits = 8 / per, mask = (1u << bits) - 1u;
    for (u32 i = 0; i < n; i++) {
        sym[i] = layout == LAYOUT_U8 ? (u8)(out[i] + bias) : (u8)((out[i / per] >> (bits * (i % per))) & mask);
    }
}

/* encode, decode into an exact-size buffer, return the output (caller frees) and its length */
static u8 *encode_decode(const u8 *sym, u32 n, u32 a, u32 layout, u32 bias, u32 mcb, u32 flags, i32 *out_len) {
    u32 cap = qz_encode_bound(n, layout, flags);
    u8 *chunk = malloc(cap);
    i32 len = qz_encode(sym, n, a, layout, bias, mcb, flags, chunk, cap);
    check(len >= HEADER_SIZE);
    check(qz_decoded_size(chunk, (u32)len) == (i32)layout_nbytes(layout, n));
    u32 size = (u32)layout_nbytes(layout, n);
    u8 *out = malloc(size ? size : 1);
    i32 got = qz_decode(chunk, (u32)len, out, size);
    check(got == (i32)size);
    free(chunk);
    *out_len = got;
    return out;
}

static void fuzz_decode(const u8 *data, u32 size) {
    i32 want = qz_decoded_size(data, size);
    if (want < 0 || want > MAX_OUTPUT) {
        if (want >= 0) return;
        u8 dummy[1];
        check(qz_decode(data, size, dummy, 0) == want);  /* the header error, before touching out */
        return;
    }
    u8 *out = malloc(want ? (u32)want : 1u);
    i32 got = qz_decode(data, size, out, (u32)want);
    check(got == want || (got < 0 && got >= -QZ_BAD_SYMBOL) || got == -QZ_NO_MEMORY);
    if (got == want && want > 0) {
        /* round trip: re-encode the decoded symbols with the same parameters */
        u32 a = (u32)data[4] | (u32)data[5] << 8, layout = data[6], bias = data[7];
        u32 n = (u32)data[12] | (u32)data[13] << 8 | (u32)data[14] << 16 | (u32)data[15] << 24;
        u8 *sym = malloc(n);
        unpack(out, n, layout, bias, sym);
        for (u32 i = 0; i < n; i++) check(sym[i] < a);
        u32 mcb = data[3] == METHOD_LZW ? data[8] : 16u;
        i32 len2;
        u8 *out2 = encode_decode(sym, n, a, layout, bias, mcb, data[9] & 1u, &len2);
        check(len2 == want && memcmp(out, out2, (u32)want) == 0);
        free(out2);
        free(sym);
    }
    free(out);
}

static void fuzz_encode(const u8 *data, u32 size) {
    if (size < 4) return;
    static const u32 alphabets[8] = {2, 3, 4, 5, 16, 17, 255, 256};
    u32 a = alphabets[data[0] & 7];
    u32 layout = (data[0] >> 3) % 3;
    while (a > (layout == LAYOUT_U8 ? 256u : layout == LAYOUT_U4 ? 16u : 4u)) layout--;  /* a pairing that fits */
    u32 bias = layout == LAYOUT_U8 ? data[1] : 0;
    u32 mcb = 9 + (data[2] & 7);
    if ((1u << mcb) <= a + 1) mcb = 16;
    /* bits 2..3 of byte 3: version 1, or version 2 with the encoder's choice / adaptive only / primed only */
    static const u32 versions[4] = {0, QZ_ENC_V2, QZ_ENC_V2 | QZ_ENC_ADAPTIVE, QZ_ENC_V2 | QZ_ENC_PRIMED};
    u32 flags = (data[3] & 1u) | versions[data[3] >> 2 & 3];
    u32 n = size - 4;
    u8 *sym = malloc(n ? n : 1);
    int skew = data[3] >> 1 & 1;  /* half the inputs: small symbols, so LZW finds strings */
    for (u32 i = 0; i < n; i++) sym[i] = (u8)((skew ? data[4 + i] & 3 : data[4 + i]) % a);

    u32 expect = (u32)layout_nbytes(layout, n);
    u8 *want = malloc(expect ? expect : 1);
    for (u32 i = 0; i < expect; i++) want[i] = 0;
    for (u32 i = 0; i < n; i++) {
        u32 per = per_byte(layout), bits = 8 / per;
        want[i / per] |= (u8)((layout == LAYOUT_U8 ? (u8)(sym[i] - bias) : sym[i]) << (bits * (i % per)));
    }
    static const u32 methods[3] = {0, QZ_ENC_FORCE_LZW, QZ_ENC_FORCE_PACKED};
    for (int m = 0; m < 3; m++) {
        i32 len;
        u8 *out = encode_decode(sym, n, a, layout, bias, mcb, flags | methods[m], &len);
        check((u32)len == expect && memcmp(out, want, expect) == 0);
        free(out);
    }
    free(want);
    free(sym);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > (1u << 20)) return 0;
    fuzz_decode(data, (u32)size);
    fuzz_encode(data, (u32)size);
    return 0;
}
