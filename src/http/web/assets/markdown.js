// Markdown to DOM nodes, for replies while the model is still writing them.
//
// Every piece of model text becomes a text node (createElement, textContent): nothing the model
// writes is ever parsed as HTML, so `<script>` or `<img onerror>` in a reply shows as text. Links
// are made only for http(s) URLs. Unfinished constructs (an open code fence, a lone `**`) render
// as what they are so far, so a reply can be rendered again after every chunk.
//
// Blocks: paragraphs (single newlines kept as line breaks), headings, fenced code blocks (with a
// copy button, handled by the page), bullet and numbered lists (nested by indentation), block
// quotes, tables and rules. Inline: code, links, bare http(s) URLs, bold, italic, strikethrough
// and backslash escapes.

const FENCE = /^( {0,3})(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*))?$/;
const TABLE_DELIMITER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

// One alternation for every inline construct; the first that matches at the earliest place wins.
const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code span
    /\\([!-/:-@[-`{-~])/.source, // 3: escaped character
    /\[([^\]\n]*)\]\(\s*<?((?:[^\s()<>]|\([^\s()<>]*\))*)>?(?:\s+(?:"[^"\n]*"|'[^'\n]*'))?\s*\)/.source, // 4, 5: link
    /<(https?:\/\/[^\s<>]+)>/.source, // 6: autolink
    /(https?:\/\/[^\s<>]*[^\s<>.,:;!?"'()[\]{}*_~])/.source, // 7: bare URL
    /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 8: bold
    /__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 9: bold
    /~~(?=\S)([\s\S]*?\S)~~/.source, // 10: strikethrough
    /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 11: italic
    /(?<![\w_])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w_])/.source, // 12: italic
    /(\n)/.source, // 13: line break
  ].join("|"),
  "g",
);

/** The markdown `source` as a fragment of DOM nodes. */
export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  renderBlocks(source.replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}

/** The element `tag` holding `children` (nodes or strings, strings as text). */
function element(tag, ...children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

/** An http(s) URL as an absolute link target, or null for anything else. */
export function safeUrl(text) {
  try {
    const url = new URL(text);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

const isBlank = (line) => line.trim() === "";

/** Whether `line` begins a block that ends a paragraph before it. */
function interrupts(line) {
  const item = ITEM.exec(line);
  const listStart = item && item[4] && (!/^\d/.test(item[2]) || /^1[.)]$/.test(item[2]));
  return Boolean(
    FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || listStart,
  );
}

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (isBlank(line)) {
      i += 1;
    } else if ((match = FENCE.exec(line))) {
      i = renderCode(lines, i, match, parent);
    } else if ((match = HEADING.exec(line))) {
      const level = Math.min(match[1].length + 1, 6);
      parent.append(element(`h${level}`, ...renderInline(match[2] ?? "")));
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(document.createElement("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
        quoted.push(match[1]);
        i += 1;
      }
      const quote = document.createElement("blockquote");
      renderBlocks(quoted, quote);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = renderList(lines, i, parent);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_DELIMITER.test(lines[i + 1])) {
      i = renderTable(lines, i, parent);
    } else {
      const text = [line.trim()];
      i += 1;
      while (i < lines.length && !isBlank(lines[i]) && !interrupts(lines[i])) {
        text.push(lines[i].trim());
        i += 1;
      }
      parent.append(element("p", ...renderInline(text.join("\n"))));
    }
  }
}

/** A fenced code block from line `start`; an unclosed fence runs to the end. */
function renderCode(lines, start, [, indent, fence, language], parent) {
  const body = [];
  let i = start + 1;
  const closing = new RegExp(`^ {0,3}${fence[0]}{${fence.length},}[ \\t]*$`);
  while (i < lines.length && !closing.test(lines[i])) {
    const line = lines[i];
    const strip = Math.min(indent.length, line.length - line.trimStart().length);
    body.push(line.slice(strip));
    i += 1;
  }
  const code = element("code", body.join("\n"));
  if (language) {
    code.className = `language-${language}`;
  }
  const copy = element("button", "Copy");
  copy.type = "button";
  copy.className = "copy-code";
  copy.setAttribute("aria-label", "Copy code");
  const header = element("div", element("span", language || "code"), copy);
  header.className = "code-header";
  const block = element("div", header, element("pre", code));
  block.className = "code-block";
  parent.append(block);
  return i + 1;
}

/** A list from line `start`: its items, each parsed as blocks of its own. */
function renderList(lines, start, parent) {
  const first = ITEM.exec(lines[start]);
  const ordered = /^\d/.test(first[2]);
  const delimiter = first[2].slice(-1);
  const list = document.createElement(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) {
    list.start = parseInt(first[2], 10);
  }
  const continues = (line) => {
    const match = ITEM.exec(line ?? "");
    return Boolean(match) && /^\d/.test(match[2]) === ordered && match[2].slice(-1) === delimiter;
  };
  let i = start;
  let loose = false;
  const items = [];
  while (i < lines.length && continues(lines[i])) {
    const match = ITEM.exec(lines[i]);
    const width = match[1].length + match[2].length + Math.min((match[3] ?? " ").length, 4);
    const body = [match[4] ?? ""];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      const indent = line.length - line.trimStart().length;
      if (isBlank(line)) {
        const next = lines.slice(i + 1).find((l) => !isBlank(l));
        const nextIndent = next === undefined ? 0 : next.length - next.trimStart().length;
        if (next === undefined || nextIndent < width) {
          break;
        }
        body.push("");
      } else if (indent >= width) {
        body.push(line.slice(width));
      } else if (!isBlank(body[body.length - 1]) && !interrupts(line) && !ITEM.test(line)) {
        body.push(line.trim());
      } else {
        break;
      }
      i += 1;
    }
    items.push(body);
    if (i < lines.length && isBlank(lines[i])) {
      let next = i;
      while (next < lines.length && isBlank(lines[next])) {
        next += 1;
      }
      if (!continues(lines[next])) {
        break;
      }
      loose = true;
      i = next;
    }
  }
  for (const body of items) {
    const item = document.createElement("li");
    renderBlocks(body, item);
    if (!loose && item.firstChild?.nodeName === "P") {
      item.firstChild.replaceWith(...item.firstChild.childNodes);
    }
    list.append(item);
  }
  parent.append(list);
  return i;
}

/** The cells of a table row, split on `|` outside code spans. */
function cells(line) {
  const row = line.trim().replace(/^\|/, "").replace(/(?<!\\)\|$/, "");
  const found = [];
  let cell = "";
  let inCode = false;
  for (let i = 0; i < row.length; i += 1) {
    const c = row[i];
    if (c === "\\" && row[i + 1] === "|") {
      cell += "|";
      i += 1;
    } else if (c === "`") {
      inCode = !inCode;
      cell += c;
    } else if (c === "|" && !inCode) {
      found.push(cell.trim());
      cell = "";
    } else {
      cell += c;
    }
  }
  found.push(cell.trim());
  return found;
}

/** A table from line `start`: a header row, the delimiter row, then rows while lines hold `|`. */
function renderTable(lines, start, parent) {
  const head = cells(lines[start]);
  const aligns = cells(lines[start + 1]).map((spec) =>
    spec.endsWith(":") ? (spec.startsWith(":") ? "center" : "right") : spec.startsWith(":") ? "left" : "",
  );
  const row = (texts, tag) => {
    const tr = document.createElement("tr");
    head.forEach((_, column) => {
      const cell = element(tag, ...renderInline(texts[column] ?? ""));
      if (aligns[column]) {
        cell.style.textAlign = aligns[column];
      }
      tr.append(cell);
    });
    return tr;
  };
  const body = document.createElement("tbody");
  let i = start + 2;
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
    body.append(row(cells(lines[i]), "td"));
    i += 1;
  }
  const table = element("table", element("thead", row(head, "th")), body);
  const scroller = element("div", table);
  scroller.className = "table-scroll";
  parent.append(scroller);
  return i;
}

/** Inline markdown as a list of nodes. */
function renderInline(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) {
      nodes.push(document.createTextNode(text.slice(last, match.index)));
    }
    nodes.push(inlineNode(match));
    last = match.index + match[0].length;
  }
  if (last < text.length) {
    nodes.push(document.createTextNode(text.slice(last)));
  }
  return nodes;
}

function link(label, url) {
  const anchor = element("a", ...label);
  anchor.href = url;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer";
  return anchor;
}

function inlineNode(match) {
  const [whole, , code, escaped, label, target, autolink, bare, bold, bold2, strike, italic, italic2] =
    match;
  if (code !== undefined) {
    const trimmed = /^ .*[^ ].* $/s.test(code) ? code.slice(1, -1) : code;
    return element("code", trimmed);
  }
  if (escaped !== undefined) {
    return document.createTextNode(escaped);
  }
  if (label !== undefined) {
    const url = safeUrl(target);
    return url ? link(renderInline(label), url) : document.createTextNode(whole);
  }
  if (autolink !== undefined || bare !== undefined) {
    const text = autolink ?? bare;
    const url = safeUrl(text);
    return url ? link([text], url) : document.createTextNode(whole);
  }
  if (bold !== undefined || bold2 !== undefined) {
    return element("strong", ...renderInline(bold ?? bold2));
  }
  if (strike !== undefined) {
    return element("del", ...renderInline(strike));
  }
  if (italic !== undefined || italic2 !== undefined) {
    return element("em", ...renderInline(italic ?? italic2));
  }
  return document.createElement("br");
}
