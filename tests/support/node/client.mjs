// A real socket.io-client 4.x, driven by the Rust tests over stdin/stdout with JSON lines.
//
// Commands, one JSON object a line on stdin:
//   {"cmd": "connect", "url": "http://127.0.0.1:PORT", "options": {...}}
//                                           io(url, {reconnection: false, ...options})
//   {"cmd": "emit", "event": NAME, "args": [...], "ack": ID?}             socket.emit(NAME, ...args[, ack])
//   {"cmd": "block", "ms": N}                                            busy-waits N ms: a stalled client
//   {"cmd": "disconnect"}                                                socket.disconnect()
// Output, one JSON object a line on stdout:
//   {"type": "open", "transport"} (the first transport) | {"type": "connect", "transport"} |
//   {"type": "upgrade", "transport"} |
//   {"type": "connect_error", "message"} | {"type": "disconnect", "reason"} |
//   {"type": "event", "event", "args"} | {"type": "ack", "id", "args"} | {"type": "fatal", "message"}
// The client exits when stdin closes.

import { createInterface } from "node:readline";
import { io } from "socket.io-client";

let socket = null;

function out(value) {
  process.stdout.write(JSON.stringify(value) + "\n");
}

function connect({ url, options }) {
  socket = io(url, { reconnection: false, ...options });
  socket.io.on("open", () => {
    const engine = socket.io.engine;
    out({ type: "open", transport: engine.transport.name });
    engine.on("upgrade", (transport) => out({ type: "upgrade", transport: transport.name }));
  });
  socket.on("connect", () => out({ type: "connect", transport: socket.io.engine.transport.name }));
  socket.on("connect_error", (error) => out({ type: "connect_error", message: error.message }));
  socket.on("disconnect", (reason) => out({ type: "disconnect", reason }));
  socket.onAny((event, ...args) => out({ type: "event", event, args }));
}

function emit({ event, args = [], ack }) {
  if (ack === undefined || ack === null) {
    socket.emit(event, ...args);
  } else {
    socket.emit(event, ...args, (...reply) => out({ type: "ack", id: ack, args: reply }));
  }
}

function block({ ms }) {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    // Busy: no timers, no I/O, no polling requests.
  }
}

const commands = {
  connect,
  emit,
  block,
  disconnect: () => socket.disconnect(),
};

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  try {
    const command = JSON.parse(line);
    commands[command.cmd](command);
  } catch (error) {
    out({ type: "fatal", message: String(error) });
  }
});
lines.on("close", () => process.exit(0));
