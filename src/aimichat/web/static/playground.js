// The playground in the browser. Replies stream from /playground/stream (the API's own SSE format) and are
// shown as Markdown: marked turns the text into HTML and DOMPurify keeps only harmless tags, so a reply can
// neither run script nor carry event handlers or javascript: links. Stop cancels a reply (the server charges
// only what it sent), "View code" shows the request Send would make as curl, Python and Node, and the
// conversation and settings are kept in localStorage until "New chat".
// Without this file the form posts to /playground and each reply arrives, as plain text, in a new page.
"use strict";

(function () {
  var form = document.getElementById("chat-form");
  if (!form || !window.fetch || !window.TextDecoder || !window.AbortController) return;
  var chat = document.getElementById("chat");
  var log = document.getElementById("log");
  var input = document.getElementById("message");
  var send = document.getElementById("send");
  var stop = document.getElementById("stop");
  var newChat = document.getElementById("new-chat");
  var remaining = document.getElementById("remaining");
  var errorBox = document.getElementById("chat-error");
  var picker = document.getElementById("model"); // absent when the plan includes no model
  var settingsBox = document.getElementById("settings");
  var viewCode = document.getElementById("view-code");
  var csrf = document.querySelector("meta[name=csrf-token]").content;
  var fields = {
    system: document.getElementById("system"),
    temperature: document.getElementById("temperature"),
    max_tokens: document.getElementById("max_tokens")
  };
  var MAX_MESSAGES = 40; // the server keeps the last 40 turns (playground.MAX_MESSAGES)
  var KEPT_TURNS = 200; // what localStorage keeps of a long conversation
  var storageKey = "aimichat.playground." + chat.getAttribute("data-account");

  // The conversation: turns ({role, content, model?, stopped?}) and, index for index, their <li>.
  var turns = [];
  var views = [];
  var controller = null; // the running reply's AbortController

  // -- Markdown --------------------------------------------------------------------------------------

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  // HTML typed into a reply is shown as text (a model asked about HTML means it as code, not as markup);
  // images become links, since pictures from elsewhere are not loaded (CSP img-src 'self').
  var markdown = window.marked && window.DOMPurify ? new window.marked.Marked({
    gfm: true,
    breaks: true,
    renderer: {
      html: function (token) {
        return token.block ? "<p>" + escapeHtml(token.text) + "</p>" : escapeHtml(token.text);
      },
      image: function (token) {
        return '<a href="' + escapeHtml(token.href) + '">' + escapeHtml(token.text || token.href) + "</a>";
      }
    }
  }) : null;

  // Whatever marked produced, only these tags and attributes reach the page (no style: CSP style-src 'self').
  var PURIFY = {
    ALLOWED_TAGS: ["a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i",
      "li", "ol", "p", "pre", "s", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"],
    ALLOWED_ATTR: ["href", "title", "class", "align", "start"],
    RETURN_DOM_FRAGMENT: true
  };
  if (markdown) {
    window.DOMPurify.addHook("uponSanitizeAttribute", function (node, data) {
      // A code block's language (marked's class) may stay; the page's own classes may not be borrowed.
      if (data.attrName === "class" && !/^language-[\w+#.-]+$/.test(data.attrValue)) data.keepAttr = false;
    });
    window.DOMPurify.addHook("afterSanitizeAttributes", function (node) {
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank"); // the conversation stays open in this tab
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
  }

  function renderText(target, turn) {
    if (turn.role !== "assistant" || !markdown) {
      target.textContent = turn.content; // a person's own words are shown as typed
      return;
    }
    target.classList.add("md");
    target.replaceChildren(window.DOMPurify.sanitize(markdown.parse(turn.content, { async: false }), PURIFY));
    target.querySelectorAll("pre").forEach(function (pre) {
      var box = document.createElement("div");
      box.className = "code";
      var copy = document.createElement("button");
      copy.type = "button";
      copy.className = "button small copy";
      copy.textContent = "Copy";
      copy.setAttribute("aria-label", "Copy code");
      pre.tabIndex = 0; // a long line scrolls sideways: the keyboard must reach it too
      pre.replaceWith(box);
      box.append(copy, pre);
    });
  }

  // -- copying a code block ----------------------------------------------------------------------------

  function copied(button) {
    button.textContent = "Copied";
    setTimeout(function () { button.textContent = "Copy"; }, 2000);
  }

  function copyCode(button) {
    var code = button.parentNode.querySelector("pre");
    var text = code.textContent;
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { copied(button); }, function () { selectAndCopy(code, button); });
    } else {
      selectAndCopy(code, button); // plain http on another host: no clipboard API
    }
  }

  function selectAndCopy(node, button) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try {
      if (document.execCommand("copy")) copied(button);
    } catch (e) { /* the text stays selected for Ctrl+C */ }
  }

  log.addEventListener("click", function (event) {
    var button = event.target.closest("button.copy");
    if (button && log.contains(button)) copyCode(button);
  });

  // -- the log ------------------------------------------------------------------------------------------

  function bubble(turn) {
    var li = document.createElement("li");
    li.className = "msg " + turn.role;
    li.setAttribute("data-role", turn.role);
    if (turn.model) li.setAttribute("data-model", turn.model);
    var who = document.createElement("span");
    who.className = "who";
    who.textContent = turn.role === "user" ? "You" : turn.model || "AimiChat";
    var body = document.createElement("div");
    body.className = "text";
    renderText(body, turn);
    li.append(who, body);
    if (turn.stopped) markStopped(li);
    return li;
  }

  function markStopped(li) {
    var note = document.createElement("span");
    note.className = "stopped-note";
    note.textContent = "Stopped. You pay only for the text that was sent.";
    li.append(note);
  }

  function addTurn(turn) {
    var li = bubble(turn);
    turns.push(turn);
    views.push(li);
    log.append(li);
    return li;
  }

  function dropTurn(turn) {
    var index = turns.lastIndexOf(turn);
    if (index < 0) return;
    views[index].remove();
    turns.splice(index, 1);
    views.splice(index, 1);
  }

  function clearLog() {
    turns = [];
    views = [];
    log.replaceChildren();
  }

  // -- keeping the conversation (localStorage; per account, so two accounts in one browser never mix) ---

  function settingsNow() {
    return { system: fields.system.value, temperature: fields.temperature.value, max_tokens: fields.max_tokens.value };
  }

  function save() {
    try {
      var kept = turns.slice(-KEPT_TURNS);
      localStorage.setItem(storageKey, JSON.stringify({ v: 1, turns: kept, settings: settingsNow() }));
    } catch (e) { /* storage full or switched off: the conversation lasts as long as the page */ }
  }

  function stored() {
    try {
      var data = JSON.parse(localStorage.getItem(storageKey) || "null");
      if (data && data.v === 1 && Array.isArray(data.turns)) return data;
    } catch (e) { /* unreadable: start afresh */ }
    return null;
  }

  function validTurn(turn) {
    return turn && (turn.role === "user" || turn.role === "assistant") && typeof turn.content === "string";
  }

  function restore() {
    if (chat.getAttribute("data-server-turns") === "yes") {
      // A page the server rendered with a conversation (the form posted without script): it wins.
      Array.prototype.forEach.call(log.querySelectorAll("li[data-role]"), function (li) {
        turns.push({ role: li.getAttribute("data-role"), content: li.querySelector(".text").textContent,
          model: li.getAttribute("data-model") || undefined });
      });
      log.replaceChildren();
      var all = turns;
      turns = [];
      all.forEach(addTurn);
      save();
      return;
    }
    var data = stored();
    if (!data) return;
    data.turns.filter(validTurn).forEach(function (turn) {
      addTurn({ role: turn.role, content: turn.content, model: typeof turn.model === "string" ? turn.model : undefined,
        stopped: turn.stopped === true || undefined });
    });
    var settings = data.settings || {};
    Object.keys(fields).forEach(function (name) {
      if (typeof settings[name] === "string") fields[name].value = settings[name];
    });
  }

  // -- following a reply: keep the bottom in view, unless the person scrolled up to read -----------------

  var following = true;
  var lastTop = 0;
  var streaming = null; // the <li> of the reply that is streaming
  function scroller() { return document.scrollingElement || document.documentElement; }
  function atBottom() {
    var el = scroller();
    return el.scrollHeight - el.scrollTop - el.clientHeight < 48;
  }
  // Scrolling down far enough to see the end of the reply follows it again (the page grows while the
  // person scrolls, so the very bottom may be out of reach); scrolling up stops following.
  function replyEndInView() {
    return streaming !== null && streaming.getBoundingClientRect().bottom <= window.innerHeight;
  }
  window.addEventListener("scroll", function () {
    var top = scroller().scrollTop;
    if (atBottom() || (top > lastTop && replyEndInView())) following = true;
    else if (top < lastTop) following = false; // moved up: a reply growing below never scrolls up
    lastTop = top;
  }, { passive: true });

  function follow() {
    if (!following) return;
    var el = scroller();
    el.scrollTop = el.scrollHeight;
    lastTop = el.scrollTop;
  }

  // -- errors ------------------------------------------------------------------------------------------

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  // A lapsed session: say so in plain words, with a link that brings the person back here after log-in.
  function showLoggedOut() {
    var link = document.createElement("a");
    link.href = "/login?next=/playground&reason=expired";
    link.textContent = "Log in again";
    errorBox.textContent = "Your session expired, so this message was not sent. ";
    errorBox.append(link, " and send it once more.");
    errorBox.hidden = false;
  }

  // A conversation that cannot be sent again however the message is edited: a reply longer than the server
  // takes back (conversation_too_long), more than the model reads at once (context_length_exceeded), or a
  // body past the server's limit (413). Said plainly, with the way out next to it: a new chat.
  var TOO_LONG_CODES = ["conversation_too_long", "context_length_exceeded"];
  function tooLong(refusal, status) {
    return status === 413 || Boolean(refusal && refusal.error && TOO_LONG_CODES.indexOf(refusal.error.code) >= 0);
  }

  function showTooLong(refusal) {
    var said = refusal && refusal.error && refusal.error.code === "conversation_too_long" ? refusal.error.message
      : "This conversation has grown too long to send again.";
    var button = document.createElement("button");
    button.type = "button";
    button.className = "button small";
    button.textContent = "New chat";
    button.addEventListener("click", startNewChat);
    errorBox.textContent = said + " Your message is still in the box: start a new chat to send it. ";
    errorBox.append(button);
    errorBox.hidden = false;
  }

  // The server names the field a refusal is about (`param`); its message goes right under that field.
  function fieldOf(param) {
    if (param === "model") return picker;
    return Object.prototype.hasOwnProperty.call(fields, param) ? fields[param] : null;
  }

  function showFieldError(param, message) {
    var field = fieldOf(param);
    var box = document.getElementById(param + "-error");
    if (!field || !box) return false;
    box.textContent = message;
    box.hidden = false;
    field.setAttribute("aria-invalid", "true");
    if (settingsBox.contains(field)) settingsBox.open = true;
    field.focus();
    return true;
  }

  function clearFieldErrors() {
    ["model", "system", "temperature", "max_tokens"].forEach(function (param) {
      var field = fieldOf(param);
      var box = document.getElementById(param + "-error");
      if (field) field.removeAttribute("aria-invalid");
      if (box) {
        box.textContent = "";
        box.hidden = true;
      }
    });
  }

  function errorMessage(body, status) {
    if (body && typeof body.error === "object" && body.error) return body.error.message;
    if (body && body.message) return body.message + (body.resetAt ? ". Credits come back at " + body.resetAt + "." : ".");
    return "The request failed (HTTP " + status + ").";
  }

  // -- sending -----------------------------------------------------------------------------------------

  function apiMessages(turnList) {
    return turnList.slice(-MAX_MESSAGES).map(function (turn) { return { role: turn.role, content: turn.content }; });
  }

  async function readEvents(response, onEvent) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    for (;;) {
      var chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      var events = buffer.split("\n\n");
      buffer = events.pop();
      events.forEach(function (event) {
        var data = event.replace(/^data: /, "");
        if (data && data !== "[DONE]") onEvent(JSON.parse(data));
      });
    }
  }

  function setBusy(busy) {
    send.disabled = busy;
    stop.hidden = !busy;
    if (busy) log.setAttribute("aria-busy", "true");
    else log.removeAttribute("aria-busy");
  }

  // A refused request changed nothing: its message goes back in the box and off the log.
  function unsend(question, reply, text) {
    dropTurn(reply);
    dropTurn(question);
    input.value = text;
    save();
  }

  async function submit() {
    var text = input.value.trim();
    if (!text || controller) return;
    showError("");
    clearFieldErrors();
    var model = picker ? picker.value : "";
    var question = { role: "user", content: text };
    var body = { messages: apiMessages(turns.concat([question])) };
    if (model) body.model = model;
    Object.keys(fields).forEach(function (name) { body[name] = fields[name].value; });
    addTurn(question);
    input.value = "";
    var reply = { role: "assistant", content: "", model: model || undefined };
    var li = addTurn(reply);
    li.classList.add("pending");
    streaming = li;
    var out = li.querySelector(".text");
    var who = li.querySelector(".who");
    following = true; // a message just sent: show its reply
    follow();
    var frame = 0;
    function render() {
      frame = 0;
      renderText(out, reply);
      follow();
    }
    controller = new AbortController();
    setBusy(true);
    try {
      var response = await fetch("/playground/stream", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body),
        credentials: "same-origin",
        signal: controller.signal
      });
      if (!response.ok) {
        var refusal = await response.json().catch(function () { return null; });
        unsend(question, reply, text);
        if (response.status === 401 && refusal && refusal.error && refusal.error.code === "session_required") {
          showLoggedOut(); // the message stays in the box, to send again after log-in
        } else if (tooLong(refusal, response.status)) {
          showTooLong(refusal);
        } else if (!(refusal && refusal.error && showFieldError(refusal.error.param, refusal.error.message))) {
          showError(errorMessage(refusal, response.status));
        }
        return;
      }
      await readEvents(response, function (event) {
        if (event.error) throw new Error(event.error.message);
        if (event.model && reply.model !== event.model) {
          reply.model = event.model; // the model that answered (an alias's model)
          li.setAttribute("data-model", event.model);
          who.textContent = event.model;
        }
        var choice = event.choices && event.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          reply.content += choice.delta.content;
          if (!frame) frame = requestAnimationFrame(render); // at most one render a frame
        }
        if (event.x_ratelimit) remaining.textContent = event.x_ratelimit.remaining.toLocaleString("en-US");
      });
    } catch (err) {
      if (err.name === "AbortError") {
        if (reply.content) {
          reply.stopped = true;
          markStopped(li);
        }
        refreshRemaining();
      } else {
        showError(err.message || "The connection was lost.");
      }
    } finally {
      if (frame) cancelAnimationFrame(frame);
      controller = null;
      streaming = null;
      li.classList.remove("pending");
      if (turns.indexOf(reply) >= 0) {
        if (reply.content) render();
        else dropTurn(reply);
      }
      save();
      setBusy(false);
      if (!form.querySelector("[aria-invalid=true]")) input.focus();
      refreshCode();
    }
  }

  function stopReply() {
    if (controller) controller.abort();
  }

  // A stopped reply never gets the stream's last chunk, which carries the credits left: ask for them.
  // (The server settles a hang-up as soon as it notices it; should this answer come first, it counts the
  // reply's whole reservation, and the next reply's figure puts it right.)
  async function refreshRemaining() {
    try {
      var response = await fetch("/api/account/usage?days=1", { credentials: "same-origin" });
      var usage = response.ok ? await response.json() : null;
      if (usage && usage.daily) remaining.textContent = usage.daily.remaining.toLocaleString("en-US");
    } catch (e) { /* the figure stays as it was until the next reply */ }
  }

  // -- "View code": the request Send would make now, for this server, with the key left to the reader ---

  function numberOr(field) {
    var value = Number(field.value.trim() === "" ? field.getAttribute("data-default") : field.value);
    return isFinite(value) ? value : Number(field.getAttribute("data-default"));
  }

  function requestNow() {
    var messages = apiMessages(turns);
    var draft = input.value.trim();
    if (draft) messages.push({ role: "user", content: draft });
    if (!messages.length) messages.push({ role: "user", content: "Hello!" });
    var system = fields.system.value.trim();
    if (system) messages.unshift({ role: "system", content: system });
    var body = {};
    if (picker && picker.value) body.model = picker.value;
    body.messages = messages;
    body.temperature = numberOr(fields.temperature);
    body.max_tokens = numberOr(fields.max_tokens);
    return body;
  }

  function curlCode(origin, body) {
    var json = JSON.stringify(body, null, 2).replace(/'/g, "'\\''"); // inside '...' for the shell
    return "curl " + origin + "/v1/chat/completions \\\n" +
      '  -H "Authorization: Bearer $AIMICHAT_API_KEY" \\\n' +
      '  -H "Content-Type: application/json" \\\n' +
      "  -d '" + json + "'";
  }

  function pythonCode(origin, body) {
    // JSON strings are valid Python string literals (the same escapes), so messages are written as JSON.
    var lines = ["import os", "", "from openai import OpenAI", "",
      "client = OpenAI(base_url=" + JSON.stringify(origin + "/v1") + ', api_key=os.environ["AIMICHAT_API_KEY"])',
      "completion = client.chat.completions.create("];
    if (body.model) lines.push("    model=" + JSON.stringify(body.model) + ",");
    lines.push("    messages=[");
    body.messages.forEach(function (m) {
      lines.push('        {"role": ' + JSON.stringify(m.role) + ', "content": ' + JSON.stringify(m.content) + "},");
    });
    lines.push("    ],", "    temperature=" + body.temperature + ",", "    max_tokens=" + body.max_tokens + ",", ")",
      "print(completion.choices[0].message.content)");
    return lines.join("\n");
  }

  function nodeCode(origin, body) {
    return "// Node.js 18 or later: fetch is built in.\n" +
      "const body = " + JSON.stringify(body, null, 2) + ";\n\n" +
      "fetch(" + JSON.stringify(origin + "/v1/chat/completions") + ", {\n" +
      '  method: "POST",\n' +
      "  headers: {\n" +
      "    Authorization: `Bearer ${process.env.AIMICHAT_API_KEY}`,\n" +
      '    "Content-Type": "application/json",\n' +
      "  },\n" +
      "  body: JSON.stringify(body),\n" +
      "})\n" +
      "  .then((response) => response.json())\n" +
      "  .then((data) => console.log(data.choices ? data.choices[0].message.content : data));";
  }

  function refreshCode() {
    if (!viewCode.open) return;
    var origin = window.location.origin; // this server, as the person reaches it
    var body = requestNow();
    document.getElementById("code-curl").textContent = curlCode(origin, body);
    document.getElementById("code-python").textContent = pythonCode(origin, body);
    document.getElementById("code-node").textContent = nodeCode(origin, body);
  }

  // -- wiring ------------------------------------------------------------------------------------------

  // The page now keeps the conversation; the hidden copies of it are for the form without script.
  form.querySelectorAll("input[name=role], input[name=content], input[name=turn_model]").forEach(function (field) {
    field.remove();
  });
  form.noValidate = true; // the server's messages, next to their fields, say what is wrong
  restore();
  viewCode.hidden = false;
  if (turns.length) follow(); // back where the conversation left off

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    submit();
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!send.disabled) submit();
    } else if (event.key === "Escape" && controller) {
      stopReply();
    }
  });
  stop.addEventListener("click", stopReply);
  // The draft in the box stays: a message refused as too long for this conversation goes to the new one.
  function startNewChat() {
    stopReply();
    clearLog();
    showError("");
    save();
    refreshCode();
    input.focus();
  }
  newChat.addEventListener("click", function (event) {
    event.preventDefault(); // the link reloads the page without script; here the page clears itself
    startNewChat();
  });
  form.addEventListener("input", function (event) {
    if (event.target !== input) save(); // the settings
    refreshCode();
  });
  form.addEventListener("change", refreshCode); // the model picker
  viewCode.addEventListener("toggle", refreshCode);
})();
