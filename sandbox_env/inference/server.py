"""`python -m sandbox_env.serve`: a checkpoint (BF16, fake-quant or INT4) as an OpenAI-compatible server.

Agent frameworks speak the chat-completions API with tool calling; serving our checkpoints that
way lets users point any of them at the model, and lets the generation job's OpenAI teacher run
against a real server in tests. Standard library HTTP (ThreadingHTTPServer) on loopback by
default, one request per thread, all requests decoded together by the batched engine of
`local_policy`. The one idea: the server is the rollout policy behind HTTP. It renders with the
training renderer, decodes with the same engine (prefix-cached: a conversation's next request
reuses the KV cache of its previous one from a small pool, matched by longest common token
prefix), and parses with the same `parse_assistant`, so served and evaluated behaviour are one.

    POST /v1/chat/completions  {model, messages, tools?, temperature?, top_p?, max_tokens?, seed?}
      -> choices[0].message {role, content, reasoning_content, tool_calls: [{id, type, function:
         {name, arguments (JSON text)}}]}, finish_reason "tool_calls" | "stop" | "length"
    GET  /v1/models

    python -m sandbox_env.serve checkpoint=runs/int4 port=8000
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from data.messages import ToolCall
from sandbox_env.inference.engine import InferenceEngine, KVCache, Request, common_prefix
from sandbox_env.inference.loading import LoadedModel

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    pass


def _text(content: Any, where: str) -> str:
    """OpenAI content: a string, null, or a list of {type: text, text} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text":
                raise BadRequest(f"{where}: only text content parts are supported, got {p!r:.80}")
            parts.append(p.get("text") or "")
        return "".join(parts)
    raise BadRequest(f"{where}: content must be a string, null or a list of text parts, got {type(content).__name__}")


def to_render_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat-completions request messages -> the renderer's message dicts (validated)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}].role must be system, user, assistant or tool, got {m.get('role') if isinstance(m, dict) else m!r}")
        role = "system" if m["role"] == "developer" else m["role"]
        msg: dict[str, Any] = {"role": role, "content": _text(m.get("content"), f"messages[{i}]")}
        if role == "assistant":
            msg["reasoning_content"] = m.get("reasoning_content") or m.get("reasoning") or ""
            calls = []
            for j, c in enumerate(m.get("tool_calls") or []):
                fn = c.get("function") or {}
                if not fn.get("name"):
                    raise BadRequest(f"messages[{i}].tool_calls[{j}].function.name is missing")
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass  # rendered as the model wrote it
                calls.append({"id": c.get("id") or f"call_{i}_{j}", "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            if calls:
                msg["tool_calls"] = calls
        elif role == "tool":
            if not m.get("tool_call_id"):
                raise BadRequest(f"messages[{i}] (role tool) needs tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    return out


class ChatService:
    """The request -> response logic, separate from HTTP so it is testable and reusable."""

    def __init__(self, loaded: LoadedModel, *, name: str = "local", max_batch_size: int = 8,
                 default_max_tokens: int = 1024, max_thinking_tokens: int | None = None,
                 default_temperature: float = 0.0, prefix_cache_entries: int = 16):
        from data.render import get_renderer

        self.name = name
        self.renderer = get_renderer(loaded.tokenizer)
        self.engine = InferenceEngine(loaded.model, self.renderer, max_batch_size=max_batch_size)
        self.default_max_tokens = default_max_tokens
        self.max_thinking_tokens = max_thinking_tokens
        self.default_temperature = default_temperature
        self.prefix_cache_entries = prefix_cache_entries
        self._pool: list[KVCache] = []
        self._lock = threading.Lock()
        self.created = int(time.time())

    def _take_cache(self, prompt: list[int]) -> KVCache:
        with self._lock:
            best, best_k = None, 0
            for c in self._pool:
                k = common_prefix(c.ids, prompt)
                if k > best_k:
                    best, best_k = c, k
            if best is not None:
                self._pool.remove(best)
                return best
        return KVCache()

    def _give_cache(self, cache: KVCache) -> None:
        with self._lock:
            self._pool.append(cache)
            del self._pool[: max(0, len(self._pool) - self.prefix_cache_entries)]  # oldest first out

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "agentic-qat"}]}

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("stream"):
            raise BadRequest("stream=true is not supported; request without streaming")
        if body.get("n", 1) != 1:
            raise BadRequest(f"n={body.get('n')!r}: only n=1 is supported")
        messages = to_render_messages(body.get("messages"))
        tools = body.get("tools") or None
        if tools is not None and (not isinstance(tools, list) or any(t.get("type") != "function" for t in tools)):
            raise BadRequest("tools must be a list of {type: function, function: {...}}")
        if body.get("tool_choice") == "none":  # "required" / a named tool cannot be enforced: treated as "auto"
            tools = None
        temperature = float(body["temperature"]) if body.get("temperature") is not None else self.default_temperature
        top_p = float(body["top_p"]) if body.get("top_p") is not None else 1.0
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        if temperature < 0 or not 0 < top_p <= 1 or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], max_tokens={max_tokens!r} a positive int")
        try:
            prompt = self.renderer.render_prompt(messages, tools)
        except ValueError as e:
            raise BadRequest(f"messages cannot be rendered: {e}") from None
        cache = self._take_cache(prompt)
        seed = body.get("seed")
        req = Request(prompt_ids=prompt, cache=cache, max_new_tokens=max_tokens,
                      max_thinking_tokens=self.max_thinking_tokens, temperature=temperature, top_p=top_p,
                      seed=int(seed) if seed is not None else uuid.uuid4().int >> 66)
        try:
            res = self.engine.submit(req)
        finally:
            self._give_cache(cache)
        parsed = self.renderer.parse_assistant(res.token_ids)
        calls = [ToolCall(c.name, c.arguments, f"call_{uuid.uuid4().hex[:12]}_{j}").to_openai("", arguments_as_text=True)
                 for j, c in enumerate(parsed.tool_calls)]
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or "",
                                   "reasoning_content": parsed.reasoning_content or None}
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else ("stop" if res.stopped else "length")
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(res.token_ids),
                          "total_tokens": len(prompt) + len(res.token_ids),
                          "prompt_tokens_details": {"cached_tokens": res.reused_tokens}}}


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for `service` (port 0 = a free port; read it from server.server_address)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # through logging, not stderr
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, msg: str, kind: str = "invalid_request_error") -> None:
            self._send(code, {"error": {"message": msg, "type": kind, "code": code}})

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                return self._send(200, service.models())
            if path in ("/health", "/v1/health"):
                return self._send(200, {"status": "ok"})
            return self._error(404, f"no route GET {self.path}; try /v1/models or POST /v1/chat/completions")

        def do_POST(self):
            path = self.path.split("?")[0].rstrip("/")
            if path not in ("/v1/chat/completions", "/chat/completions"):
                return self._error(404, f"no route POST {self.path}; use /v1/chat/completions")
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                return self._send(200, service.chat(body))
            except (BadRequest, json.JSONDecodeError) as e:
                return self._error(400, str(e))
            except Exception as e:  # a server must answer, not hang the client
                log.exception("chat completion failed")
                return self._error(500, f"{type(e).__name__}: {e}", "server_error")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(cfg: dict[str, Any]) -> None:
    from sandbox_env.inference.loading import load_policy_model

    if not cfg.get("checkpoint") or cfg["checkpoint"] == "???":
        raise ValueError("checkpoint is required: python -m sandbox_env.serve checkpoint=runs/int4")
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    loaded = load_policy_model(cfg["checkpoint"], dtype=cfg.get("dtype"), device=cfg.get("device", "cpu"))
    service = ChatService(loaded, name=cfg.get("name") or loaded.path, max_batch_size=cfg["max_batch_size"],
                          default_max_tokens=cfg["max_tokens"], max_thinking_tokens=cfg.get("max_thinking_tokens"),
                          default_temperature=cfg["temperature"], prefix_cache_entries=cfg["prefix_cache_entries"])
    server = make_server(service, cfg["host"], cfg["port"])
    host, port = server.server_address[:2]
    print(f"serving {loaded.kind} checkpoint {loaded.path} as {service.name!r} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.engine.close()
