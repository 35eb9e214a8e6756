// The WASM graph's transposed codes (converter/layouts.transposed_codes), placed chunk by chunk: shared by the
// decoder workers (qz-worker.js, which place them in SharedArrayBuffers) and the loader (loader.js, on a page that
// is not cross-origin isolated).

/** Put a decoded chunk's codes — `per` codes a byte, low bits first, rows of K codes starting at byte outOff of an
 * (N, K) tensor — one per byte at their [k][n] places of the (K, N) array dst; with `width` (the wasm graph reads
 * the matrix in pieces of that many columns, converter/layouts.column_pieces) at their [n / width][k][n % width]
 * places of the (N / width, K, width) array instead. */
export function placeKn(src, { dst, per, N, K, outOff, width }) {
  const bits = 8 / per, mask = (1 << bits) - 1, step = width || N;
  const rowStart = width ? (n) => Math.floor(n / width) * K * width + (n % width) : (n) => n;
  const s = outOff * per;
  let n = Math.floor(s / K), k = s - n * K, at = rowStart(n) + k * step;
  for (let i = 0; i < src.length; i++) {
    let v = src[i];
    for (let j = 0; j < per; j++, v >>= bits) {
      dst[at] = v & mask;
      if (++k === K) { k = 0; n++; at = rowStart(n); } else at += step;
    }
  }
}

/** Put a decoded chunk of an int8 (K, N) table — bytes from offset outOff of the row-major table — at their
 * [n / width][k][n % width] places of the (N / width, K, width) array dst (the wasm graph's pieces,
 * converter/layouts.column_pieces): runs of up to `width` bytes at a time. */
export function placePieces(src, { dst, N, K, width, outOff }) {
  for (let i = 0, o = outOff; i < src.length;) {
    const k = Math.floor(o / N), n = o - k * N, c = n % width;
    const run = Math.min(width - c, src.length - i);
    dst.set(src.subarray(i, i + run), (n - c) * K + k * width + c);
    i += run; o += run;
  }
}
