// How long a worker blocked in Atomics.wait takes to wake and answer (the way onnxruntime-web's thread pool hands
// work to a worker that went to sleep): notified after the machine was idle for a macrotask (~1 ms), and after
// 50 us of work on this thread. Node: `node bench/wake_latency.mjs`. Session 18 (docs/page-bench.md): on this
// 2-vCPU machine the first has a tail of milliseconds, which a second onnxruntime-web thread pays at some of its
// many parallel sections a token.
import { Worker, isMainThread, workerData } from "worker_threads";

const N = Number(process.argv[2]) || 2000;
if (isMainThread) {
  const shared = new Int32Array(new SharedArrayBuffer(8));   // [0]: the signal, [1]: answers so far
  new Worker(new URL(import.meta.url), { workerData: shared.buffer });
  await new Promise((r) => setTimeout(r, 200));
  for (const [label, gap] of [["notified after an idle macrotask", null], ["notified after 50 us of work", 50]]) {
    const us = [];
    for (let i = 0; i < N; i++) {
      if (gap) { const end = performance.now() + gap / 1000; while (performance.now() < end); }
      else await new Promise((r) => setTimeout(r, 0));
      const t0 = performance.now();
      Atomics.store(shared, 0, 1);
      Atomics.notify(shared, 0);
      while (Atomics.load(shared, 1) !== i + 1);
      us.push((performance.now() - t0) * 1000);
      Atomics.store(shared, 0, 0);
    }
    us.sort((a, b) => a - b);
    const q = (p) => us[Math.min(N - 1, Math.floor(N * p))].toFixed(0);
    console.log(`${label}: wake round trip p10 ${q(0.1)} p50 ${q(0.5)} p90 ${q(0.9)} p99 ${q(0.99)} us`);
    Atomics.store(shared, 1, 0);
  }
  process.exit(0);
} else {
  const shared = new Int32Array(workerData);
  for (;;) {
    Atomics.wait(shared, 0, 0);                      // blocks until notified (returns at once if already 1)
    Atomics.add(shared, 1, 1);
    while (Atomics.load(shared, 0) === 1);          // wait for the main thread to reset the signal
  }
}
