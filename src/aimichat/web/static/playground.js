// The playground streams replies from /playground/stream (the API's own SSE format). Without this
// file the form posts to /playground and the reply arrives in a new page.
"use strict";

(function () {
  var form = document.getElementById("chat-form");
  if (!form || !window.fetch || !window.TextDecoder) return;
  var log = document.getElementById("log");
  var input = document.getElementById("message");
  var send = document.getElementById("send");
  var remaining = document.getElementById("remaining");
  var errorBox = document.getElementById("chat-error");
  var picker = document.getElementById("model"); // absent when the plan includes no model
  var csrf = document.querySelector("meta[name=csrf-token]").content;

  function history() {
    return Array.prototype.map.call(log.querySelectorAll("li[data-role]"), function (li) {
      return { role: li.getAttribute("data-role"), content: li.querySelector(".text").textContent };
    });
  }

  function bubble(role, text, model) {
    var li = document.createElement("li");
    li.className = "msg " + role;
    li.setAttribute("data-role", role);
    var who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : model || "AimiChat";
    var body = document.createElement("div");
    body.className = "text";
    body.textContent = text; // textContent, never innerHTML: model output is text
    li.append(who, body);
    log.append(li);
    return li;
  }

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

  function errorMessage(body, status) {
    if (body && typeof body.error === "object" && body.error) return body.error.message;
    if (body && body.message) return body.message + (body.resetAt ? ". Credits come back at " + body.resetAt + "." : ".");
    return "The request failed (HTTP " + status + ").";
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

  async function submit() {
    var text = input.value.trim();
    if (!text) return;
    showError("");
    var messages = history().concat([{ role: "user", content: text }]);
    bubble("user", text);
    input.value = "";
    var model = picker ? picker.value : "";
    var reply = bubble("assistant", "", model);
    reply.classList.add("pending");
    var out = reply.querySelector(".text");
    var who = reply.querySelector(".who");
    send.disabled = true;
    log.setAttribute("aria-busy", "true");
    try {
      var response = await fetch("/playground/stream", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(model ? { messages: messages, model: model } : { messages: messages }),
        credentials: "same-origin"
      });
      if (!response.ok) {
        var body = await response.json().catch(function () { return null; });
        if (response.status === 401 && body && body.error && body.error.code === "session_required") {
          var lost = new Error("");
          lost.loggedOut = true;
          throw lost;
        }
        throw new Error(errorMessage(body, response.status));
      }
      await readEvents(response, function (event) {
        if (event.error) throw new Error(event.error.message);
        if (event.model && reply.getAttribute("data-model") !== event.model) {
          reply.setAttribute("data-model", event.model); // the model that answered (an alias's model)
          who.textContent = event.model;
        }
        var choice = event.choices && event.choices[0];
        if (choice && choice.delta && choice.delta.content) out.textContent += choice.delta.content;
        if (event.x_ratelimit) remaining.textContent = event.x_ratelimit.remaining.toLocaleString("en-US");
      });
      if (!out.textContent) reply.remove();
    } catch (err) {
      if (!out.textContent) reply.remove();
      if (err.loggedOut) {
        showLoggedOut();
        input.value = text; // kept, to send again after log-in
      } else {
        showError(err.message);
      }
    } finally {
      reply.classList.remove("pending");
      send.disabled = false;
      log.removeAttribute("aria-busy");
      input.focus();
    }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    submit();
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!send.disabled) submit();
    }
  });
})();
