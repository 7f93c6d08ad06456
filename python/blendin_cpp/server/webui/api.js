// The server's own API, same origin (relative URLs, JSON bodies): GET /v1/parameters for the
// settings form and POST /v1/chat/completions, streamed, with `trace` for each token's source.

export class ApiError extends Error {
  constructor(message, param, status) {
    super(message);
    this.param = param ?? null; // the request field the server refused, when it names one
    this.status = status ?? null; // the HTTP status of a refused request; null for a failure mid-stream
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function refusal(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say; the status says enough
  }
  const e = body?.error;
  return new ApiError(e?.message ?? `the server answered ${response.status} ${response.statusText}`, e?.param,
    response.status);
}

export async function getParameters(apiKey) {
  const r = await fetch("v1/parameters", { headers: headers(apiKey) });
  if (!r.ok) throw await refusal(r);
  return r.json();
}

// Streams one chat answer. onStep(step) for each token (step: the server's per-token trace:
// text, source, alpha, pb_max, pg_max, intervened, capped, ...). Resolves to the final statistics
// (the chunk's "blend"); rejects with ApiError when the server refuses or fails, and with an
// AbortError when `signal` aborts (the server then drops the request at once).
export async function streamChat(body, { apiKey, signal, onStep }) {
  const r = await fetch("v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify({ ...body, stream: true, trace: true }),
    signal,
  });
  if (!r.ok) throw await refusal(r);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let stats = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return stats;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message, chunk.error.param);
        for (const step of chunk.steps ?? []) onStep(step);
        if (chunk.blend) stats = chunk.blend;
      }
    }
  }
  throw new ApiError("the stream ended before the answer did (the server went away?)");
}
