// The keylocked page: sign in, browse concepts, generate with a live β strip, train, read the audit log.
// Plain DOM, no framework and no build step (docs/page.md says why). Text from the server is only ever
// set as textContent, never parsed as HTML.

import { ApiError, api, apiJson, onUnauthorized, serverEvents, session } from "./api.js";

// ---------------------------------------------------------------------------------------------
// DOM helpers

const $ = (selector) => document.querySelector(selector);

/** h("p", {class: "x", onclick: f}, "text", child) -> an element. */
function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

const fmt = (x, digits = 2) => Number(x).toFixed(digits);
const round = (x) => Math.round(x * 100) / 100;

/** The banner: a readable message (errors by default); empty text hides it. */
function say(text, kind = "error") {
  const box = $("#message");
  box.replaceChildren();
  if (!text) {
    box.hidden = true;
    return;
  }
  box.className = `message ${kind}`;
  box.append(h("span", {}, text), h("button", { type: "button", class: "quiet", onclick: () => say("") }, "×"));
  box.hidden = false;
}

/** An error as a sentence: ApiError already is one; anything else is a bug of the page, said plainly. */
function sentence(error) {
  if (error instanceof ApiError) return error.message;
  console.error(error);
  return `Something went wrong on this page (${error.message || error}). Reload the page and try again.`;
}

// ---------------------------------------------------------------------------------------------
// Signing in and out

const state = { concepts: [], me: null, tab: "generate" };

onUnauthorized((message) => signOut(message));

async function signIn(event) {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (!key) return;
  session.signIn(key, $("#project").value);
  try {
    await loadSession();
  } catch (error) {
    if (error.status !== 401) {
      // 401 already reloads the page; anything else (a project to name, the server down) is said here.
      session.signOut();
      say(sentence(error));
      if (error.status === 422 || error.status === 403) $("#project").focus();
    }
    return;
  }
  $("#api-key").value = "";
  enter();
}

const FLASH = "keylocked.flash"; // a message that survives the reload of signing out

/** Forget the key and reload: no image, thumbnail or job of this key stays in the page for the next one. */
function signOut(message = "", kind = "error") {
  session.signOut();
  if (message) sessionStorage.setItem(FLASH, JSON.stringify([message, kind]));
  window.location.reload();
}

function showSignIn(message = "", kind = "error") {
  $("#sign-in").hidden = false;
  say(message, kind);
  $("#api-key").focus();
}

function enter() {
  say("");
  $("#sign-in").hidden = true;
  $("#tabs").hidden = false;
  $("#sign-out").hidden = false;
  const who = $("#who");
  const holder = state.me ? `signed in as ${state.me.principal} (${state.me.role}) · ` : "";
  const project = session.project || (state.me && state.me.project);
  who.textContent = `${holder}${session.keyPrefix}${project ? ` · project ${project}` : ""}`;
  who.hidden = false;
  show(state.tab);
  resumeJobs();
}

function show(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === tab));
  }
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== tab;
  if (tab === "audit" && !audit.loaded) loadAudit();
}

// ---------------------------------------------------------------------------------------------
// Concepts

/** What the page needs of a key: the concepts its project may use, and who it is (GET /v1/me). */
async function loadSession() {
  await loadConcepts();
  state.me = await apiJson("v1/me");
}

async function loadConcepts() {
  const { concepts } = await apiJson("v1/concepts");
  state.concepts = concepts;
  renderConcepts();
  renderPicker();
}

function latestUsable(concept) {
  return concept.usable_versions.length ? concept.usable_versions[concept.usable_versions.length - 1] : null;
}

function recommendedBeta(concept, version) {
  const row = concept.versions.find((v) => v.version === version);
  const beta = row && row.training ? Number(row.training.beta) : NaN;
  return Number.isFinite(beta) ? beta : null;
}

const thumbnails = new Map(); // "name@version" -> Promise<object URL>

/** A version's sample image, fetched with the key (an <img src> could not send it). */
function thumbnail(name, version) {
  const id = `${name}@${version}`;
  if (!thumbnails.has(id)) {
    const url = api(`v1/concepts/${encodeURIComponent(name)}/versions/${version}/thumbnail.png`)
      .then((response) => response.blob())
      .then((blob) => URL.createObjectURL(blob));
    url.catch(() => thumbnails.delete(id));
    thumbnails.set(id, url);
  }
  return thumbnails.get(id);
}

// A sample is drawn by the server (and audited) on first request: fetch it only once its card is on screen.
const onScreen = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    onScreen.unobserve(entry.target);
    entry.target.load();
  }
});

function thumbnailFigure(name, version) {
  const figure = h("figure", { class: "thumb" }, h("span", { class: "hint" }, "drawing a sample…"));
  figure.load = () =>
    thumbnail(name, version).then(
      (url) => figure.replaceChildren(h("img", { src: url, alt: `sample of ${name}@${version}` })),
      (error) => figure.replaceChildren(h("span", { class: "hint error" }, sentence(error))),
    );
  onScreen.observe(figure);
  return figure;
}

function renderConcepts() {
  const list = $("#concept-list");
  const filter = $("#concept-filter").value.trim().toLowerCase();
  list.replaceChildren();
  if (!state.concepts.length) {
    list.append(
      h(
        "p",
        { class: "empty" },
        "No concepts are available to this project yet. Ask a reviewer to grant one to your project, ",
        "or train one in the Train tab.",
      ),
    );
    return;
  }
  for (const concept of state.concepts) {
    const text = `${concept.name} ${concept.token} ${concept.super_category}`.toLowerCase();
    if (filter && !text.includes(filter)) continue;
    const latest = latestUsable(concept);
    list.append(
      h(
        "article",
        { class: "card concept", dataset: { name: concept.name } },
        latest ? thumbnailFigure(concept.name, latest) : h("figure", { class: "thumb" }),
        h("h3", {}, concept.name),
        h("p", { class: "token" }, h("code", {}, concept.token), ` · a kind of ${concept.super_category}`),
        h(
          "ul",
          { class: "versions" },
          [...concept.versions].reverse().map((v) => versionItem(concept, v)),
        ),
        h(
          "button",
          { type: "button", class: "primary", onclick: () => useConcept(concept.name, null) },
          "Use in a prompt",
        ),
      ),
    );
  }
}

function versionItem(concept, v) {
  const usable = concept.usable_versions.includes(v.version);
  const when = v.created_at ? new Date(v.created_at).toLocaleDateString() : "";
  const beta = recommendedBeta(concept, v.version);
  return h(
    "li",
    {},
    h("strong", {}, `v${v.version}`),
    h("span", { class: `badge ${v.status}` }, v.status),
    usable ? h("span", { class: "badge usable", title: "this project may use it" }, "usable") : null,
    h("span", { class: "hint" }, [v.created_by, when, beta !== null ? `β ${fmt(beta)}` : null].filter(Boolean).join(" · ")),
    v.notes ? h("span", { class: "notes" }, v.notes) : null,
    v.status === "draft"
      ? h("button", { type: "button", class: "quiet", onclick: () => approve(concept.name, v.version) }, "Approve")
      : null,
  );
}

async function approve(name, version) {
  try {
    await apiJson(`v1/concepts/${encodeURIComponent(name)}/versions/${version}/approve`, { method: "POST" });
    await loadConcepts();
    say(`${name}@${version} is approved: every project granted ${name} may use it now.`, "info");
  } catch (error) {
    say(sentence(error));
  }
}

// ---------------------------------------------------------------------------------------------
// Generate: the prompt, the chosen concepts, β with a live strip, the gallery

const gen = {
  chosen: [], // [{name, version: number | null}]
  cache: new Map(), // request JSON -> Promise<result>: moving β back is instant
  ticket: 0, // the newest run; older answers fill the cache but not the preview
  started: false, // the slider re-draws only after a first Generate
  inflight: 0,
  gallery: new Set(), // png sha256 already shown
};
const AROUND = [-0.1, 0.1, -0.2, 0.2, -0.3, 0.3, -0.4, 0.4]; // strip offsets, nearest first

/** The strip's four β: the nearest tenths around the slider's value that stay on the slider's scale. */
function stripBetas(beta) {
  const slider = $("#beta");
  const [low, high] = [Number(slider.min), Number(slider.max)];
  const inside = AROUND.map((offset) => round(beta + offset)).filter((b) => b >= low - 1e-9 && b <= high + 1e-9);
  return inside.slice(0, 4).sort((a, b) => a - b);
}

function renderPicker() {
  const picker = $("#concept-picker");
  picker.replaceChildren(
    h("option", { value: "" }, state.concepts.length ? "Add a concept…" : "No concepts available"),
    ...state.concepts.map((c) => h("option", { value: c.name }, `${c.name} — ${c.token} (${c.super_category})`)),
  );
  picker.disabled = !state.concepts.length;
  renderChosen();
}

function useConcept(name, version) {
  show("generate");
  addConcept(name, version);
  $("#prompt").focus();
}

function addConcept(name, version) {
  const concept = state.concepts.find((c) => c.name === name);
  if (!concept) {
    say(`The concept ${name} is not available to this project.`);
    return;
  }
  const existing = gen.chosen.find((c) => c.name === name);
  if (existing) existing.version = version;
  else gen.chosen.push({ name, version });
  const prompt = $("#prompt");
  if (!prompt.value.includes(concept.token)) {
    if (!prompt.value.trim()) prompt.value = `a photo of a ${concept.token}`;
    else {
      const at = prompt.selectionStart ?? prompt.value.length;
      const before = prompt.value.slice(0, at);
      prompt.setRangeText(`${before && !before.endsWith(" ") ? " " : ""}${concept.token} `, at, at, "end");
    }
  }
  if (gen.chosen.length === 1) {
    const beta = recommendedBeta(concept, version ?? latestUsable(concept));
    if (beta !== null) setBeta(beta);
  }
  renderChosen();
}

function renderChosen() {
  const box = $("#chosen");
  box.replaceChildren();
  gen.chosen = gen.chosen.filter((c) => state.concepts.some((k) => k.name === c.name));
  for (const choice of gen.chosen) {
    const concept = state.concepts.find((c) => c.name === choice.name);
    const versions = [...new Set([...concept.usable_versions, ...(choice.version ? [choice.version] : [])])];
    const select = h(
      "select",
      {
        "aria-label": `version of ${choice.name}`,
        onchange: (event) => {
          choice.version = event.target.value ? Number(event.target.value) : null;
        },
      },
      h("option", { value: "" }, "latest approved"),
      versions.map((v) => h("option", { value: v, selected: v === choice.version }, `v${v}`)),
    );
    box.append(
      h(
        "span",
        { class: "chip", dataset: { name: choice.name } },
        h("code", {}, concept.token),
        select,
        h(
          "button",
          {
            type: "button",
            class: "quiet",
            "aria-label": `remove ${choice.name}`,
            onclick: () => {
              gen.chosen = gen.chosen.filter((c) => c !== choice);
              renderChosen();
            },
          },
          "×",
        ),
      ),
    );
  }
  const any = gen.chosen.length > 0;
  $("#beta").disabled = !any;
  $("#beta").title = any ? "" : "add a concept: β is its knob";
}

function setBeta(beta) {
  const slider = $("#beta");
  slider.value = String(beta);
  $("#beta-value").textContent = fmt(slider.value);
}

/** The form as an API request body at a given β (β and τ apply to every chosen concept). */
function requestBody(beta, numImages) {
  const tau = $("#tau").value === "" ? undefined : Number($("#tau").value);
  const negative = $("#negative-prompt").value.trim();
  return {
    prompt: $("#prompt").value.trim(),
    negative_prompt: negative || undefined,
    concepts: gen.chosen.map((c) => ({
      ref: c.version ? `${c.name}@${c.version}` : c.name,
      beta: round(beta),
      tau,
    })),
    seed: Number($("#seed").value || 0),
    steps: Number($("#steps").value || 25),
    guidance_scale: Number($("#guidance").value || 7.5),
    lock: $("#lock").value,
    num_images: numImages,
    project: session.project || undefined,
  };
}

/** POST /v1/images once per distinct request body; the answer's PNGs as object URLs. */
function draw(body) {
  const key = JSON.stringify(body);
  if (!gen.cache.has(key)) {
    gen.inflight += 1;
    watchQueue();
    const result = apiJson("v1/images", { method: "POST", json: body })
      .then((response) => ({
        response: { ...response, prompt: body.prompt }, // the answer does not repeat the prompt
        images: response.images.map((image) => {
          const bytes = Uint8Array.from(atob(image.b64_png), (c) => c.charCodeAt(0));
          return { ...image, url: URL.createObjectURL(new Blob([bytes], { type: "image/png" })) };
        }),
      }))
      .finally(() => {
        gen.inflight -= 1;
      });
    result.catch(() => gen.cache.delete(key));
    gen.cache.set(key, result);
  }
  return gen.cache.get(key);
}

/** Draw the main image(s) at β and the strip around it; keep=true adds the main images to the gallery. */
async function run({ keep }) {
  const prompt = $("#prompt").value.trim();
  if (!prompt) {
    say("Write a prompt first.");
    return;
  }
  const missing = gen.chosen
    .map((c) => state.concepts.find((k) => k.name === c.name))
    .filter((c) => c && !prompt.includes(c.token));
  if (missing.length) {
    say(`The prompt does not mention ${missing.map((c) => c.token).join(", ")}: add the word where the concept belongs.`);
    return;
  }
  say("");
  gen.started = true;
  const ticket = ++gen.ticket;
  const beta = Number($("#beta").value);
  const count = keep ? Math.max(1, Number($("#num-images").value || 1)) : 1;
  const main = draw(requestBody(beta, count));
  const betas = gen.chosen.length ? stripBetas(beta) : [];
  const strip = betas.map((b) => draw(requestBody(b, 1)));
  renderStrip(betas, strip, ticket);
  busy(true);
  try {
    const result = await main;
    if (ticket === gen.ticket) showPreview(result, beta);
    if (keep) for (const image of [...result.images].reverse()) addToGallery(image, result.response);
  } catch (error) {
    if (ticket === gen.ticket) say(sentence(error));
  }
  await Promise.allSettled(strip);
  if (ticket === gen.ticket) busy(false);
}

function showPreview(result, beta) {
  const [image] = result.images;
  const box = $("#preview");
  box.replaceChildren(shot(image, result.response, { big: true }));
  box.dataset.beta = fmt(beta);
  box.dataset.pngSha256 = image.png_sha256;
}

function renderStrip(betas, promises, ticket) {
  const strip = $("#strip");
  strip.replaceChildren();
  betas.forEach((beta, index) => {
    const frame = h(
      "button",
      {
        type: "button",
        class: "frame",
        dataset: { beta: fmt(beta) },
        title: `set β to ${fmt(beta)}`,
        onclick: () => {
          setBeta(beta);
          run({ keep: false });
        },
      },
      h("span", { class: "pending" }, "…"),
      h("span", { class: "caption" }, `β ${fmt(beta)}`, h("small", {}, beta < Number($("#beta").value) ? " more concept" : " more prompt")),
    );
    strip.append(frame);
    promises[index].then(
      (result) => {
        if (ticket !== gen.ticket) return;
        frame.firstChild.replaceWith(h("img", { src: result.images[0].url, alt: `β ${fmt(beta)}` }));
        frame.dataset.pngSha256 = result.images[0].png_sha256;
      },
      (error) => {
        if (ticket === gen.ticket) frame.firstChild.replaceWith(h("span", { class: "error" }, sentence(error)));
      },
    );
  });
}

/** An image with its provenance: what the PNG's text chunks carry, as the API reported it. */
function shot(image, response, { big = false } = {}) {
  const concepts = response.concepts;
  const name = `keylocked-${response.audit_id}-${image.seed}.png`;
  return h(
    "figure",
    {
      class: big ? "shot big" : "shot",
      dataset: { seed: image.seed, auditId: response.audit_id, pngSha256: image.png_sha256 },
    },
    h("img", { src: image.url, alt: response.prompt || "generated image" }),
    h(
      "figcaption",
      {},
      h("p", { class: "prompt" }, response.prompt),
      h(
        "dl",
        {},
        h("dt", {}, "Concepts"),
        h(
          "dd",
          { class: "concepts" },
          concepts.length
            ? concepts.map((c) => h("span", {}, `${c.name}@${c.version} β ${fmt(c.beta)} τ ${fmt(c.tau)}`))
            : "none (the base model)",
        ),
        h("dt", {}, "Seed"),
        h("dd", { class: "seed" }, String(image.seed)),
        h("dt", {}, "Audit id"),
        h("dd", { class: "audit-id" }, String(response.audit_id)),
        h("dt", {}, "Settings"),
        h("dd", {}, `${response.steps} steps · guidance ${response.guidance_scale} · ${response.lock} lock`),
      ),
      h("a", { class: "button", href: image.url, download: name }, "Download PNG"),
    ),
  );
}

function addToGallery(image, response) {
  if (gen.gallery.has(image.png_sha256)) return;
  gen.gallery.add(image.png_sha256);
  $("#gallery-empty").hidden = true;
  $("#gallery").prepend(shot(image, response));
}

let queueTimer = null;
/** While images are being drawn: the server's queue depth (from /healthz) and the time waited. */
function watchQueue() {
  if (queueTimer) return;
  const started = Date.now();
  const status = $("#generate-status");
  const tick = async () => {
    if (gen.inflight <= 0) {
      clearInterval(queueTimer);
      queueTimer = null;
      status.textContent = "";
      return;
    }
    let queue = "";
    try {
      const health = await (await fetch("healthz", { cache: "no-store" })).json();
      queue = ` · ${health.queue_depth} waiting in the server's queue`;
    } catch {
      // the probe is only for the progress line
    }
    const seconds = Math.round((Date.now() - started) / 1000);
    if (gen.inflight > 0) status.textContent = `Drawing ${gen.inflight} request(s)${queue} · ${seconds} s`;
  };
  queueTimer = setInterval(tick, 1000);
  status.textContent = `Drawing ${gen.inflight} request(s)…`;
}

function busy(on) {
  if (!on && gen.inflight <= 0) $("#generate-status").textContent = "";
  $("#generate-button").disabled = on;
  $("#generate-button").textContent = on ? "Drawing…" : "Generate";
}

let slideTimer = null;
function onSlide() {
  $("#beta-value").textContent = fmt($("#beta").value);
  if (!gen.started) return;
  clearTimeout(slideTimer);
  slideTimer = setTimeout(() => run({ keep: false }), 350);
}

// ---------------------------------------------------------------------------------------------
// Train: drop photos, submit a job, follow its progress, preview the result

const train = { files: [], tokenEdited: false };
const JOBS = "keylocked.jobs";

function addFiles(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/"));
  const skipped = files.length - images.length;
  const room = 10 - train.files.length;
  train.files.push(...images.slice(0, Math.max(0, room)));
  const notes = [];
  if (skipped) notes.push(`${skipped} file(s) were not images and were left out`);
  if (images.length > room) notes.push(`at most 10 photos: ${images.length - Math.max(0, room)} were left out`);
  say(notes.length ? `${notes.join("; ")}.` : "", "info");
  renderPicked();
}

function renderPicked() {
  const box = $("#picked");
  box.replaceChildren(
    ...train.files.map((file, index) =>
      h(
        "span",
        { class: "pick" },
        h("img", { src: URL.createObjectURL(file), alt: file.name }),
        h(
          "button",
          {
            type: "button",
            class: "quiet",
            "aria-label": `remove ${file.name}`,
            onclick: () => {
              train.files.splice(index, 1);
              renderPicked();
            },
          },
          "×",
        ),
      ),
    ),
  );
  $("#train-status").textContent = train.files.length ? `${train.files.length} of at most 10 photos` : "";
}

async function submitTraining(event) {
  event.preventDefault();
  if (!train.files.length) {
    say("Add 1 to 10 photos of your object first.");
    return;
  }
  const form = new FormData();
  for (const file of train.files) form.append("images", file, file.name);
  form.append("name", $("#train-name").value.trim());
  form.append("token", $("#train-token").value.trim());
  form.append("super_category", $("#train-super").value.trim());
  form.append("steps", $("#train-steps").value || "400");
  if (session.project) form.append("project", session.project);
  const button = $("#train-button");
  button.disabled = true;
  $("#train-status").textContent = "Uploading…";
  try {
    const job = await apiJson("v1/trainings", { method: "POST", form });
    say("");
    train.files = [];
    renderPicked();
    remember(job.id);
    follow(job);
  } catch (error) {
    say(sentence(error));
    $("#train-status").textContent = "";
  } finally {
    button.disabled = false;
  }
}

function remember(id) {
  const ids = JSON.parse(sessionStorage.getItem(JOBS) || "[]");
  if (!ids.includes(id)) sessionStorage.setItem(JOBS, JSON.stringify([...ids, id].slice(-20)));
}

const followed = new Set();
async function resumeJobs() {
  for (const id of JSON.parse(sessionStorage.getItem(JOBS) || "[]")) {
    if (followed.has(id)) continue;
    try {
      follow(await apiJson(`v1/trainings/${id}`));
    } catch {
      // a job of another key or a forgotten one: nothing to show
    }
  }
}

/** A job's card, kept current from its server-sent events (polling if the stream breaks). */
async function follow(job) {
  followed.add(job.id);
  const bar = h("progress", { max: job.total_steps, value: job.step });
  const line = h("p", { class: "status" });
  const result = h("div", { class: "result" });
  const card = h(
    "article",
    { class: "card job", dataset: { job: job.id } },
    h("h3", {}, `${job.concept} `, h("code", {}, job.token), ` · a kind of ${job.super_category}`),
    bar,
    line,
    result,
  );
  $("#jobs-empty").hidden = true;
  $("#jobs").prepend(card);
  const seen = { at: Date.now(), step: job.step };
  const update = (current) => {
    card.dataset.status = current.status;
    bar.max = current.total_steps;
    bar.value = current.step;
    line.textContent = progressLine(current, seen);
  };
  update(job);
  let last = job;
  try {
    for await (const { event, data } of serverEvents(`v1/trainings/${job.id}/events`)) {
      if (event === "error") throw new ApiError(404, data.detail);
      last = data;
      update(data);
      if (event === "done") break;
    }
  } catch (error) {
    if (error.status === 401) return;
    // The stream broke (a proxy, a restart): poll the job instead.
  }
  while (last.status === "queued" || last.status === "running") {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    try {
      last = await apiJson(`v1/trainings/${job.id}`);
      update(last);
    } catch (error) {
      line.textContent = sentence(error);
      return;
    }
  }
  finished(last, result);
}

function progressLine(job, seen) {
  if (job.status === "queued") return "Waiting for a free training slot on the server…";
  if (job.status === "failed") return `Training failed: ${job.error || "no reason given"}.`;
  if (job.status === "succeeded") return `Done: ${job.concept}@${job.version} is a new draft version.`;
  let eta = "";
  if (job.step > seen.step) {
    const perStep = (Date.now() - seen.at) / 1000 / (job.step - seen.step);
    const left = Math.round(perStep * (job.total_steps - job.step));
    eta = left > 90 ? ` · about ${Math.round(left / 60)} min left` : ` · about ${left} s left`;
  }
  return `Training: step ${job.step} of ${job.total_steps}${eta}`;
}

function finished(job, box) {
  if (job.status !== "succeeded") return;
  box.append(
    thumbnailFigure(job.concept, job.version),
    h(
      "p",
      { class: "hint" },
      "A draft: you can try it now; a reviewer approves it before others in the project can use it.",
    ),
    h(
      "button",
      {
        type: "button",
        class: "primary",
        onclick: async () => {
          try {
            await loadConcepts();
            useConcept(job.concept, job.version);
          } catch (error) {
            say(sentence(error));
          }
        },
      },
      "Try it in Generate",
    ),
  );
  loadConcepts().catch(() => {});
}

// ---------------------------------------------------------------------------------------------
// Audit log (admin keys)

const audit = { loaded: false, rows: [] };

async function loadAudit(event) {
  if (event) event.preventDefault();
  audit.loaded = true;
  const status = $("#audit-status");
  status.textContent = "Loading…";
  try {
    const { rows } = await apiJson("v1/audit", {
      query: {
        limit: $("#audit-limit").value || 200,
        concept: $("#audit-concept").value.trim() || undefined,
        project: $("#audit-project").value.trim() || undefined,
      },
    });
    audit.rows = rows.reverse(); // newest first
    $("#audit-rows").hidden = false;
    renderAudit();
  } catch (error) {
    audit.rows = [];
    $("#audit-rows").hidden = true;
    status.textContent =
      error.status === 403 ? `${sentence(error)} The audit log is for keys with the admin scope.` : sentence(error);
  }
}

function renderAudit() {
  const outcome = $("#audit-outcome").value;
  const text = $("#audit-text").value.trim().toLowerCase();
  const rows = audit.rows.filter(
    (row) =>
      (!outcome || row.outcome === outcome) &&
      (!text || `${row.action} ${row.actor} ${row.reason}`.toLowerCase().includes(text)),
  );
  const body = $("#audit-table tbody");
  body.replaceChildren();
  for (const row of rows) {
    const details = h(
      "tr",
      { class: "details", hidden: true },
      h("td", { colspan: 8 }, h("pre", {}, JSON.stringify({ ...row.details, key: row.key_prefix, row_hash: row.row_hash, prev_hash: row.prev_hash }, null, 2))),
    );
    body.append(
      h(
        "tr",
        { class: `entry ${row.outcome}`, dataset: { id: row.id }, onclick: () => (details.hidden = !details.hidden) },
        h("td", {}, String(row.id)),
        h("td", {}, String(row.at).replace("T", " ").slice(0, 19)),
        h("td", {}, row.actor),
        h("td", {}, row.action),
        h("td", {}, row.outcome),
        h("td", {}, row.concept ? `${row.concept}${row.version ? `@${row.version}` : ""}` : ""),
        h("td", {}, row.project),
        h("td", { class: "reason" }, row.reason),
      ),
      details,
    );
  }
  $("#audit-status").textContent = `${rows.length} of ${audit.rows.length} rows (newest first; click a row for details)`;
}

// ---------------------------------------------------------------------------------------------
// Wiring

function wire() {
  $("#sign-in-form").addEventListener("submit", signIn);
  $("#sign-out").addEventListener("click", () => signOut("Signed out.", "info"));
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => show(button.dataset.tab));
  }
  // Concepts
  $("#concept-filter").addEventListener("input", renderConcepts);
  $("#reload-concepts").addEventListener("click", () => loadConcepts().catch((e) => say(sentence(e))));
  // Generate
  $("#concept-picker").addEventListener("change", (event) => {
    if (event.target.value) addConcept(event.target.value, null);
    event.target.value = "";
  });
  $("#beta").addEventListener("input", onSlide);
  $("#new-seed").addEventListener("click", () => {
    $("#seed").value = String(Math.floor(Math.random() * 2 ** 31));
  });
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#generate-form").requestSubmit();
  });
  $("#generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run({ keep: true });
  });
  // Train
  const drop = $("#drop");
  drop.addEventListener("click", () => $("#files").click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("#files").click();
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  $("#files").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  });
  $("#train-name").addEventListener("input", (event) => {
    if (!train.tokenEdited) $("#train-token").value = event.target.value.trim() ? `<${event.target.value.trim()}>` : "";
  });
  $("#train-token").addEventListener("input", () => {
    train.tokenEdited = true;
  });
  $("#train-form").addEventListener("submit", submitTraining);
  // Audit
  $("#audit-form").addEventListener("submit", loadAudit);
  $("#audit-outcome").addEventListener("change", renderAudit);
  $("#audit-text").addEventListener("input", renderAudit);
}

async function start() {
  wire();
  $("#seed").value = String(Math.floor(Math.random() * 2 ** 31));
  setBeta(0.7);
  renderChosen();
  fetch("healthz", { cache: "no-store" })
    .then((response) => response.json())
    .then((health) => {
      $("#model").textContent = String(health.model).split("/").filter(Boolean).pop() || "";
    })
    .catch(() => {});
  const flash = JSON.parse(sessionStorage.getItem(FLASH) || '["", "info"]');
  sessionStorage.removeItem(FLASH);
  if (!session.key) {
    showSignIn(...flash);
    return;
  }
  try {
    await loadSession();
    enter();
  } catch (error) {
    if (error.status !== 401) showSignIn(sentence(error));
  }
}

start();
