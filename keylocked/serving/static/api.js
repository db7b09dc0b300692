// The page's only way to the server: the public HTTP API (docs/serving.md) with the signed-in key.
// No private routes: access control and audit hold for the page as for any client.

const KEY = "keylocked.apiKey";
const PROJECT = "keylocked.project";

/** The signed-in key and project, in this tab's sessionStorage (gone when the tab closes). */
export const session = {
  get key() {
    return sessionStorage.getItem(KEY) || "";
  },
  get project() {
    return sessionStorage.getItem(PROJECT) || "";
  },
  /** "kl_<prefix>": the non-secret part of a key, safe to show. */
  get keyPrefix() {
    const parts = this.key.split("_");
    return parts.length >= 3 ? `${parts[0]}_${parts[1]}` : "key";
  },
  signIn(key, project) {
    sessionStorage.setItem(KEY, key.trim());
    if (project && project.trim()) sessionStorage.setItem(PROJECT, project.trim());
    else sessionStorage.removeItem(PROJECT);
  },
  /** Forget the key, the project and everything else this tab kept. */
  signOut() {
    sessionStorage.clear();
  },
};

/** A refusal or failure of the API, with the sentence the page shows. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(explain(status, detail));
    this.status = status;
    this.detail = detail;
  }
}

let unauthorized = () => {};
/** Called with the message whenever the server answers 401 (the page then asks to sign in again). */
export function onUnauthorized(callback) {
  unauthorized = callback;
}

/** A path relative to the page (so it also works behind a reverse proxy's path prefix), with the project. */
export function apiUrl(path, query = {}) {
  const url = new URL(path, document.baseURI);
  const params = { project: session.project || undefined, ...query };
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

/** fetch() with the bearer key; resolves to the Response when it is 2xx, else throws an ApiError. */
export async function api(path, { method = "GET", json, form, query, signal } = {}) {
  const headers = { Authorization: `Bearer ${session.key}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let response;
  try {
    response = await fetch(apiUrl(path, query), { method, headers, body, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, null);
  }
  if (response.ok) return response;
  const error = new ApiError(response.status, await detailOf(response));
  if (response.status === 401) unauthorized(error.message);
  throw error;
}

/** GET/POST and decode the JSON answer. */
export async function apiJson(path, options) {
  return (await api(path, options)).json();
}

async function detailOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return body && body.detail !== undefined ? body.detail : text;
  } catch {
    return text.slice(0, 300) || response.statusText;
  }
}

// Refusals the library makes about a concept (as opposed to the key or its scopes).
const CONCEPT_REFUSAL = /grant|pinned|draft|retired|approved version|another base model/i;

/** The sentence a designer can act on, for an HTTP status and the API's detail. */
export function explain(status, detail) {
  const text = describe(detail);
  if (status === 0) return "The server cannot be reached. Check that it is running, then try again.";
  if (status === 401) return `Your API key was not accepted (${text}). Please sign in again.`;
  if (status === 403) {
    return CONCEPT_REFUSAL.test(text)
      ? `This project may not use that concept: ${text}.`
      : `This key is not allowed to do that: ${text}.`;
  }
  if (status === 404) return `Not found: ${text}.`;
  if (status === 413) return `That is too large for this server: ${text}.`;
  if (status === 422) return `Please check what you entered: ${text}.`;
  if (status === 503) return `The server cannot do this right now: ${text}.`;
  return `The server failed (${status}): ${text}. Please try again.`;
}

function describe(detail) {
  if (Array.isArray(detail)) {
    // FastAPI validation errors: [{loc: ["body", "concepts", 0, "beta"], msg}, ...]
    return detail
      .map((item) => {
        const where = (item.loc || []).filter((part) => part !== "body" && part !== "query").join(" › ");
        return where ? `${where}: ${item.msg}` : item.msg;
      })
      .join("; ");
  }
  return String(detail ?? "no details").replace(/\.$/, "");
}

/**
 * Server-sent events of a GET route, read with fetch (EventSource cannot send the bearer key).
 * Yields {event, data} with data JSON-decoded.
 */
export async function* serverEvents(path, signal) {
  const response = await api(path, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}
