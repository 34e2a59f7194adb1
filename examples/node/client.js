#!/usr/bin/env node
// A full handoff through hitl.v1.HitlService from Node.js:
// create a user, start a handoff with the bot transcript, send a message,
// then follow the session's events until the handoff ends, reconnecting and
// resuming from the last cursor whenever the stream ends (the server ends
// streams after HITL_STREAM_MAX_SECONDS, and with UNAVAILABLE on restart).
//
//   npm ci && node client.js --target 127.0.0.1:50051 --message "Hello?"
//
// Stubs are generated at run time from ../../proto by @grpc/proto-loader.

import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: process.env.HITL_TARGET || "127.0.0.1:50051" },
    token: { type: "string", default: process.env.HITL_TOKEN || "" },
    name: { type: "string", default: "Node Example User" },
    user: { type: "string", default: "node-example-user" }, // external id: upsert
    title: { type: "string", default: "Handoff from the Node.js example" },
    message: { type: "string", multiple: true, default: ["Hello, I need help with my order."] },
    "proto-dir": {
      type: "string",
      default: fileURLToPath(new URL("../../proto", import.meta.url)),
    },
    "max-seconds": { type: "string", default: "0" }, // give up after this long; 0 = never
    help: { type: "boolean", default: false },
  },
});
if (args.help) {
  console.log(
    "usage: node client.js [--target HOST:PORT] [--token T] [--name NAME] [--user EXTERNAL_ID]\n" +
      "                      [--title TEXT] [--message TEXT]... [--proto-dir DIR] [--max-seconds N]",
  );
  process.exit(0);
}

// --- stubs and rich errors ---------------------------------------------------------------
const definition = protoLoader.loadSync("hitl/v1/hitl_service.proto", {
  includeDirs: [args["proto-dir"]],
  keepCase: true, // field names as in the proto: session_id, after_cursor
  longs: String,
  enums: String, // "SESSION_STATE_QUEUED", "ENDED_BY_AGENT"
  defaults: true,
  oneofs: true, // event.kind names the member of the oneof that is set
});
const hitl = grpc.loadPackageDefinition(definition).hitl.v1;

// Errors carry google.rpc.Status in the grpc-status-details-bin trailer, with
// an ErrorInfo (stable UPPER_SNAKE reason) and, for bad input, BadRequest.
const rpcTypes = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; }
    repeated FieldViolation field_violations = 1;
  }
`, { keepCase: true }).root;

function richError(err) {
  const out = { code: grpc.status[err.code] || String(err.code), message: err.details, reason: "" };
  const raw = err.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return out;
  const status = rpcTypes.lookupType("google.rpc.Status").decode(raw);
  for (const detail of status.details) {
    const type = detail.type_url.split("/").pop();
    if (type === "google.rpc.ErrorInfo") {
      const info = rpcTypes.lookupType(type).decode(detail.value);
      Object.assign(out, { reason: info.reason, metadata: info.metadata });
    } else if (type === "google.rpc.BadRequest") {
      const bad = rpcTypes.lookupType(type).decode(detail.value);
      out.violations = bad.field_violations.map((v) => `${v.field}: ${v.description}`);
    }
  }
  return out;
}

// --- calls -------------------------------------------------------------------------------
// gRPC's reconnect backoff grows to 120 s: capped, a restarted service is
// found again within 2 s.
const client = new hitl.HitlService(args.target, grpc.credentials.createInsecure(), {
  "grpc.max_reconnect_backoff_ms": 2000,
});
const metadata = new grpc.Metadata();
if (args.token) metadata.set("authorization", `Bearer ${args.token}`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const backoff = (failures) => {
  const bound = Math.min(2000, 200 * 2 ** (failures - 1));
  return bound / 2 + Math.random() * (bound / 2); // jittered
};

// Codes worth a retry (docs/errors.md). CANCELLED here is never our own
// (nothing in this client cancels a unary call): a replica's gRPC core drops
// calls it has not handed to the service yet when too many wait.
const TRANSIENT = [grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.CANCELLED];

// One unary call with one deadline for all its attempts. Retries the
// TRANSIENT codes, up to 16 attempts (12.5-25 s of pauses: a restart of a
// one-process deployment takes a few seconds): only pass retry=true for
// calls that are safe to repeat (the request carries a request_id, or the
// call only reads).
async function call(method, request, { retry = false, seconds = 30 } = {}) {
  const deadline = Date.now() + seconds * 1000;
  for (let failures = 1; ; failures++) {
    try {
      return await new Promise((resolve, reject) =>
        client[method](request, metadata, { deadline }, (err, res) => (err ? reject(err) : resolve(res))),
      );
    } catch (err) {
      const pause = backoff(failures);
      if (!retry || !TRANSIENT.includes(err.code) || failures >= 16 || Date.now() + pause >= deadline) {
        throw Object.assign(err, { rich: richError(err) });
      }
      await sleep(pause);
    }
  }
}

function describe(event) {
  const e = event[event.kind];
  switch (event.kind) {
    case "started":
      return `provider ${e.provider}, chat ${e.external_chat_id}, group ${e.group_id}`;
    case "queued":
      return `position ${e.position || "?"}` + (e.wait_seconds ? `, about ${e.wait_seconds}s` : "");
    case "agent_assigned":
      return e.agent.name || e.agent.id;
    case "agent_message":
      return `${e.agent.name || e.agent.id}: ${
        e.message.body === "text" ? e.message.text : `[${e.message.body}]`
      }`;
    case "transferred":
      return `to ${e.to_agent ? e.to_agent.name : `group ${e.to_group_id}`} (${e.reason})`;
    case "ended":
      return `by ${e.by.replace("ENDED_BY_", "")} (${e.reason})`;
    case "failed":
      return `${e.code}: ${e.detail}`;
    default:
      return "";
  }
}

// Follows one session's events until it ends. `cursor` is the last event
// seen; every (re)connect asks for the events after it, so nothing is
// missed, and anything at or below it is dropped, so nothing is seen twice.
async function follow(sessionId) {
  let cursor = "0";
  let failures = 0;
  for (;;) {
    const stream = client.StreamEvents({ session_id: sessionId, after_cursor: cursor }, metadata);
    let why;
    try {
      for await (const event of stream) {
        failures = 0;
        if (BigInt(event.cursor) <= BigInt(cursor)) continue;
        cursor = event.cursor;
        // No kind: one newer than this client's proto; skip it.
        console.log(`[${event.cursor}] ${event.kind ?? "unknown"}: ${describe(event)}`);
        if (event.kind === "ended" || event.kind === "failed") {
          stream.cancel();
          return event;
        }
      }
      why = "the server ended the stream";
    } catch (err) {
      // A stream is cancelled by us only after its last event (above), so a
      // CANCELLED here is the server's, as UNAVAILABLE is a restart's.
      const reconnect = [grpc.status.UNAVAILABLE, grpc.status.CANCELLED].includes(err.code);
      if (!reconnect) throw Object.assign(err, { rich: richError(err) });
      why = `${grpc.status[err.code]}: ${err.details}`;
      failures++;
    }
    const wait = failures ? backoff(failures) : 0;
    console.log(`reconnecting after cursor ${cursor} (${why})`);
    await sleep(wait);
  }
}

async function main() {
  const user = (
    await call("CreateUser", { name: args.name, external_id: args.user }, { retry: true })
  ).user;
  console.log(`user ${user.id} (${user.name})`);

  const start = {
    user_id: user.id,
    title: args.title,
    description: "Started from examples/node/client.js",
    history: [
      { text: "Hi, I need help with my order.", author: "AUTHOR_USER" },
      { text: "Let me get a human for you.", author: "AUTHOR_BOT" },
    ],
    metadata: { source: "node-example" },
    request_id: randomUUID(), // the same id on every retry: one session, however many tries
  };
  let session;
  try {
    session = (await call("StartHitl", start, { retry: true })).session;
  } catch (err) {
    if (err.rich?.reason !== "SESSION_ALREADY_OPEN") throw err;
    // A handoff from an earlier run is still open: end it and start again.
    const old = err.rich.metadata.session_id;
    console.log(`ending the handoff left open by an earlier run (${old})`);
    await call("StopHitl", { session_id: old, reason: "example restarted" }, { retry: true });
    session = (await call("StartHitl", { ...start, request_id: randomUUID() }, { retry: true }))
      .session;
  }
  console.log(`session ${session.id} started; chat ${session.external_chat_id} waits for an agent`);

  for (const text of args.message) {
    const request = { session_id: session.id, message: { text }, request_id: randomUUID() };
    const sent = await call("SendMessage", request, { retry: true });
    console.log(`sent ${sent.message_id}: ${text}`);
  }

  const last = await follow(session.id);
  console.log(`handoff over (${last.kind})`);
}

const limit = Number(args["max-seconds"]);
if (limit > 0) {
  setTimeout(() => {
    console.error(`gave up after ${limit}s`);
    process.exit(3);
  }, limit * 1000).unref();
}
main().then(
  () => {
    client.close();
  },
  (err) => {
    const rich = err.rich || { code: "", message: err.message };
    console.error(`error: ${rich.code} ${rich.message}${rich.reason ? ` (${rich.reason})` : ""}`);
    for (const v of rich.violations || []) console.error(`  ${v}`);
    client.close();
    process.exitCode = 1;
  },
);
