// agentplex web console: runs a task on an agent through the gateway with
// gRPC-Web and shows its step events as they stream in. No framework: the
// gRPC-Web framing is a few lines, and protobuf.js encodes and decodes the
// messages against /console/agentplex.json, derived from the contracts.
"use strict";
(() => {
  const AGENT_HEADER = "x-agentplex-agent";
  const SERVICE = "/agentplex.v1.AgentService/";
  const CODES = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
  ];
  const $ = (id) => document.getElementById(id);
  // A gateway started with authentication wants a bearer token on every call; this
  // tab keeps the one pasted (sessionStorage: gone when the tab closes).
  const TOKEN_KEY = "agentplex-token";
  function authorization() {
    const token = $("token").value.trim();
    return token ? { authorization: `Bearer ${token}` } : {};
  }
  let root = null;
  let running = null; // {abort: AbortController, agent, taskId, mode}

  class GrpcError extends Error {
    constructor(code, message) {
      super(message || CODES[code] || `status ${code}`);
      this.code = code;
      this.codeName = CODES[code] || String(code);
    }
  }

  // --- gRPC-Web over fetch ---------------------------------------------------------

  function frame(bytes) {
    const out = new Uint8Array(5 + bytes.length);
    new DataView(out.buffer).setUint32(1, bytes.length);
    out.set(bytes, 5);
    return out;
  }

  function concat(a, b) {
    const out = new Uint8Array(a.length + b.length);
    out.set(a, 0);
    out.set(b, a.length);
    return out;
  }

  function parseTrailers(bytes) {
    const trailers = {};
    for (const line of new TextDecoder().decode(bytes).split("\r\n")) {
      const colon = line.indexOf(":");
      if (colon > 0) trailers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
    }
    return trailers;
  }

  function raiseForStatus(map) {
    const code = Number(map["grpc-status"] || 0);
    if (code !== 0) {
      let message = map["grpc-message"] || "";
      try { message = decodeURIComponent(message); } catch (_) { /* keep it raw */ }
      throw new GrpcError(code, message);
    }
  }

  // One call; yields every response message (one for unary methods).
  async function* call(agent, method, requestType, responseType, request, signal) {
    const encoded = root.lookupType(requestType).encode(root.lookupType(requestType).fromObject(request)).finish();
    const response = await fetch(SERVICE + method, {
      method: "POST",
      body: frame(encoded),
      signal,
      headers: {
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
        "x-user-agent": "agentplex-console/1",
        [AGENT_HEADER]: agent,
        ...authorization(),
      },
    });
    const headers = Object.fromEntries(response.headers.entries());
    if ("grpc-status" in headers) raiseForStatus(headers); // trailers-only answer
    if (!response.ok) throw new GrpcError(response.status === 429 ? 8 : 14, `HTTP ${response.status}`);
    const type = root.lookupType(responseType);
    const reader = response.body.getReader();
    let buffer = new Uint8Array(0);
    let trailers = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buffer = concat(buffer, value);
      while (buffer.length >= 5) {
        const length = new DataView(buffer.buffer, buffer.byteOffset).getUint32(1);
        if (buffer.length < 5 + length) break;
        const flags = buffer[0];
        const payload = buffer.slice(5, 5 + length);
        buffer = buffer.slice(5 + length);
        if (flags & 0x80) trailers = parseTrailers(payload);
        else yield type.toObject(type.decode(payload), { oneofs: true, longs: String, enums: String, defaults: true });
      }
      if (done) break;
    }
    if (trailers) raiseForStatus(trailers);
    else if (!("grpc-status" in headers)) throw new GrpcError(13, "the stream ended without a status");
  }

  async function unary(agent, method, requestType, responseType, request) {
    for await (const message of call(agent, method, requestType, responseType, request)) return message;
    throw new GrpcError(13, `${method} returned no message`);
  }

  // --- rendering ---------------------------------------------------------------------

  function describe(kind, body) {
    switch (kind) {
      case "task_accepted":
        return `accepted · budget ${body.token_budget} tokens, ${body.max_steps} steps`;
      case "step_started":
        return `step started · ${body.tokens_used} tokens used`;
      case "llm_call_finished":
        return `${body.model}: ${body.prompt_tokens} prompt + ${body.completion_tokens} completion tokens · ${body.finish_reason}`;
      case "tool_call":
        return `${body.tool_name}@${body.tool_version} ${body.arguments_json}`;
      case "tool_result":
        return body.outcome === "error"
          ? `${body.tool_name} failed: ${body.error.code} ${body.error.message}`
          : `${body.tool_name} → ${body.result_json}`;
      case "final_result":
        return `finished: ${body.result.output}`;
      case "error":
        return `${body.code}: ${body.message}`;
      case "delegation_started":
        return `delegates to ${body.agent} (task ${body.task_id})`;
      case "delegation_finished":
        return `${body.agent} returned: ${body.result ? body.result.output : ""}`;
      default:
        return JSON.stringify(body);
    }
  }

  function statusName(value) {
    return String(value || "").replace("TASK_STATUS_", "");
  }

  function setStatus(text) {
    $("task-status").textContent = text;
  }

  function showEvent(event) {
    const kind = event.kind;
    const body = event[kind] || {};
    if (event.task_id && event.depth === 0) $("task-id").textContent = event.task_id;
    if (kind === "llm_output_delta") {
      if (event.depth === 0) $("live-output").textContent += body.text;
      return;
    }
    const item = document.createElement("li");
    item.dataset.kind = kind;
    item.dataset.depth = String(event.depth);
    item.style.marginLeft = `${event.depth * 1.5}rem`;
    const agent = document.createElement("span");
    agent.className = "agent";
    agent.textContent = event.agent;
    const label = document.createElement("span");
    label.className = "kind";
    label.textContent = `#${event.sequence} ${kind.replace(/_/g, " ")}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = describe(kind, body);
    item.append(agent, label, text);
    $("events").append(item);
    item.scrollIntoView({ block: "nearest" });
    if (kind === "step_started" && event.depth === 0) $("tokens").textContent = body.tokens_used;
    if (event.depth === 0 && (kind === "final_result" || kind === "error")) finish(kind, body);
  }

  function finish(kind, body) {
    const result = body.result || {};
    $("tokens").textContent = result.tokens_used || $("tokens").textContent;
    setStatus(statusName(result.status) || (kind === "error" ? "FAILED" : "COMPLETED"));
    if (kind === "final_result") {
      $("final-answer").textContent = result.output;
      $("final-answer").hidden = false;
      if (result.error) showError(result.error);
    } else {
      showError(`${body.code}: ${body.message}`);
    }
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = false;
  }

  function reset() {
    $("events").replaceChildren();
    $("live-output").textContent = "";
    $("final-answer").hidden = true;
    $("error").hidden = true;
    $("task-id").textContent = "–";
    $("tokens").textContent = "0";
    setStatus("starting");
  }

  // --- running tasks -----------------------------------------------------------------

  async function runLive(agent, spec, signal) {
    setStatus("RUNNING");
    for await (const response of call(agent, "StreamSteps", "agentplex.v1.StreamStepsRequest", "agentplex.v1.StreamStepsResponse", spec, signal)) {
      showEvent(response.event);
    }
  }

  async function runDurable(agent, spec, signal) {
    const submitted = await unary(agent, "SubmitTask", "agentplex.v1.SubmitTaskRequest", "agentplex.v1.SubmitTaskResponse", { task: spec });
    const taskId = submitted.task.task_id;
    running.taskId = taskId;
    $("task-id").textContent = taskId;
    setStatus(statusName(submitted.task.status));
    for await (const response of call(agent, "WatchTask", "agentplex.v1.WatchTaskRequest", "agentplex.v1.WatchTaskResponse", { task_id: taskId }, signal)) {
      showEvent(response.event);
    }
    const final = await unary(agent, "GetTask", "agentplex.v1.GetTaskRequest", "agentplex.v1.GetTaskResponse", { task_id: taskId });
    setStatus(statusName(final.task.status));
  }

  async function onSubmit(event) {
    event.preventDefault();
    if (running) return;
    reset();
    const agent = $("agent").value;
    const mode = $("mode").value;
    const spec = { prompt: $("prompt").value };
    if ($("session").value) spec.session_id = $("session").value;
    running = { abort: new AbortController(), agent, mode, taskId: null };
    $("run").disabled = true;
    $("cancel").disabled = false;
    try {
      if (mode === "durable") await runDurable(agent, spec, running.abort.signal);
      else await runLive(agent, spec, running.abort.signal);
    } catch (error) {
      if (error.name === "AbortError") setStatus("CANCELLED");
      else {
        setStatus(error.codeName || "ERROR");
        showError(error.codeName ? `${error.codeName}: ${error.message}` : String(error));
      }
    } finally {
      running = null;
      $("run").disabled = false;
      $("cancel").disabled = true;
    }
  }

  async function onCancel() {
    if (!running) return;
    if (running.mode === "durable" && running.taskId) {
      // A durable task outlives this page: ask the agent to stop it.
      await unary(running.agent, "CancelTask", "agentplex.v1.CancelTaskRequest", "agentplex.v1.CancelTaskResponse", { task_id: running.taskId });
    } else {
      running.abort.abort(); // hanging up cancels a live task
    }
  }

  async function start() {
    try {
      const [schema, answer] = await Promise.all([
        fetch("/console/agentplex.json").then((r) => r.json()),
        fetch("/v1/agents", { headers: authorization() }),
      ]);
      if (answer.status === 401) {
        const reason = (await answer.json()).message || "no token";
        $("connection").textContent = `this gateway asks for a token (${reason}): paste one from agentplex token --tenant YOU`;
        $("token").focus();
        return;
      }
      const listing = await answer.json();
      root = protobuf.Root.fromJSON(schema);
      $("agent").replaceChildren();
      for (const agent of listing.agents) {
        const option = new Option(`${agent.name} (${agent.replicas} replica${agent.replicas === 1 ? "" : "s"})`, agent.name);
        option.selected = agent.name === listing.default_agent;
        $("agent").append(option);
      }
      $("connection").textContent = `${listing.agents.length} agents routable`;
      if (!document.body.dataset.ready) {
        $("task-form").addEventListener("submit", onSubmit);
        $("cancel").addEventListener("click", () => onCancel().catch((e) => showError(String(e))));
      }
      document.body.dataset.ready = "true";
    } catch (error) {
      $("connection").textContent = `cannot reach the gateway: ${error}`;
    }
  }

  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    start();
  });
  start();
})();
