// The page's offline copy (opt-in: the "Keep for offline use" button, app.js `keepOffline`). Once registered, every
// same-origin GET the page and its workers make goes to the network first and, when it answers, a copy of the
// response is kept here (the page, its modules and wasm, onnxruntime-web, Pyodide and its standard library, the
// runtime's Python files, the bundle list, manifests and tokenizers). When the network does not answer, the kept
// copy is served, so a reload with the network off still loads and chats. Bundle blobs (*.qzb) are not kept here:
// loader.js keeps them in its own cache under their SHA-256, and a second copy would double the storage. Served at
// /sw.js (web/app.py) so that its scope is the whole site.
const CACHE = "tiny-qmoe-offline-v1";

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

/** Requests this worker answers: same-origin GETs of whole files, except bundle blobs. */
function handled(request) {
  if (request.method !== "GET" || request.headers.has("range")) return false;
  const url = new URL(request.url);
  return url.origin === self.location.origin && !url.pathname.endsWith(".qzb") && url.pathname !== "/sw.js";
}

/** The key a response is kept under: a navigation to the page is the page whatever its query (?bundle=...). */
function keyOf(request) {
  const url = new URL(request.url);
  return request.mode === "navigate" ? `${url.origin}${url.pathname}` : request.url;
}

async function keep(cache, key, response) {
  // the same bytes again (same ETag) are not written twice: onnxruntime-web's and Pyodide's wasm are ~20 MB
  const old = await cache.match(key);
  const tag = response.headers.get("etag");
  if (old && tag && old.headers.get("etag") === tag) return;
  await cache.put(key, response);
}

async function answer(event) {
  const request = event.request;
  const cache = await caches.open(CACHE);
  const key = keyOf(request);
  let response;
  try {
    response = await fetch(request);
  } catch (e) {
    const kept = await cache.match(key);
    if (kept) return kept;
    throw e;
  }
  if (response.ok && response.status === 200) event.waitUntil(keep(cache, key, response.clone()));
  return response;
}

self.addEventListener("fetch", (event) => {
  if (handled(event.request)) event.respondWith(answer(event));
});
