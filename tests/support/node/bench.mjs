// The Socket.IO clients of the load benchmark (benches/load): many socket.io-client 4.x sockets in
// this one Node process, speaking the benchmark's JSON lines as its Rust client does for /ws
// (benches/load/client.rs).
//
//   node bench.mjs SPEC    SPEC: {"scenario": "fanout", "addrs", "subscribers", "expected"}
//                              | {"scenario": "idle", "addr", "connections", "polling_first"?,
//                                 "unacknowledged_joins"?}
//
// A fan-out's sockets connect to the servers at `addrs` in turn (the nodes of a cluster), and
// the reply is asked for on the first.
//
// Connects and joins every socket (each join acknowledged), prints {"ready": true}; on the line
// "go" runs and prints the outcome (the Rust client's Outcome fields); on "stop" or the end of
// input exits. Sockets use the websocket transport only: polling 10,000 clients would measure
// this process more than the server. An idle spec with "polling_first" connects as the
// client's default options do, polling first and then upgrading.

import { createInterface } from "node:readline";
import { io } from "socket.io-client";

const spec = JSON.parse(process.argv[2]);
const urls = (spec.addrs ?? [spec.addr]).map((addr) => `http://${addr}`);
// Connections being opened at once, so that the server's listen backlog is never overrun.
const OPENING = 200;
const ATTEMPTS = 20;
// The longest a fan-out may take.
const WAIT_MS = 120_000;

const input = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

function say(value) {
  process.stdout.write(JSON.stringify(value) + "\n");
}

async function waitFor(word) {
  for (;;) {
    const { value, done } = await input.next();
    if (done || value.trim() === word) return;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function connectOnce(url) {
  return new Promise((resolve, reject) => {
    const transports = spec.polling_first ? ["polling", "websocket"] : ["websocket"];
    const socket = io(url, { transports, reconnection: false, forceNew: true });
    socket.once("connect", () => resolve(socket));
    socket.once("connect_error", (error) => {
      socket.close();
      reject(error);
    });
  });
}

async function connect(url = urls[0]) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await connectOnce(url);
    } catch (error) {
      if (attempt === ATTEMPTS) throw new Error(`cannot connect: ${error.message}`);
      await sleep(50);
    }
  }
}

// A join; the original server acknowledges none (`unacknowledged_joins`), so there it is only sent.
function join(socket, conversationId) {
  if (spec.unacknowledged_joins) {
    socket.emit("join_conversation", { conversationId });
    return Promise.resolve();
  }
  return new Promise((resolve, reject) =>
    socket.emit("join_conversation", { conversationId }, (ack) =>
      ack?.error ? reject(new Error(`join refused: ${JSON.stringify(ack.error)}`)) : resolve(),
    ),
  );
}

// Opens `count` sockets, OPENING at a time; `setup(socket, i)` adds the listeners and names the
// conversation the socket joins.
async function openMany(count, setup) {
  const sockets = new Array(count);
  let next = 0;
  async function opener() {
    while (next < count) {
      const i = next++;
      const socket = await connect(urls[i % urls.length]);
      await join(socket, setup(socket, i));
      sockets[i] = socket;
    }
  }
  await Promise.all(Array.from({ length: Math.min(OPENING, count) }, opener));
  return sockets;
}

// Latency figures in milliseconds, as the Rust client's `Latency::of` computes them.
function latency(samples) {
  if (samples.length === 0) return { count: 0, p50_ms: 0, p99_ms: 0, max_ms: 0 };
  samples.sort((a, b) => a - b);
  const n = samples.length;
  const at = (q) => samples[Math.min(Math.max(Math.ceil(n * q), 1), n) - 1];
  return { count: n, p50_ms: at(0.5), p99_ms: at(0.99), max_ms: samples[n - 1] };
}

function outcome(fields) {
  const none = latency([]);
  return { seconds: 0, ok: 0, errors: 0, latency: none, first_chunk: none, chunks: 0, missing: 0, ...fields };
}

// `subscribers` members of "fanout" count their chunks until `stream_complete`; one more socket
// asks for the reply once told to go.
async function fanout() {
  const results = [];
  let started = 0;
  let finished = 0;
  let allFinished;
  const everyone = new Promise((resolve) => (allFinished = resolve));
  const finish = (result) => {
    if (result.finished) return;
    result.finished = true;
    if (++finished === spec.subscribers) allFinished();
  };
  await openMany(spec.subscribers, (socket) => {
    const result = { chunks: 0, lastSeq: 0, correct: false, done: null, finished: false };
    results.push(result);
    socket.on("stream_chunk", (chunk) => {
      result.chunks++;
      result.lastSeq = chunk.seq;
      if (chunk.isComplete) result.correct = chunk.content === spec.expected;
    });
    socket.on("stream_complete", () => {
      result.done = performance.now() - started;
      finish(result);
    });
    socket.on("disconnect", () => finish(result));
    return "fanout";
  });
  return async () => {
    started = performance.now();
    const sender = await connect();
    sender.emit("stream_chat", { conversationId: "fanout", message: "to everyone" });
    await Promise.race([everyone, sleep(WAIT_MS)]);
    sender.close();
    const finalSeq = Math.max(0, ...results.map((r) => r.lastSeq));
    const samples = results.filter((r) => r.done !== null).map((r) => r.done);
    const ok = results.filter((r) => r.correct && r.done !== null).length;
    return outcome({
      seconds: Math.max(0, ...samples) / 1e3,
      ok,
      errors: results.length - ok,
      latency: latency(samples),
      chunks: results.reduce((sum, r) => sum + r.chunks, 0),
      missing: results.reduce((sum, r) => sum + finalSeq - Math.min(r.chunks, finalSeq), 0),
    });
  };
}

// `connections` idle sockets, each a member of one of 100 conversations; sockets that polled first
// are ready once every one of them has upgraded.
async function idle() {
  const sockets = await openMany(spec.connections, (_, i) => `idle-${i % 100}`);
  const deadline = Date.now() + WAIT_MS;
  while (spec.polling_first && sockets.some((s) => s.io.engine.transport.name !== "websocket")) {
    if (Date.now() > deadline) throw new Error("sockets still polling");
    await sleep(100);
  }
  return async () => outcome({});
}

const run = await { fanout, idle }[spec.scenario]();
say({ ready: true });
await waitFor("go");
say(await run());
await waitFor("stop");
process.exit(0);
