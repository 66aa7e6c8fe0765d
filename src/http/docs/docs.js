// The browsable API reference: fetches /api/openapi.json and renders its routes, parameters,
// bodies, answers, schemas and real-time events. Text is only ever set as text, never as HTML.
"use strict";

const METHODS = ["get", "post", "put", "patch", "delete"];

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" ? inline(child) : child);
    }
  }
  return node;
}

// Text with `code` spans.
function inline(text) {
  const fragment = document.createDocumentFragment();
  text.split(/(`[^`]*`)/).forEach((part, i) => {
    fragment.append(i % 2 ? el("code", null, document.createTextNode(part.slice(1, -1))) : document.createTextNode(part));
  });
  return fragment;
}

// The small part of Markdown the document's descriptions use: headings, lists, tables, paragraphs.
function markdown(text) {
  const out = document.createDocumentFragment();
  const blocks = (text || "").split(/\n\s*\n/);
  for (const block of blocks) {
    const lines = block.split("\n").map((line) => line.trim()).filter(Boolean);
    if (!lines.length) continue;
    const heading = /^(#+)\s+(.*)$/.exec(lines[0]);
    if (heading) {
      out.append(el("h" + Math.min(heading[1].length + 2, 6), null, heading[2]));
    } else if (lines[0].startsWith("|")) {
      const cells = (line) => line.replace(/^\||\|$/g, "").split("|").map((cell) => cell.trim());
      const rows = lines.filter((line) => !/^\|[-|\s]+\|$/.test(line)).map(cells);
      out.append(el("table", null,
        el("thead", null, el("tr", null, rows[0].map((cell) => el("th", null, cell)))),
        el("tbody", null, rows.slice(1).map((row) => el("tr", null, row.map((cell) => el("td", null, cell)))))));
    } else if (lines[0].startsWith("- ")) {
      const items = block.split(/\n\s*- /).map((item) => item.replace(/^\s*- /, "").replace(/\s+/g, " "));
      out.append(el("ul", null, items.map((item) => el("li", null, item.replace(/\*\*/g, "")))));
    } else {
      out.append(el("p", null, lines.join(" ").replace(/\*\*/g, "")));
    }
  }
  return out;
}

function refName(ref) {
  return ref.split("/").pop();
}

// A schema as a nested list: types, constraints and descriptions; references link to Schemas.
function schemaView(schema, spec, depth = 0) {
  if (!schema) return el("span", { class: "muted" }, "no body");
  if (schema.$ref) {
    const name = refName(schema.$ref);
    return el("a", { href: "#schema-" + name }, name);
  }
  const variants = schema.oneOf || schema.anyOf;
  if (variants) {
    const shown = variants.filter((variant) => variant.type !== "null");
    const parts = shown.map((variant) => schemaView(variant, spec, depth));
    const nullable = shown.length < variants.length ? " or null" : "";
    return el("span", null, parts.flatMap((part, i) => (i ? [" or ", part] : [part])), nullable);
  }
  const types = [].concat(schema.type || "any").join(" or ");
  if (types.startsWith("array")) {
    return el("span", null, "array of ", schemaView(schema.items, spec, depth + 1));
  }
  const facts = [];
  for (const key of ["format", "pattern", "minimum", "minLength", "maxLength"]) {
    if (schema[key] !== undefined) facts.push(key + " " + schema[key]);
  }
  if (schema.enum) facts.push("one of " + schema.enum.join(", "));
  const head = el("span", null, el("code", null, types), facts.length ? " (" + facts.join("; ") + ")" : "");
  if (!schema.properties || depth > 4) return head;
  const required = new Set(schema.required || []);
  const fields = Object.entries(schema.properties).map(([name, field]) =>
    el("li", null, el("code", null, name), required.has(name) ? "" : " (optional)", ": ",
      schemaView(field, spec, depth + 1), field.description ? " — " + field.description : ""));
  return el("span", null, head, el("ul", { class: "schema" }, fields));
}

function contentView(content, spec) {
  return Object.entries(content || {}).map(([type, media]) =>
    el("div", null, el("span", { class: "muted" }, type + ": "), schemaView(media.schema, spec)));
}

function operationView(path, method, operation, spec) {
  const section = el("section", { class: "operation", id: operation.operationId || method + path },
    el("h3", null, el("span", { class: "method " + method }, method), el("code", null, path)),
    operation.summary ? el("p", null, operation.summary) : null,
    operation.description && operation.description !== operation.summary ? markdown(operation.description) : null);
  const parameters = operation.parameters || [];
  if (parameters.length) {
    section.append(el("h4", null, "Parameters"), el("table", null,
      el("tr", null, el("th", null, "name"), el("th", null, "in"), el("th", null, "schema"), el("th", null, "description")),
      parameters.map((p) => el("tr", null, el("td", null, el("code", null, p.name), p.required ? "" : " (optional)"),
        el("td", null, p.in), el("td", null, schemaView(p.schema, spec)), el("td", null, p.description || "")))));
  }
  if (operation.requestBody) {
    section.append(el("h4", null, "Body"), ...contentView(operation.requestBody.content, spec));
  }
  section.append(el("h4", null, "Answers"), el("table", null,
    el("tr", null, el("th", null, "status"), el("th", null, "meaning"), el("th", null, "body"), el("th", null, "headers")),
    Object.entries(operation.responses || {}).map(([status, answer]) => el("tr", null,
      el("td", { class: "status" }, status), el("td", null, answer.description || ""),
      el("td", null, contentView(answer.content, spec)),
      el("td", null, Object.keys(answer.headers || {}).map((name) => el("div", null, el("code", null, name))))))));
  return section;
}

function realtimeView(realtime) {
  const events = (title, map) => el("table", null,
    el("tr", null, el("th", null, title), el("th", null, "payload")),
    Object.entries(map || {}).map(([name, schema]) =>
      el("tr", null, el("td", null, el("code", null, name)), el("td", null, schemaView(schema)))));
  return el("section", { id: "realtime" }, el("h2", null, "Real-time events"),
    el("p", null, "Plain WebSocket at `" + realtime.websocket.path + "`, Socket.IO at `" + realtime.socketio.path + "`."),
    events("client sends", realtime.clientEvents), events("server sends", realtime.serverEvents),
    events("Socket.IO acknowledgement of", realtime.acknowledgements));
}

function render(spec) {
  const root = document.getElementById("reference");
  root.replaceChildren();
  document.title = spec.info.title + " " + spec.info.version + " API";
  root.append(el("h1", null, spec.info.title + " " + spec.info.version),
    el("p", { class: "muted" }, "OpenAPI " + spec.openapi + ": ", el("a", { href: "/api/openapi.json" }, "/api/openapi.json")),
    markdown(spec.info.description));
  const byTag = new Map((spec.tags || []).map((tag) => [tag.name, []]));
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const method of METHODS) {
      if (!item[method]) continue;
      const tag = (item[method].tags || ["other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(operationView(path, method, item[method], spec));
    }
  }
  for (const [tag, sections] of byTag) {
    const about = (spec.tags || []).find((t) => t.name === tag);
    root.append(el("h2", null, tag), about && about.description ? el("p", null, about.description) : "", ...sections);
  }
  if (spec["x-realtime"]) root.append(realtimeView(spec["x-realtime"]));
  const schemas = Object.entries((spec.components || {}).schemas || {});
  root.append(el("h2", null, "Schemas"), ...schemas.map(([name, schema]) =>
    el("section", { id: "schema-" + name }, el("h3", null, name),
      schema.description ? el("p", null, schema.description) : null, schemaView(schema, spec, 1))));
}

fetch("/api/openapi.json")
  .then((answer) => {
    if (!answer.ok) throw new Error("/api/openapi.json answered " + answer.status);
    return answer.json();
  })
  .then(render)
  .catch((error) => {
    document.getElementById("reference").replaceChildren(el("p", null, "Could not load the API document: " + error.message));
  });
