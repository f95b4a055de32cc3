#!/usr/bin/env node
// The Drone Delivery "Delivery" step as a plain Node.js HTTP service (standard library only).
//
// choreograph's push ambassador POSTs each `drone.drone.assigned` event here as a CloudEvent
// (HTTP binding, binary mode: ce-* headers, JSON body), signed in the Standard Webhooks format.
// This service verifies the signature, schedules the flight once per delivery id (a JSON file
// store, so a redelivery answers the schedule already made), and answers with the next event,
// `drone.delivery.scheduled`, as a CloudEvent in the response. The ambassador publishes that
// answer on the bus with a deterministic id before it acks the input: this service needs no
// broker client and no credentials to the bus.
//
// Answers (the ambassador's outcome table): 200 + CloudEvent = done; 400/413/415/422 = never
// retry (dead-lettered); 401 = bad signature; 503 + Retry-After = try again later.
//
// Environment: PORT (8090; 0 = any free port), HOST (127.0.0.1), WEBHOOK_SECRET (whsec_...,
// required), STORE_PATH (./var/polyglot/deliveries.json), WEBHOOK_TOLERANCE (300 s),
// ALLOWED_ORIGINS (handshake, comma-separated, default *), FAIL_FIRST (answer 503 to the first
// N attempts for each delivery: a demo of retries).

import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import zlib from "node:zlib";

const PORT = Number(process.env.PORT ?? 8090);
const HOST = process.env.HOST ?? "127.0.0.1";
const SECRET = process.env.WEBHOOK_SECRET ?? "";
const STORE_PATH = process.env.STORE_PATH ?? "./var/polyglot/deliveries.json";
const TOLERANCE_S = Number(process.env.WEBHOOK_TOLERANCE ?? 300);
const ALLOWED_ORIGINS = (process.env.ALLOWED_ORIGINS ?? "*").split(",").map((s) => s.trim());
const FAIL_FIRST = Number(process.env.FAIL_FIRST ?? 0);
const MAX_BODY = 1 << 20;

const CONSUMES = "drone.drone.assigned";
const EMITS = "drone.delivery.scheduled";
const SOURCE = "/drone/delivery-node";

if (!SECRET.startsWith("whsec_")) {
  console.error("WEBHOOK_SECRET must be set to the subscription's whsec_... secret");
  process.exit(2);
}
const KEY = Buffer.from(SECRET.slice("whsec_".length), "base64");

// -- Standard Webhooks signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"> --------

function signatureProblem(headers, body) {
  const id = headers["webhook-id"];
  const timestamp = headers["webhook-timestamp"];
  const signatures = headers["webhook-signature"];
  if (!id || !timestamp || !signatures) return "the request is not signed (webhook-* headers missing)";
  if (!/^\d+$/.test(timestamp)) return "webhook-timestamp is not Unix seconds";
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE_S) return "webhook-timestamp outside the tolerance";
  const expected = crypto.createHmac("sha256", KEY).update(`${id}.${timestamp}.`).update(body).digest();
  for (const part of signatures.split(" ")) {
    const [version, signature] = part.split(",");
    if (version !== "v1" || !signature) continue;
    const given = Buffer.from(signature, "base64");
    if (given.length === expected.length && crypto.timingSafeEqual(given, expected)) return null;
  }
  return "no signature matches";
}

// -- the CloudEvent of the request (binary mode; structured mode accepted too) ----------------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function mediaType(contentType) {
  return (contentType ?? "").split(";")[0].trim().toLowerCase();
}

function readEvent(headers, body) {
  const type = mediaType(headers["content-type"]);
  let attributes, data;
  if (type === "application/cloudevents+json") {
    try {
      ({ data, ...attributes } = JSON.parse(body.toString("utf8")));
    } catch {
      throw new HttpError(400, "structured CloudEvent is not valid JSON");
    }
  } else {
    attributes = {};
    for (const [name, value] of Object.entries(headers)) {
      if (!name.startsWith("ce-")) continue;
      try {
        attributes[name.slice(3)] = decodeURIComponent(value);
      } catch {
        throw new HttpError(400, `${name}: bad percent-encoding`);
      }
    }
    if (type !== "" && type !== "application/json" && !type.endsWith("+json")) {
      throw new HttpError(415, `Content-Type ${headers["content-type"]} is not JSON`);
    }
    try {
      data = JSON.parse(body.toString("utf8"));
    } catch {
      throw new HttpError(400, "the body is not valid JSON");
    }
  }
  for (const name of ["specversion", "id", "source", "type"]) {
    if (!attributes[name]) throw new HttpError(400, `not a CloudEvent: ${name} is missing`);
  }
  if (attributes.specversion !== "1.0") throw new HttpError(400, `specversion ${attributes.specversion} unsupported`);
  return { ...attributes, data };
}

// -- the business step: one schedule per delivery id, in a JSON file -------------------------

function loadStore() {
  try {
    return JSON.parse(fs.readFileSync(STORE_PATH, "utf8"));
  } catch (error) {
    if (error.code === "ENOENT") return { deliveries: {}, attempts: {} };
    throw error;
  }
}

function saveStore() {
  fs.mkdirSync(path.dirname(path.resolve(STORE_PATH)), { recursive: true });
  const temporary = `${STORE_PATH}.${process.pid}.tmp`;
  fs.writeFileSync(temporary, JSON.stringify(store, null, 2));
  fs.renameSync(temporary, STORE_PATH); // atomic: a crash leaves the old file or the new one
}

const store = loadStore();

// The same stand-in for route planning as the Python Delivery service: a redelivery, or the
// other implementation, schedules the same times.
function etas(pickup, dropoff) {
  const toPickup = 60 + (zlib.crc32(pickup) % 540);
  const flight = 60 * (1 + (zlib.crc32(`${pickup}|${dropoff}`) % 20));
  return [toPickup, toPickup + flight];
}

function field(data, snake, camel) {
  const value = data?.[snake] ?? data?.[camel];
  return value === undefined || value === null ? undefined : String(value);
}

function schedule(event) {
  const data = event.data;
  const deliveryId = field(data, "delivery_id", "deliveryId");
  if (!deliveryId) throw new HttpError(422, "data.delivery_id is missing");
  const existing = store.deliveries[deliveryId];
  if (existing) return existing; // idempotent: the schedule already made
  const attempts = (store.attempts[deliveryId] ?? 0) + 1;
  if (attempts <= FAIL_FIRST) {
    store.attempts[deliveryId] = attempts;
    saveStore();
    throw new HttpError(503, `simulated outage (attempt ${attempts} of ${FAIL_FIRST} failing)`);
  }
  const pickup = field(data, "pickup", "pickup") ?? "";
  const dropoff = field(data, "dropoff", "dropoff") ?? "";
  const [pickupEta, dropoffEta] = etas(pickup, dropoff);
  const scheduled = {
    delivery_id: deliveryId,
    package_id: field(data, "package_id", "packageId") ?? "",
    drone_id: field(data, "drone_id", "droneId") ?? "",
    pickup_eta_s: pickupEta,
    dropoff_eta_s: dropoffEta,
  };
  store.deliveries[deliveryId] = scheduled;
  delete store.attempts[deliveryId];
  saveStore();
  return scheduled;
}

// -- HTTP -------------------------------------------------------------------------------------

function answer(response, status, headers, body = "") {
  response.writeHead(status, { ...headers, "content-length": Buffer.byteLength(body) });
  response.end(body);
}

function handshake(request, response) {
  const origin = request.headers["webhook-request-origin"];
  const headers = { allow: "POST, OPTIONS" };
  if (!origin) return answer(response, 204, headers);
  if (!ALLOWED_ORIGINS.includes("*") && !ALLOWED_ORIGINS.includes(origin)) {
    return answer(response, 403, headers, `origin ${origin} may not deliver here`);
  }
  headers["webhook-allowed-origin"] = origin;
  if (request.headers["webhook-request-rate"]) headers["webhook-allowed-rate"] = "*";
  return answer(response, 200, headers);
}

function deliver(request, response, body) {
  const problem = signatureProblem(request.headers, body);
  if (problem) throw new HttpError(401, problem);
  const event = readEvent(request.headers, body);
  if (event.type !== CONSUMES) throw new HttpError(422, `this service consumes ${CONSUMES}, not ${event.type}`);
  const scheduled = schedule(event);
  const json = JSON.stringify(scheduled);
  const outputId = crypto.createHash("sha256").update(`${event.id}\u001f${EMITS}`).digest("hex").slice(0, 32);
  log({ event: event.id, type: event.type, delivery_id: scheduled.delivery_id, status: 200 });
  answer(response, 200, {
    "ce-specversion": "1.0",
    "ce-id": outputId,
    "ce-source": SOURCE,
    "ce-type": EMITS,
    "ce-subject": encodeURIComponent(scheduled.delivery_id),
    "ce-time": new Date().toISOString(),
    "content-type": "application/json",
  }, json);
}

function log(fields) {
  console.log(JSON.stringify({ at: new Date().toISOString(), ...fields }));
}

const server = http.createServer((request, response) => {
  if (request.method === "OPTIONS") return handshake(request, response);
  if (request.method !== "POST") return answer(response, 405, { allow: "POST, OPTIONS" });
  const chunks = [];
  let size = 0;
  request.on("data", (chunk) => {
    size += chunk.length;
    if (size <= MAX_BODY) chunks.push(chunk);
  });
  request.on("end", () => {
    try {
      if (size > MAX_BODY) throw new HttpError(413, `body larger than ${MAX_BODY} bytes`);
      deliver(request, response, Buffer.concat(chunks));
    } catch (error) {
      const status = error instanceof HttpError ? error.status : 500;
      const headers = { "content-type": "text/plain; charset=utf-8" };
      if (status === 503) headers["retry-after"] = "1";
      log({ event: request.headers["ce-id"] ?? null, status, error: error.message });
      answer(response, status, headers, error.message);
    }
  });
});

server.listen(PORT, HOST, () => {
  const { port } = server.address();
  console.log(`delivery-node listening on http://${HOST}:${port}/ (store ${STORE_PATH})`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  });
}
