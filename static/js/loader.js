// Loading pipeline: manifest -> blobs streamed with progress -> chunks decoded in the worker pool as soon as their
// bytes have arrived -> SHA-256 checked -> initializer buffers for onnxruntime-web. Compressed files are kept in
// the Cache API under their SHA-256, so a reload needs no network and a new bundle version misses the cache.

import { placeKn, placePieces } from "./kn.js";

const CACHE_NAME = "tiny-qmoe-v1";

export class BundleError extends Error {}

const F32 = new Float32Array(1), U32 = new Uint32Array(F32.buffer);
/** IEEE half (as its 16 bits) -> number, exactly. */
function halfToFloat(h) {
  const sign = (h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp === 0x1f) U32[0] = sign | 0x7f800000 | (mant << 13);            // inf, NaN
  else if (exp !== 0) U32[0] = sign | ((exp + 112) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  else if (mant === 0) U32[0] = sign;                                      // zero
  else return (sign ? -1 : 1) * mant * 2 ** -24;                           // subnormal
  return F32[0];
}

async function sha256Hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function openCache() {
  try { return await caches.open(CACHE_NAME); } catch { return null; }   // e.g. storage disabled
}

/** Fetch a file, from the cache when its hash matches; streams with onBytes(n) progress. */
async function fetchFile(url, expect, onBytes, stats) {
  const cache = await openCache();
  const key = `${url}?sha256=${expect.sha256}`;
  stats.cacheKeys.push(key);
  if (cache) {
    const hit = await cache.match(key);
    if (hit) {
      const buf = new Uint8Array(await hit.arrayBuffer());
      if (buf.length === expect.bytes) { stats.cachedBytes += buf.length; onBytes(buf, buf.length, true); return buf; }
    }
  }
  let res;
  try { res = await fetch(url, { cache: "no-cache" }); }
  catch (e) { throw new BundleError(`${url}: download failed (${e.message}) and it is not in the browser cache`); }
  if (!res.ok) throw new BundleError(`${url}: HTTP ${res.status}`);
  const buf = new Uint8Array(expect.bytes);
  let got = 0;
  const reader = res.body.getReader();
  for (;;) {
    let step;
    try { step = await reader.read(); }
    catch (e) { throw new BundleError(`${url}: download interrupted at byte ${got} (${e.message})`); }
    if (step.done) break;
    if (got + step.value.length > buf.length) throw new BundleError(`${url}: more than the ${buf.length} bytes the manifest lists`);
    buf.set(step.value, got);
    got += step.value.length;
    stats.networkBytes += step.value.length;
    onBytes(buf, got, false);
  }
  if (got !== buf.length) throw new BundleError(`${url}: ${got} bytes received, manifest lists ${buf.length}`);
  if (cache && !stats.failed) {
    // the Response copies the bytes as it is made (fetch spec: extract a body), so buf needs no copy of its own
    try { await cache.put(key, new Response(buf)); } catch (e) { stats.cacheErrors.push(String(e)); }
  }
  return buf;
}

/** A load that failed leaves none of its files in the cache: a file damaged in transit (right length, wrong bytes)
 * or on disk would otherwise be read back, and fail again, on every reload. Fetches still in flight see
 * stats.failed and do not store theirs. */
async function forgetCached(stats) {
  stats.failed = true;
  const cache = await openCache();
  if (cache) await Promise.all(stats.cacheKeys.map((k) => cache.delete(k).catch(() => false)));
}

/** After a load: the cache's entries for the files this load used, kept under another SHA-256 — an earlier
 * version of the bundle — are deleted, so a rebuilt bundle does not leave its old bytes in the browser's storage
 * (a new version only missed them). Files of the bundle this load did not use (another graph) are left. Returns
 * how many entries went. */
async function pruneSuperseded(stats) {
  const cache = await openCache();
  if (!cache || stats.failed) return 0;
  const used = new Set(stats.cacheKeys.map((k) => new URL(k, location.href).href));
  const files = new Set([...used].map((k) => k.split("?sha256=")[0]));
  let pruned = 0;
  for (const req of await cache.keys()) {
    const [file, sha] = req.url.split("?sha256=");
    if (sha !== undefined && files.has(file) && !used.has(req.url) && await cache.delete(req)) pruned++;
  }
  return pruned;
}

/** A graph or tokenizer file stored as QZ chunks (manifest "qz": file, bytes, chunk table): fetched (or read from the cache
 * under the decoded file's SHA-256) and decoded in the worker pool like the weights. */
async function fetchQzFile(base, name, info, pool, stats) {
  const q = info.qz;
  const src = await fetchFile(base + q.file, { bytes: q.bytes, sha256: info.sha256 }, () => {}, stats);
  const out = new Uint8Array(info.bytes);
  await Promise.all(q.chunks.map(async ([off, len, nSym, , outOff], k) => {
    const where = `${q.file}: chunk ${k} at byte offset ${off}`;
    if (off + len > src.length || outOff + nSym > out.length) throw new BundleError(`${where}: outside the file`);
    const dec = await pool.decode(src.slice(off, off + len).buffer, where);
    if (dec.length !== nSym) throw new BundleError(`${where}: decoded ${dec.length} bytes, manifest says ${nSym}`);
    out.set(dec, outOff);
  }));
  return out;
}

/** A graph, tokenizer or tables file stored as one zlib (deflate) stream (manifest "deflate": file, bytes; format
 * version 3), inflated by the browser's DecompressionStream; never more than the manifest's byte count is kept. */
async function fetchDeflateFile(base, name, info, stats) {
  const z = info.deflate;
  const src = await fetchFile(base + z.file, { bytes: z.bytes, sha256: info.sha256 }, () => {}, stats);
  const out = new Uint8Array(info.bytes);
  let got = 0;
  const reader = new Blob([src]).stream().pipeThrough(new DecompressionStream("deflate")).getReader();
  for (;;) {
    let step;
    try { step = await reader.read(); }
    catch (e) { throw new BundleError(`${z.file}: not a valid zlib (deflate) stream (${e.message})`); }
    if (step.done) break;
    if (got + step.value.length > out.length) {
      reader.cancel().catch(() => {});
      throw new BundleError(`${z.file}: decodes to more than the ${out.length} bytes the manifest lists`);
    }
    out.set(step.value, got);
    got += step.value.length;
  }
  if (got !== out.length) throw new BundleError(`${z.file}: decodes to ${got} bytes, manifest says ${out.length}`);
  return out;
}

/** A graph, tokenizer or tables file as the manifest lists it (plain, as QZ chunks or as a deflate stream): its
 * bytes, checked against the manifest's SHA-256. */
async function fetchStoredFile(base, name, info, pool, stats) {
  const bytes = info.qz ? await fetchQzFile(base, name, info, pool, stats)
    : info.deflate ? await fetchDeflateFile(base, name, info, stats)
    : await fetchFile(base + name, info, () => {}, stats);
  if (await sha256Hex(bytes) !== info.sha256) throw new BundleError(`${name}: SHA-256 mismatch`);
  return bytes;
}

/**
 * @param {string} base bundle URL ending in "/"
 * @param {import("./qz.js").DecoderPool} pool
 * @param {(p: {stage: string, done: number, total: number}) => void} progress
 * @param {string} variant the graph that will run: "graph" (model.onnx), "graph_fp16" or "graph_wasm"; model.onnx
 *   when the bundle has no such variant (the result's graphVariant says which was fetched)
 * @param {{into?: boolean, onManifest?: (m: object) => void}} opts into: false: every chunk comes back to this
 *   thread to be put in place (the old path, for A/B runs); onManifest: called with the manifest (tables merged in)
 *   before the weights are fetched
 */
export async function loadBundle(base, pool, progress, variant = "graph", { into = true, onManifest = null } = {}) {
  const stats = { networkBytes: 0, cachedBytes: 0, cacheErrors: [], cacheKeys: [], failed: false };
  try {
    return await loadFiles(base, pool, progress, variant, stats, into, onManifest);
  } catch (e) {
    await forgetCached(stats);
    throw e;
  }
}

async function loadFiles(base, pool, progress, variant, stats, into, onManifest) {
  const t = { start: performance.now() };
  let manifestText;
  const cache = await openCache();
  try {
    const res = await fetch(base + "manifest.json", { cache: "no-cache" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    manifestText = await res.text();
    if (cache) await cache.put(base + "manifest.json", new Response(manifestText)).catch(() => {});
  } catch (e) {
    const hit = cache && await cache.match(base + "manifest.json");
    if (!hit) throw new BundleError(`${base}manifest.json: ${e.message}`);
    manifestText = await hit.text();
  }
  let m;
  try { m = JSON.parse(manifestText); } catch (e) { throw new BundleError(`manifest.json: invalid JSON (${e.message})`); }
  if (m.format !== "tiny-qmoe-bundle" || ![1, 2, 3].includes(m.version)) throw new BundleError(`manifest.json: format ${m.format} v${m.version} is not supported`);
  if (m.version >= 2) {   // tensors and initializers live in tables.json (compressed when that saves): merge them in
    const ti = m.tables;
    if (!ti || ti.file !== "tables.json") throw new BundleError("manifest.json: tables: missing or not tables.json");
    const bytes = await fetchStoredFile(base, ti.file, ti, pool, stats);
    let tables;
    try { tables = JSON.parse(new TextDecoder().decode(bytes)); } catch (e) { throw new BundleError(`${ti.file}: invalid JSON (${e.message})`); }
    if (!Array.isArray(tables.tensors) || !Array.isArray(tables.initializers)) throw new BundleError(`${ti.file}: needs tensors and initializers lists`);
    m.tensors = tables.tensors;
    m.initializers = tables.initializers;
  }
  if (onManifest) onManifest(m);

  // A chunk's bytes go to its out_offset; a float tensor stored as byte planes (manifest "planes": its item size,
  // plane p = byte p of every element) has them put back at that stride — the copy happens anyway.
  const place = (dst, out, outOff, e) => {
    const cut = piecesOf(e);
    if (cut) { placePieces(out, { dst, ...cut, outOff }); return; }
    const P = e.planes ?? 1;
    if (P === 1) { dst.set(out, outOff); return; }
    const planeLen = e.nbytes / P, p = Math.floor(outOff / planeLen);
    for (let i = 0, j = (outOff - p * planeLen) * P + p; i < out.length; i++, j += P) dst[j] = out[i];
  };
  // The wasm graph reads group-scheme codes transposed, one per byte (manifest graph_wasm.transposed: NAME ->
  // whether NAME itself is read too): each decoded chunk's codes go to their [k][n] places of the (K, N) array
  // NAME.kn as the chunk is placed, so onnxruntime never sees the packed copy (converter/layouts.transposed_codes).
  // int4-mG's codes (manifest graph_wasm.multiplied, likewise) are placed the same way; once their zero points and
  // multipliers are decoded too, (q - z)·m is written over them as int8 (foldMultiplied, below).
  const multiplied = (m[variant] && m[variant].multiplied) || {};
  const transposed = { ...((m[variant] && m[variant].transposed) || {}), ...multiplied };   // (a variant the bundle lacks: none)
  const perByte = (e) => 8 / [8, 4, 2][e.layout];                   // codes per byte of layout u8 / u4 / u2
  // ... and the scales and zero points of those codes as (n_blocks, 1, 1, N) tables, float32 scales and one zero
  // point per byte (manifest graph_wasm.group_tables: NAME -> whether NAME itself is read too), made once NAME is
  // decoded (converter/layouts.group_table). Built in the graph instead, onnxruntime-web folded them at session
  // creation, and its wasm heap, which never shrinks, kept the peak of that: 207 instead of 172 MiB for SmolLM2
  // int4-g32 (README).
  const groupTables = (m[variant] && m[variant].group_tables) || {};
  const byName = new Map(m.initializers.map((e) => [e.name, e]));
  const groupTable = (src, e, codes) => {
    if (!src || !e || !codes) throw new BundleError(`graph_wasm.group_tables: ${e ? e.name : "an entry"} has no codes initializer`);
    const [N, nb] = codes.shape, per = perByte(codes), bits = 8 / per, rowBytes = Math.ceil(nb / per);
    const want = e.dtype === "float16" ? 2 * N * nb : N * rowBytes;
    if (src.length !== want) throw new BundleError(`${e.name}: ${src.length} bytes, but ${codes.name} has ${N} x ${nb} groups (${want} bytes)`);
    if (e.dtype === "float16") {
      const h = new Uint16Array(src.buffer, src.byteOffset, N * nb), out = new Float32Array(nb * N);
      for (let n = 0; n < N; n++) for (let j = 0; j < nb; j++) out[j * N + n] = halfToFloat(h[n * nb + j]);
      return new Uint8Array(out.buffer);
    }
    const out = new Uint8Array(nb * N), mask = (1 << bits) - 1;
    for (let n = 0; n < N; n++) for (let j = 0; j < nb; j++) out[j * N + n] = (src[n * rowBytes + Math.floor(j / per)] >> (bits * (j % per))) & mask;
    return out;
  };
  // int4-mG's zero points and multipliers (packed as zero points are) as one-per-byte (n_blocks, N) tables
  const int4mTables = (weight, parts, codes) => parts.map((part) => {
    const name = weight + part;
    if (!outputs.has(name) || !byName.has(name)) throw new BundleError(`${weight}: int4-mG needs ${name}`);
    return groupTable(outputs.get(name), byName.get(name), codes);
  });
  const dropOutputs = (names) => {
    for (const name of names) {
      outputs.get(name).buffer.transfer?.(0);                                   // now, not at the next GC
      outputs.delete(name);
    }
  };
  // int4-mG in the wasm graph: the weights are exactly int8 codes (q - z)·m times one scale per row, m in 1..8
  // (converter/layouts.multiplied_codes). Written over NAME.kn in place, group by group; the graph reads neither
  // the zero points nor the multipliers, so they go.
  const foldMultiplied = (name) => {
    const e = byName.get(name), base = name.replace(/\.q$/, ""), kn = outputs.get(name + ".kn");
    const [N, nb] = e.shape, { K, width } = knShape(e), block = K / nb;
    const [z, mu] = int4mTables(base, [".zeros", ".mults"], e);
    if (width) {                                         // (N / width, K, width): piece by piece, row k of each
      for (let p = 0, at = 0; p < N / width; p++) {
        for (let k = 0; k < K; k++) {
          for (let c = 0, t = Math.floor(k / block) * N + p * width; c < width; c++, at++, t++) kn[at] = (kn[at] - z[t]) * mu[t];
        }
      }
    } else {
      for (let j = 0; j < nb; j++) {
        for (let i = 0, at = j * block * N; i < block; i++) {
          for (let n = 0, t = j * N; n < N; n++, at++, t++) kn[at] = (kn[at] - z[t]) * mu[t];   // int8 in a Uint8Array
        }
      }
    }
    dropOutputs([base + ".zeros", base + ".mults"]);
  };
  // int4-mG on model.onnx and the float16 graph: MatMulNBits' block scales, row scale × multiplier in float32
  // (manifest graph.block_scales: the weights NAME; converter/layouts.block_scales). The graph reads neither part.
  const makeBlockScales = (w) => {
    const codes = byName.get(w + ".q"), rows = outputs.get(w + ".row_scales");
    if (!codes || !rows || rows.length !== 2 * codes.shape[0]) throw new BundleError(`block_scales: ${w} needs its codes and one float16 scale per row`);
    const [N, nb] = codes.shape, [mu] = int4mTables(w, [".mults"], codes);
    const h = new Uint16Array(rows.buffer, rows.byteOffset, N), out = new Float32Array(N * nb);
    for (let n = 0; n < N; n++) {
      const r = halfToFloat(h[n]);
      for (let j = 0; j < nb; j++) out[n * nb + j] = r * mu[j * N + n];
    }
    outputs.set(w + ".scales", new Uint8Array(out.buffer));
    dropOutputs([w + ".row_scales", w + ".mults"]);
  };
  // The wasm graph reads int8 (K, N) tables — an int8 embedding's (H, V), int8 layer codes, int4-mG's multiplied
  // codes NAME.kn — as (N/n, K, n) pieces of n columns (manifest graph_wasm.pieces: NAME -> n;
  // converter/layouts.column_pieces): each matmul is then one batched GEMM, up to 2× faster in onnxruntime-web's
  // wasm kernels than one GEMM of N columns. The decoded bytes are placed in that order straight away (placePieces,
  // placeKn's width), so no table is held twice or permuted after decoding.
  const pieces = gi => (gi && gi.pieces) || {};
  const piecesOf = (e) => {   // an initializer the graph reads in pieces: where its bytes go
    const width = pieces(m[variant])[e.name];
    return width ? { N: e.shape[1], K: e.shape[0], width } : null;
  };
  const knShape = (e) => {   // the (K, N) one-per-byte transposed codes of codes initializer e
    const per = perByte(e), N = e.shape[0], K = e.shape[1] * e.shape[2] * per;
    const width = e.name in multiplied ? pieces(m[variant])[e.name + ".kn"] : undefined;
    return { per, N, K, bytes: K * N, width };
  };
  // One output buffer per initializer the graph reads; chunks grouped by blob. A tensor's buffers are made and
  // filled by the one worker that decodes all of its chunks, transposed codes included, and come back whole
  // (DecoderPool.decodeTensor): no buffer per chunk and no copy on this thread (bench/codec.py), and they are
  // ordinary ArrayBuffers, which the page frees the moment onnxruntime-web has copied them into its heap. Only
  // float byte planes (and, with ?into=0, everything: the old path, for A/B runs) are put in place here.
  const direct = (e) => into && (e.planes ?? 1) === 1;
  const outputs = new Map();
  pool.onTensor = (name, { plain, kn }) => {
    if (plain) outputs.set(name, new Uint8Array(plain));
    if (kn) outputs.set(name + ".kn", new Uint8Array(kn));
  };
  const byBlob = m.blobs.map(() => []);
  for (const e of m.initializers) {
    if (!direct(e) && e.name in transposed) outputs.set(e.name + ".kn", new Uint8Array(knShape(e).bytes));
    if (!direct(e) && (transposed[e.name] ?? true)) outputs.set(e.name, new Uint8Array(e.nbytes));
    e.chunks.forEach((c, k) => byBlob[e.blob].push({ init: e, k, off: c[0], len: c[1], outOff: c[4] }));
  }
  for (const list of byBlob) list.sort((a, b) => a.off - b.off);
  const graphVariant = m[variant] ? variant : "graph";
  const gi = m[graphVariant];
  const totalBytes = m.blobs.reduce((s, b) => s + b.bytes, 0) + (gi.qz || gi.deflate || gi).bytes;
  let received = 0, chunksInto = 0, chunksCopied = 0;
  const decodes = [];
  t.decodeStart = null;

  const blobs = m.blobs.map(async (b, bi) => {
    const list = byBlob[bi];
    let next = 0, prev = 0;
    const buf = await fetchFile(base + b.file, b, (data, got) => {
      received += got - prev; prev = got;
      progress({ stage: "download", done: received, total: totalBytes });
      while (next < list.length && list[next].off + list[next].len <= got) {  // decode while downloading
        const c = list[next++];
        if (t.decodeStart === null) t.decodeStart = performance.now();
        const where = `${b.file}: initializer ${c.init.name} chunk ${c.k} at byte offset ${c.off}`;
        const expectLen = (c.k + 1 < c.init.chunks.length ? c.init.chunks[c.k + 1][4] : c.init.nbytes) - c.outOff;
        const wrong = (n) => new BundleError(`${where}: decoded ${n} bytes, manifest says ${expectLen}`);
        if (direct(c.init)) {
          if (c.outOff < 0 || expectLen < 0 || c.outOff + expectLen > c.init.nbytes) throw new BundleError(`${where}: outside its initializer`);
          const e = c.init, name = e.name;
          const kn = name in transposed ? knShape(e) : null;
          const target = { key: name, chunks: e.chunks.length, nbytes: (transposed[name] ?? true) ? e.nbytes : 0, kn,
                           pieces: piecesOf(e), outOff: c.outOff, bytes: expectLen };
          chunksInto++;
          decodes.push(pool.decodeTensor(data.slice(c.off, c.off + c.len).buffer, target, where).then((n) => {
            if (n !== expectLen) throw wrong(n);
          }));
          continue;
        }
        chunksCopied++;
        decodes.push(pool.decode(data.slice(c.off, c.off + c.len).buffer, where).then((out) => {
          if (out.length !== expectLen) throw wrong(out.length);
          const name = c.init.name;
          if (name in transposed) placeKn(out, { dst: outputs.get(name + ".kn"), ...knShape(c.init), outOff: c.outOff });
          if (outputs.has(name)) place(outputs.get(name), out, c.outOff, c.init);
        }));
      }
    }, stats);
    if (await sha256Hex(buf) !== b.sha256) throw new BundleError(`${b.file}: SHA-256 mismatch (corrupted download or cache)`);
    // every chunk was copied out for the decoders as it arrived: the blob's bytes can go now, not at the next GC
    buf.buffer.transfer?.(0);
  });
  const graph = fetchStoredFile(base, gi.file, gi, pool, stats);
  await Promise.all(blobs);
  t.downloaded = performance.now();
  await Promise.all(decodes);
  for (const e of m.initializers) {   // every tensor the workers built is back (a chunkless one is empty)
    if (!direct(e)) continue;
    const want = [...((transposed[e.name] ?? true) ? [e.name] : []), ...(e.name in transposed ? [e.name + ".kn"] : [])];
    for (const name of want) {
      if (outputs.has(name)) continue;
      if (e.chunks.length || e.nbytes) throw new BundleError(`initializer ${e.name}: its chunks did not fill it`);
      outputs.set(name, new Uint8Array(0));
    }
  }
  for (const [name, keep] of Object.entries(groupTables)) {
    outputs.set(name + ".kn", groupTable(outputs.get(name), byName.get(name), byName.get(name.replace(/\.[a-z]+$/, ".q"))));
    if (!keep) {
      outputs.get(name).buffer.transfer?.(0);                                   // now, not at the next GC
      outputs.delete(name);
    }
  }
  for (const name of Object.keys(multiplied)) foldMultiplied(name);
  for (const w of gi.block_scales || []) makeBlockScales(w);
  for (const [name, width] of Object.entries(pieces(gi))) {   // placed in pieces already: renamed
    const codes = name.endsWith(".kn") ? byName.get(name.slice(0, -3)) : null;
    const e = byName.get(name), cut = codes ? knShape(codes) : e && piecesOf(e), table = outputs.get(name);
    if (!cut || !table || cut.width !== width || cut.N % width || table.length !== cut.K * cut.N) throw new BundleError(`graph_wasm.pieces: ${name} cannot be cut every ${width} columns`);
    outputs.delete(name);
    outputs.set(name + ".pieces", table);
  }
  t.decoded = performance.now();
  const graphBytes = await graph;
  const tok = {};
  for (const [name, info] of Object.entries(m.tokenizer)) {
    tok[name] = new TextDecoder().decode(await fetchStoredFile(base, name, info, pool, stats));
  }
  t.end = performance.now();
  stats.prunedEntries = await pruneSuperseded(stats);
  /** Another graph ("graph", "graph_fp16", "graph_wasm"), e.g. when WebGPU fails and the WASM EP takes over; null
   * if the bundle has none. Its QZ chunks decode in the pool, so call it before terminating the pool. */
  const fetchGraph = async (key) => {
    const g = m[key];
    if (!g) return null;
    try {
      return await fetchStoredFile(base, g.file, g, pool, stats);
    } catch (e) {
      await forgetCached(stats);
      throw e;
    }
  };
  return {
    manifest: m, manifestText, graph: graphBytes, graphVariant, fetchGraph, tokenizer: tok,
    externalData: [...outputs].map(([path, data]) => ({ path, data })),
    timings: { downloadMs: t.downloaded - t.start, decodeMs: t.decoded - (t.decodeStart ?? t.decoded),
               decodeAfterDownloadMs: t.decoded - t.downloaded, totalMs: t.end - t.start,
               workerDecodeMs: pool.decodeMs, chunksInto, chunksCopied },
    stats,
  };
}
