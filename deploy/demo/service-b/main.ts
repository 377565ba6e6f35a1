// Service B of the demo: a TypeScript app on Deno that calls Service C.
//
// GET /        calls http://$SERVICE_C_HOST/ and always answers 200:
//                "Service B <- <C's body>"          when C answers 2xx,
//                "Service B <- Error: <C's body>"   when C answers non-2xx,
//                "Service B <- Error: <message>"    on network errors.
// GET /health  answers "UP".
//
// Environment: PORT (default 8080), SERVICE_C_HOST (default service-c:8080).
// Run with: deno run --allow-net --allow-env main.ts
// No imports: only Deno built-ins, so nothing is downloaded at run time.
// The app knows nothing about the mesh; it only forwards the tracing headers
// it receives (Istio header propagation).

const PORT = Number(Deno.env.get("PORT") ?? "8080");
const SERVICE_C_HOST = Deno.env.get("SERVICE_C_HOST") ?? "service-c:8080";
const TIMEOUT_MS = 10_000;

const TRACING_HEADERS = new Set(["x-request-id", "b3", "traceparent", "tracestate"]);

function tracingHeaders(incoming: Headers): Headers {
  const out = new Headers();
  for (const [name, value] of incoming) {
    // Headers iterates with lower-cased names.
    if (TRACING_HEADERS.has(name) || name.startsWith("x-b3-")) {
      out.set(name, value);
    }
  }
  return out;
}

async function callServiceC(incoming: Headers): Promise<string> {
  try {
    const response = await fetch(`http://${SERVICE_C_HOST}/`, {
      headers: tracingHeaders(incoming),
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
    const body = await response.text();
    if (response.ok) {
      return body;
    }
    return `Error: ${body.trim() || `${response.status} ${response.statusText}`}`;
  } catch (err) {
    return `Error: ${errorMessage(err)}`;
  }
}

// "fetch failed (client error (Connect): tcp connect error: Connection refused (os error 111))"
function errorMessage(err: unknown): string {
  if (!(err instanceof Error)) {
    return String(err);
  }
  const cause = err.cause instanceof Error ? err.cause.message : "";
  const detail = cause.replace(/^error sending request for url \([^)]*\): /, "");
  return detail ? `${err.message} (${detail})` : err.message;
}

function text(body: string, status = 200): Response {
  return new Response(body, {
    status,
    headers: { "content-type": "text/plain; charset=utf-8" },
  });
}

async function handler(request: Request): Promise<Response> {
  switch (new URL(request.url).pathname) {
    case "/":
      return text(`Service B <- ${await callServiceC(request.headers)}`);
    case "/health":
      return text("UP");
    default:
      return text("Page not found", 404);
  }
}

// As PID 1 in a container, exit promptly on SIGTERM.
Deno.addSignalListener("SIGTERM", () => Deno.exit(0));

Deno.serve({
  port: PORT,
  hostname: "0.0.0.0",
  onListen: ({ hostname, port }) =>
    console.log(`service-b listening on ${hostname}:${port}, calling http://${SERVICE_C_HOST}/`),
}, handler);
