// Drives Debian's headless Chromium through the chat page, for the Rust tests in tests/server/browser.rs.
//
// Usage: node page.mjs '{"url": "http://127.0.0.1:PORT", "scenario": NAME, ...}'
// Output, one JSON object a line on stdout:
//   {"step": NAME, ...}   the scenario waits for the test to act (e.g. change the model's reply)
//                         and to answer with one JSON line on stdin
//   {"result": {...}}     what the scenario saw; `problems` lists page errors, console errors
//                         (a CSP violation is one) and dialogs the page did not expect
//   {"error": "..."}      the scenario failed
// Every wait is bounded (TIMEOUT_MS); the script exits after its last line.

import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const TIMEOUT_MS = 15000;
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const args = JSON.parse(process.argv[2]);
const answers = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const problems = [];

function out(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/** Tells the test that `name` is reached and waits for its answer. */
async function step(name, data = {}) {
  out({ step: name, ...data });
  const { value, done } = await answers.next();
  if (done) {
    throw new Error(`no answer to step ${name}`);
  }
  return JSON.parse(value);
}

/** A new tab whose errors and dialogs are recorded; `onDialog` may handle dialogs instead. */
async function open(context, path = "/") {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") {
      problems.push(`console error: ${message.text()}`);
    }
  });
  page.on("dialog", async (dialog) => {
    if (page.onDialog) {
      await page.onDialog(dialog);
    } else {
      problems.push(`unexpected ${dialog.type()}: ${dialog.message()}`);
      await dialog.dismiss();
    }
  });
  await page.goto(new URL(path, args.url).href);
  return page;
}

const messageBox = (page) => page.getByRole("textbox", { name: "Message" });
const replies = (page) => page.locator("li.message.assistant");
const sidebar = (page) => page.getByRole("navigation", { name: "Conversations" });

async function send(page, text) {
  const box = messageBox(page);
  await box.fill(text);
  await box.press("Enter");
}

/** Waits until the `index`th reply (the last by default) exists and is no longer streaming. */
async function settled(page, count) {
  await replies(page).nth(count - 1).waitFor();
  await page.locator("li.message.assistant.streaming").waitFor({ state: "detached" });
  return replies(page).last().locator(".body").innerText();
}

/** The texts the last reply showed, polled until it stopped streaming. */
async function watch(page, count) {
  await replies(page).nth(count - 1).waitFor();
  const seen = [];
  const deadline = Date.now() + TIMEOUT_MS;
  while (Date.now() < deadline) {
    const reply = replies(page).last();
    const [text, streaming] = await reply.evaluate((item) => [
      item.querySelector(".body").textContent,
      item.classList.contains("streaming"),
    ]);
    if (seen[seen.length - 1] !== text) {
      seen.push(text);
    }
    if (!streaming) {
      return seen;
    }
    await page.waitForTimeout(10);
  }
  throw new Error("the reply never finished");
}

const pathOf = (page) => new URL(page.url()).pathname;

const scenarios = {
  /** Types two lines (Shift+Enter between them), sends with Enter and watches the reply. */
  async chat(context) {
    const page = await open(context);
    const box = messageBox(page);
    await box.fill("first line");
    await box.press("Shift+Enter");
    await box.pressSequentially("second line");
    await box.press("Enter");
    const seen = await watch(page, 1);
    await sidebar(page).getByRole("link").first().waitFor();
    return {
      seen,
      path: pathOf(page),
      user: await page.locator("li.message.user .body").innerText(),
      boxAfter: await box.inputValue(),
      sidebar: await sidebar(page).getByRole("link").allTextContents(),
      heading: await page.getByRole("heading", { level: 1 }).innerText(),
      currentLink: await sidebar(page).locator('[aria-current="page"]').getAttribute("href"),
    };
  },

  /** A reply with markdown, a code block and HTML in it. */
  async markdown(context) {
    await context.grantPermissions(["clipboard-read", "clipboard-write"]);
    const page = await open(context);
    await send(page, "show me");
    await settled(page, 1);
    const reply = replies(page).last();
    const copy = reply.getByRole("button", { name: "Copy code" });
    await copy.click();
    await reply.getByRole("button", { name: "Copy code" }).getByText("Copied").waitFor();
    return {
      text: await reply.locator(".body").innerText(),
      code: await reply.locator(".code-block code").allTextContents(),
      copyButtons: await copy.count(),
      clipboard: await page.evaluate(() => navigator.clipboard.readText()),
      headings: await reply.locator("h2, h3").allTextContents(),
      items: await reply.locator("li").allTextContents(),
      inlineCode: await reply.locator("p code").allTextContents(),
      strong: await reply.locator("strong").allTextContents(),
      links: await reply.locator("a").evaluateAll((links) => links.map((a) => a.href)),
      elements: await page
        .locator("#message-list")
        .evaluate((list) => list.querySelectorAll("img, script, iframe, [onerror]").length),
    };
  },

  /** Stops a slow reply part way. */
  async stop(context) {
    const page = await open(context);
    await send(page, "go on");
    await page.waitForFunction(
      () => document.querySelector("li.message.assistant .body")?.textContent.length > 10,
    );
    await page.getByRole("button", { name: "Stop" }).click();
    const text = await settled(page, 1);
    await page.getByRole("button", { name: "Stop" }).waitFor({ state: "hidden" });
    return {
      text,
      note: await replies(page).last().locator(".status-note").innerText(),
      regenerate: await page.getByRole("button", { name: "Regenerate" }).count(),
      sendEnabled: await page.getByRole("button", { name: "Send" }).isEnabled(),
    };
  },

  /** A reply, then a new one in its place. */
  async regenerate(context) {
    const page = await open(context);
    await send(page, "hello");
    const first = await settled(page, 1);
    const firstId = await replies(page).last().getAttribute("data-id");
    await step("replied", { first });
    await page.getByRole("button", { name: "Regenerate" }).click();
    await page.locator(`li.message.assistant:not([data-id="${firstId}"])`).waitFor();
    await settled(page, 1);
    return {
      first,
      replies: await replies(page).locator(".body").allInnerTexts(),
      users: await page.locator("li.message.user").count(),
      regenerate: await page.getByRole("button", { name: "Regenerate" }).count(),
    };
  },

  /** Renames one conversation, then deletes the open one (after declining once). */
  async sidebar(context) {
    const page = await open(context);
    const nav = sidebar(page);
    const links = nav.getByRole("link");
    await links.nth(1).waitFor();
    const initial = await links.allTextContents();
    await nav.getByRole("button", { name: "Rename “alpha”" }).click();
    const input = nav.getByRole("textbox", { name: "Title" });
    await input.fill("renamed alpha");
    await input.press("Enter");
    await nav.getByRole("link", { name: "renamed alpha" }).waitFor();
    await nav.getByRole("link", { name: "beta" }).click();
    await page.getByRole("heading", { level: 1, name: "beta" }).waitFor();
    const confirms = [];
    page.onDialog = async (dialog) => {
      confirms.push(dialog.message());
      if (confirms.length === 1) {
        await dialog.dismiss();
      } else {
        await dialog.accept();
      }
    };
    await nav.getByRole("button", { name: "Delete “beta”" }).click();
    const afterDecline = await links.allTextContents();
    await nav.getByRole("button", { name: "Delete “beta”" }).click();
    await nav.getByRole("link", { name: "beta", exact: true }).waitFor({ state: "detached" });
    await page.waitForURL((url) => url.pathname === "/");
    return {
      initial,
      afterDecline,
      confirms,
      final: await links.allTextContents(),
      path: pathOf(page),
      heading: await page.getByRole("heading", { level: 1 }).innerText(),
    };
  },

  /** Reloads the page while a slow reply streams. */
  async reload(context) {
    const page = await open(context);
    await send(page, "long one");
    await page.waitForFunction(
      () => document.querySelector("li.message.assistant .body")?.textContent.length > 20,
    );
    const before = await replies(page).last().locator(".body").textContent();
    await page.reload();
    const seen = await watch(page, 1);
    return {
      before,
      seen,
      replies: await replies(page).count(),
      users: await page.locator("li.message.user .body").allInnerTexts(),
    };
  },

  /** Loses the network while a slow reply streams, then gets it back. */
  async offline(context) {
    const page = await open(context);
    await send(page, "long one");
    await page.waitForFunction(
      () => document.querySelector("li.message.assistant .body")?.textContent.length > 20,
    );
    const known = problems.length;
    await context.setOffline(true);
    await page.getByRole("status").filter({ hasText: /Offline|Reconnecting/ }).waitFor();
    const during = await replies(page).last().locator(".body").textContent();
    await step("offline", { during });
    await context.setOffline(false);
    const seen = await watch(page, 1);
    // Requests made while offline fail, as they should.
    const offline = /ERR_INTERNET_DISCONNECTED|WebSocket connection .* failed/;
    const kept = problems.splice(known).filter((problem) => !offline.test(problem));
    problems.push(...kept);
    return { during, seen, replies: await replies(page).count() };
  },

  /** A second tab on the same conversation sees the reply as it streams. */
  async tabs(context) {
    const first = await open(context);
    await send(first, "for both");
    await first.waitForURL(/\/c\//);
    await replies(first).first().waitFor();
    const second = await open(context, pathOf(first));
    const [seenFirst, seenSecond] = await Promise.all([watch(first, 1), watch(second, 1)]);
    return {
      seenFirst,
      seenSecond,
      secondUser: await second.locator("li.message.user .body").allInnerTexts(),
    };
  },

  /** Back and forward between two conversations. */
  async history(context) {
    const page = await open(context, `/c/${args.first}`);
    const user = () => page.locator("li.message.user .body").first();
    const visited = [];
    const note = async () => {
      await user().waitFor();
      visited.push([pathOf(page), await user().innerText()]);
    };
    await note();
    await sidebar(page).getByRole("link", { name: "second question" }).click();
    await page.getByText("second question", { exact: true }).first().waitFor();
    await page.locator("li.message.user .body", { hasText: "second question" }).waitFor();
    await note();
    await page.goBack();
    await page.locator("li.message.user .body", { hasText: "first question" }).waitFor();
    await note();
    await page.goForward();
    await page.locator("li.message.user .body", { hasText: "second question" }).waitFor();
    await note();
    return { visited };
  },

  /** Without a WebSocket (the server refuses it), conversations still open over REST. */
  async socketless(context) {
    const page = await open(context, `/c/${args.first}`);
    const user = (text) => page.locator("li.message.user .body", { hasText: text });
    await user("first question").waitFor();
    await sidebar(page).getByRole("link", { name: "second question" }).click();
    await user("second question").waitFor();
    const status = await page.locator("#connection").innerText();
    // Every refused connection is an error in the console, as it should be.
    const kept = problems.filter((problem) => !/WebSocket connection .* failed/.test(problem));
    problems.splice(0, problems.length, ...kept);
    return { status, path: pathOf(page) };
  },

  /** What the page shows when the server refuses a message or the model fails. */
  async errors(context) {
    const page = await open(context);
    const alert = page.getByRole("alert");
    await send(page, "a first message that is too long");
    await alert.waitFor();
    const tooLong = {
      notice: await alert.locator("p").innerText(),
      path: pathOf(page),
      box: await messageBox(page).inputValue(),
      messages: await page.locator("li.message").count(),
    };
    await send(page, "one");
    await settled(page, 1);
    await send(page, "two");
    await alert.waitFor();
    const rateLimit = await alert.locator("p").innerText();
    const boxAfter = await messageBox(page).inputValue();
    await step("rate limited");
    await page.getByRole("button", { name: "Dismiss" }).click();
    await page.getByRole("alert").waitFor({ state: "hidden" });
    // The rate is per connection: a reload connects anew.
    await page.reload();
    await page.getByRole("button", { name: "Regenerate" }).click();
    await page.locator("li.message.assistant.error").waitFor();
    return {
      tooLong,
      rateLimit,
      boxAfter,
      users: await page.locator("li.message.user .body").allInnerTexts(),
      failed: await replies(page).last().locator(".body").innerText(),
      note: await replies(page).last().locator(".status-note").innerText(),
    };
  },

  /** markdown.js on its own: each of `cases` rendered, as HTML. */
  async render(context) {
    const page = await open(context);
    return {
      html: await page.evaluate(async (cases) => {
        const { renderMarkdown } = await import("/markdown.js");
        return cases.map((source) => {
          const holder = document.createElement("div");
          holder.append(renderMarkdown(source));
          return holder.innerHTML;
        });
      }, args.cases),
    };
  },

  /** An address that names no conversation. */
  async missing(context) {
    const page = await open(context, `/c/${args.id}`);
    const missing = page.getByText("This conversation does not exist, or it was deleted.");
    await missing.waitFor();
    // Reading the conversation was answered 404, as it should be.
    const kept = problems.filter((problem) => !problem.includes("status of 404"));
    problems.splice(0, problems.length, ...kept);
    return {
      composer: await messageBox(page).isVisible(),
      heading: await page.getByRole("heading", { level: 1 }).innerText(),
    };
  },

  /** Tab goes through every control in order; Enter works them. */
  async keyboard(context) {
    const page = await open(context, `/c/${args.id}`);
    await page.locator("li.message.assistant").waitFor();
    await page.evaluate(() => document.activeElement?.blur());
    const order = [];
    for (let i = 0; i < 12; i += 1) {
      await page.keyboard.press("Tab");
      order.push(
        await page.evaluate(() => {
          const focused = document.activeElement;
          if (focused === document.body) {
            return "(the page)";
          }
          return focused.getAttribute("aria-label") ?? focused.textContent.trim();
        }),
      );
    }
    // Rename with the keyboard alone: the rename button, Enter, a title, Enter.
    await sidebar(page).getByRole("button", { name: /^Rename/ }).focus();
    await page.keyboard.press("Enter");
    await page.keyboard.type("typed title");
    await page.keyboard.press("Enter");
    await sidebar(page).getByRole("link", { name: "typed title" }).waitFor();
    return {
      order,
      focusedAfterRename: await page.evaluate(() => document.activeElement.textContent),
    };
  },

  /** At phone width the sidebar folds away behind a button. */
  async phone(context, browser) {
    const phone = await browser.newContext({ viewport: { width: 390, height: 760 } });
    const page = await open(phone);
    const nav = sidebar(page);
    const hiddenAtFirst = !(await nav.getByRole("link", { name: args.title }).isVisible());
    const toggle = page.getByRole("button", { name: "Show conversations" });
    await toggle.click();
    await nav.getByRole("link", { name: args.title }).click();
    await page.locator("li.message.user .body", { hasText: args.title }).waitFor();
    await nav.getByRole("link", { name: args.title }).waitFor({ state: "hidden" });
    return {
      hiddenAtFirst,
      expanded: await toggle.getAttribute("aria-expanded"),
      path: pathOf(page),
      widthFits: await page.evaluate(() => document.documentElement.scrollWidth <= innerWidth),
    };
  },

  /** With sign-in on: register, chat, sign out, a wrong password, sign in again, a second user. */
  async accounts(context) {
    const page = await open(context);
    const form = page.getByRole("form", { name: "Sign in to chat" });
    const formError = form.getByRole("alert");
    const account = async (username, password, button) => {
      await page.getByLabel("Username").fill(username);
      await page.getByLabel("Password").fill(password);
      await form.getByRole("button", { name: button, exact: true }).click();
    };
    const signOut = async () => {
      await page.getByRole("button", { name: "Sign out" }).click();
      await form.waitFor();
    };
    /** What of the chat is left in the page, shown or not. */
    const leftOver = () =>
      page.evaluate(() => ({
        conversations: document.querySelectorAll("#conversation-list li").length,
        messages: document.querySelectorAll("#message-list li").length,
        token: sessionStorage.getItem("chat.token"),
        chatShown: document.querySelector(".layout").checkVisibility(),
      }));
    const listed = async () => {
      await sidebar(page).getByRole("link").first().waitFor();
      return sidebar(page).getByRole("link").allTextContents();
    };
    await form.waitFor();
    const atFirst = await leftOver();

    await account("ann", "correct horse", "Register");
    await page.getByRole("button", { name: "Sign out" }).waitFor();
    const name = await page.locator("#account-name").innerText();
    await send(page, "hello from ann");
    const seen = await watch(page, 1);
    const annListed = await listed();
    await page.reload();
    await page.locator("li.message.user .body", { hasText: "hello from ann" }).waitFor();
    const nameAfterReload = await page.locator("#account-name").innerText();

    await signOut();
    const afterSignOut = { ...(await leftOver()), path: pathOf(page) };
    await account("ann", "wrong horse", "Sign in");
    await formError.waitFor();
    const wrongPassword = await formError.innerText();
    await account("ANN", "another horse", "Register");
    await formError.filter({ hasText: "taken" }).waitFor();
    const taken = await formError.innerText();

    await account("ann", "correct horse", "Sign in");
    const annAgain = await listed();
    // A second user has none of the first one's conversations.
    await signOut();
    await account("bob", "battery staple", "Register");
    await sidebar(page).getByText("No conversations yet.").waitFor();
    const bob = {
      name: await page.locator("#account-name").innerText(),
      conversations: await sidebar(page).getByRole("link").count(),
    };

    // A token the server no longer takes signs out, saying so.
    await page.evaluate(() => sessionStorage.setItem("chat.token", "not-a-token"));
    await page.reload();
    await formError.waitFor();
    const ended = { message: await formError.innerText(), ...(await leftOver()) };
    // The refused requests were answered 401 and 409, as they should be.
    const kept = problems.filter((problem) => !/status of 40[19]/.test(problem));
    problems.splice(0, problems.length, ...kept);
    return {
      atFirst,
      name,
      seen,
      annListed,
      nameAfterReload,
      afterSignOut,
      wrongPassword,
      taken,
      annAgain,
      bob,
      ended,
    };
  },

  /** With sign-in on: a token that expires while the page is open signs out, saying so. */
  async expiry(context) {
    const page = await open(context);
    const form = page.getByRole("form", { name: "Sign in to chat" });
    await page.getByLabel("Username").fill("ann");
    await page.getByLabel("Password").fill("correct horse");
    /** The paths answered 401 once signed in. */
    const refused = [];
    page.on("response", (response) => {
      if (response.status() === 401) {
        refused.push(new URL(response.url()).pathname);
      }
    });
    await form.getByRole("button", { name: "Register" }).click();
    await page.getByRole("button", { name: "Sign out" }).waitFor();
    await form.getByRole("alert").waitFor();
    // Asking who the page is for before signing in was answered 401, as it should be.
    const kept = problems.filter((problem) => !problem.includes("status of 401"));
    problems.splice(0, problems.length, ...kept);
    return {
      message: await form.getByRole("alert").innerText(),
      token: await page.evaluate(() => sessionStorage.getItem("chat.token")),
      chatShown: await page.locator(".layout").isVisible(),
      refused,
    };
  },

  /** Screenshots of a conversation: `shots` is a list of {path, width, height, dark}. */
  async screenshot(_context, browser) {
    const taken = [];
    for (const shot of args.shots) {
      const context = await browser.newContext({
        viewport: { width: shot.width, height: shot.height },
        colorScheme: shot.dark ? "dark" : "light",
      });
      const page = await open(context, `/c/${args.conversation}`);
      await settled(page, 1);
      await page.evaluate(() => document.activeElement?.blur());
      await page.screenshot({ path: shot.path });
      taken.push(shot.path);
      await context.close();
    }
    return { taken };
  },
};

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: FLAGS,
  timeout: TIMEOUT_MS,
});
try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
  const result = await scenarios[args.scenario](context, browser);
  out({ result: { ...result, problems } });
} catch (error) {
  out({ error: `${error.stack ?? error}`, problems });
} finally {
  await browser.close();
}
process.exit(0);
