"""`hovle serve`: an OpenAI-compatible chat server (FastAPI + uvicorn) and a small chat page.

One worker thread runs the model; requests wait in a bounded queue (full -> 429). Images come as
`data:` URLs, as http(s) URLs with `allow_remote_images` (public addresses only), or as paths inside
`image_root`. Every error has the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.

fastapi / uvicorn / httpx are imported lazily, so `hovle` works without the serve extra.
"""


import argparse
import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import torch

log = logging.getLogger("hovle.serve")
STATIC = Path(__file__).parent / "static"
RESERVED = ("<image>", "<img>", "</img>", "<IMG_CONTEXT>")
MiB = 1024 * 1024


@dataclass
class ServeSettings:
    model_name: str = "hovle"
    api_key: str | None = None
    image_root: str | None = None  # local image paths are refused unless inside this folder
    allow_remote_images: bool = False  # http(s) image URLs (public addresses only)
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 40_000_000
    max_tiles: int | None = None  # per image; None = the model's max_dynamic_patch
    max_images: int = 8  # per request, all turns together
    max_body_bytes: int = 64 * MiB
    max_tokens_default: int = 512  # when the request gives no max_tokens (cut to fit the context)
    request_timeout: float = 300.0  # seconds from arrival to the last token
    queue_size: int = 16  # requests waiting for the model (the one running not counted)
    remote_timeout: float = 10.0


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---------------------------------------------------------------------------
# Request validation (by hand: exact types, one clear message naming the field)
# ---------------------------------------------------------------------------

def _num(body: dict, key: str, kind, lo=None, hi=None, lo_open=False):
    v = body.get(key)
    if v is None:
        return None
    ok = not isinstance(v, bool) and isinstance(v, int if kind is int else (int, float))
    if not ok or (kind is float and not math.isfinite(v)):
        raise bad(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)[:40]}", key)
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise bad(f"'{key}' must be in {rng}, got {v}", key)
    return v


@dataclass
class Turn:
    text: str = ""
    images: list = field(default_factory=list)  # image references (url strings) in order


@dataclass
class ParsedRequest:
    system: str | None
    turns: list[tuple[Turn, str]]  # earlier (user turn, assistant reply) pairs
    last: Turn
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_request(body: Any, model_name: str) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    if model not in (None, "", model_name):
        raise APIError(404, f"model {model!r} does not exist; this server serves {model_name!r}",
                       "invalid_request_error", "model", "model_not_found")
    if body.get("n", 1) not in (1, None) or isinstance(body.get("n"), bool):
        raise bad("only n=1 is supported", "n")
    max_tokens = _num(body, "max_tokens", int, 1)
    mct = _num(body, "max_completion_tokens", int, 1)
    max_tokens = max_tokens if max_tokens is not None else mct
    temperature = _num(body, "temperature", float, 0, 2)
    top_p = _num(body, "top_p", float, 0, 1, lo_open=True)
    seed = _num(body, "seed", int, -(2**63), 2**64 - 1)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = bool(opts.get("include_usage", False))
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad("'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    system_parts, pairs, pending = [], [], None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role must be one of system, developer, user, assistant; got {json.dumps(role)}",
                      f"{where}.role")
        turn = _parse_content(m.get("content"), f"{where}.content", images_ok=role == "user")
        if role in ("system", "developer"):
            system_parts.append(turn.text)
        elif role == "user":
            if pending is None:
                pending = turn
            else:  # consecutive user messages form one turn
                pending = Turn("\n".join(t for t in (pending.text, turn.text) if t), pending.images + turn.images)
        else:
            if pending is None:
                raise bad(f"{where}: an assistant message must follow a user message", f"{where}.role")
            pairs.append((pending, turn.text))
            pending = None
    if pending is None:
        raise bad("the last non-system message must be a user message", "messages")
    return ParsedRequest("\n".join(system_parts) if system_parts else None, pairs, pending, max_tokens, temperature,
                         top_p, stop, seed, stream, include_usage)


def _parse_content(content, where: str, images_ok: bool) -> Turn:
    if content is None:
        return Turn()
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise bad(f"{where} must be a string or a list of content parts", where)
    turn, texts = Turn(), []
    for j, part in enumerate(parts):
        pw = f"{where}[{j}]" if isinstance(content, list) else where
        if not isinstance(part, dict):
            raise bad(f"{pw} must be an object", pw)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{pw}.text must be a string", f"{pw}.text")
            for marker in RESERVED:
                if marker in text:
                    raise bad(f"{pw}: the text may not contain the reserved marker {marker}; send images as "
                              "image_url parts", f"{pw}.text")
            texts.append(text)
        elif kind == "image_url":
            if not images_ok:
                raise bad(f"{pw}: only user messages may hold images", pw)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad(f"{pw}.image_url must be {{\"url\": string}}", f"{pw}.image_url")
            turn.images.append((url, f"{pw}.image_url"))
        else:
            raise bad(f"{pw}.type must be 'text' or 'image_url', got {json.dumps(kind)[:40]}", f"{pw}.type")
    turn.text = "\n".join(texts)
    return turn


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def _too_large(param: str, what: str) -> APIError:
    return APIError(413, f"{param}: {what}", "invalid_request_error", param, "image_too_large")


def decode_image_bytes(data: bytes, param: str, settings: ServeSettings):
    """Bytes -> RGB PIL image, with the byte and pixel limits; 400 / 413 on failure."""
    from PIL import Image

    if len(data) > settings.max_image_bytes:
        raise _too_large(param, f"image is {len(data)} bytes, over the limit of {settings.max_image_bytes}")
    if not data:
        raise bad(f"{param}: the image is empty", param, "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > settings.max_image_pixels:
                    raise _too_large(param, f"image is {img.width}x{img.height} pixels, over the limit of "
                                            f"{settings.max_image_pixels}")
                img.load()
                return img.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise _too_large(param, f"decompression bomb refused ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise bad(f"{param}: not a recognised image format", param, "invalid_image") from e
    except Exception as e:  # PIL reports corrupt data with many types
        raise bad(f"{param}: cannot decode image ({type(e).__name__})", param, "invalid_image") from e


def _decode_data_url(url: str, param: str, settings: ServeSettings) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise bad(f"{param}: malformed data URL (expected data:image/...;base64,...)", param, "invalid_image")
    mime = head[5:].split(";")[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise bad(f"{param}: data URL has type {mime!r}, not an image", param, "invalid_image")
    if ";base64" not in head.lower():
        raise bad(f"{param}: only base64 data URLs are supported", param, "invalid_image")
    if len(payload) > settings.max_image_bytes * 4 // 3 + 8:
        raise _too_large(param, f"image is about {len(payload) * 3 // 4} bytes, over the limit of "
                                f"{settings.max_image_bytes}")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"{param}: invalid base64 in data URL", param, "invalid_image") from e


def _forbidden(param: str, message: str) -> APIError:
    return APIError(403, f"{param}: {message}", "permission_error", param, "image_url_forbidden")


def _read_local(url: str, param: str, settings: ServeSettings) -> bytes:
    if settings.image_root is None:
        raise _forbidden(param, "local image paths are disabled (start the server with --image-root)")
    raw = unquote(urlsplit(url).path) if url.startswith("file:") else url
    root = Path(settings.image_root).resolve()
    path = (root / raw).resolve()  # an absolute raw path replaces root
    if not path.is_relative_to(root):
        raise _forbidden(param, "the path is outside the server's image root")
    if not path.is_file():
        raise bad(f"{param}: no image file at that path inside the image root", param, "invalid_image")
    if path.stat().st_size > settings.max_image_bytes:
        raise _too_large(param, f"image file is {path.stat().st_size} bytes, over the limit of "
                                f"{settings.max_image_bytes}")
    return path.read_bytes()


def _public_address(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


async def _fetch_remote(url: str, param: str, settings: ServeSettings) -> bytes:
    if not settings.allow_remote_images:
        raise _forbidden(param, "http(s) image URLs are disabled (start the server with --allow-remote-images); "
                                "send the image as a data: URL")
    import httpx

    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise bad(f"{param}: URL has no host", param, "invalid_image")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise bad(f"{param}: cannot resolve host {host!r}", param, "invalid_image") from e
    addrs = sorted({info[4][0] for info in infos})
    if not addrs or not all(_public_address(a) for a in addrs):
        raise _forbidden(param, f"host {host!r} resolves to a loopback, private, link-local or reserved address")
    ip = addrs[0]
    netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    pinned = parts._replace(netloc=netloc).geturl()  # connect to the address we checked (no DNS rebinding)
    data = bytearray()
    try:
        async with httpx.AsyncClient(timeout=settings.remote_timeout, follow_redirects=False) as client:
            async with client.stream("GET", pinned, headers={"Host": parts.netloc.rpartition("@")[2]},
                                     extensions={"sni_hostname": host}) as r:
                if r.status_code != 200:
                    raise bad(f"{param}: fetching the image gave HTTP {r.status_code}", param, "invalid_image")
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > settings.max_image_bytes:
                        raise _too_large(param, f"remote image is over the limit of {settings.max_image_bytes} bytes")
    except httpx.HTTPError as e:
        raise bad(f"{param}: cannot fetch the image ({type(e).__name__})", param, "invalid_image") from e
    return bytes(data)


async def load_request_image(url: str, param: str, settings: ServeSettings, cfg, max_tiles: int) -> torch.Tensor:
    from hovle.image import ImageLoadError, load_image

    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _decode_data_url(url, param, settings)
    elif scheme in ("http", "https"):
        data = await _fetch_remote(url, param, settings)
    elif scheme in ("file", "") or len(scheme) == 1:  # a path (or a Windows drive letter)
        data = await asyncio.to_thread(_read_local, url, param, settings)
    else:
        raise bad(f"{param}: unsupported URL scheme {scheme!r} (use data:, http(s): or a path)", param, "invalid_image")

    def work():
        rgb = decode_image_bytes(data, param, settings)
        try:
            return load_image(rgb, input_size=cfg.tile_size, max_num=max_tiles, min_num=cfg.min_dynamic_patch,
                              use_thumbnail=cfg.use_thumbnail, max_pixels=settings.max_image_pixels)
        except ImageLoadError as e:
            raise bad(f"{param}: {e}", param, "invalid_image") from e

    return await asyncio.to_thread(work)


# ---------------------------------------------------------------------------
# The model worker
# ---------------------------------------------------------------------------

class _CountingTokenizer:
    """Delegates to the tokenizer; counts the ids pushed into its stream decoders (the generated ids)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.pushed = 0
        self.flushed = False

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def stream_decoder(self):
        inner, outer = self._tok.stream_decoder(), self

        class Decoder:
            def push(self, token_id):
                outer.pushed += 1
                return inner.push(token_id)

            def flush(self):
                outer.flushed = True
                return inner.flush()

        return Decoder()


@dataclass
class Job:
    rid: str
    question: str
    history: list
    system: str | None
    pixel_values: torch.Tensor | None
    num_patches: list[int] | None
    req: ParsedRequest
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)
    checked: float = 0.0  # when the client's connection was last checked

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel.set()


class StopCutter:
    """Cuts a text stream at the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False

    def push(self, piece: str) -> str:
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        start = max(0, self.sent - max(map(len, self.stops)))
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            end, self.hit = min(cuts), True
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return "" if self.hit else out


class Engine:
    """One worker thread running the model on jobs from a bounded queue."""

    def __init__(self, model, tokenizer, settings: ServeSettings):
        from hovle.chat import get_template

        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.template = get_template(model.config.template)
        self.jobs: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self.busy = False
        self.thread = threading.Thread(target=self._loop, name="hovle-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job | None) -> None:
        """Queue a job, or raise the 429 (job None: only raise it, when the queue is full)."""
        try:
            if job is None:
                if self.jobs.full():
                    raise queue.Full
                return
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"server busy: {self.settings.queue_size} requests are already waiting for the "
                                "model; retry later", "rate_limit_error", None, "queue_full") from None

    def stop(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():
                continue
            self.busy = True
            try:
                self._run(job)
            except ValueError as e:
                job.emit("error", bad(str(e)))
            except Exception as e:
                log.exception("request %s: generation failed", job.rid)
                job.emit("error", APIError(500, f"internal error during generation ({type(e).__name__})",
                                           "server_error", None, "internal_error"))
            finally:
                self.busy = False

    def prompt_tokens(self, job: Job) -> int:
        from hovle.chat import expand_images

        prompt = self.template.prompt(job.question, job.history, job.system)
        prompt = expand_images(prompt, job.num_patches or [], self.model.config.num_image_token)
        return len(self.tokenizer(prompt)["input_ids"])

    def _run(self, job: Job) -> None:
        if time.monotonic() > job.deadline:
            job.emit("error", _timeout(self.settings))
            return
        req = job.req
        n_prompt = self.prompt_tokens(job)
        context = self.model.config.llm.max_position_embeddings
        room = context - n_prompt
        if req.max_tokens is not None and req.max_tokens > room:
            job.emit("error", bad(f"this model's context is {context} tokens; the prompt has {n_prompt} and "
                                  f"max_tokens asks for {req.max_tokens}: reduce the messages, images or max_tokens",
                                  "max_tokens", "context_length_exceeded"))
            return
        if room < 1:
            job.emit("error", bad(f"this model's context is {context} tokens and the prompt has {n_prompt}: "
                                  "reduce the messages or images", "messages", "context_length_exceeded"))
            return
        max_new = req.max_tokens if req.max_tokens is not None else min(self.settings.max_tokens_default, room)
        config = dict(max_new_tokens=max_new, do_sample=bool(req.temperature), repetition_penalty=1.0)
        if req.temperature:
            config |= dict(temperature=req.temperature, top_p=1.0 if req.top_p is None else req.top_p)
        generator = torch.Generator().manual_seed(req.seed % 2**64 if req.seed is not None
                                                  else secrets.randbits(63))
        counter = _CountingTokenizer(self.tokenizer)
        cutter = StopCutter(req.stop)
        job.emit("start", n_prompt)
        stream = self.model.chat_stream(counter, job.pixel_values, job.question, config, job.history,
                                        job.num_patches, system_message=job.system, generator=generator)
        finish = None
        try:
            for piece in stream:
                if job.cancel.is_set():
                    return
                if time.monotonic() > job.deadline:
                    job.emit("error", _timeout(self.settings))
                    return
                out = cutter.push(piece)
                if out:
                    job.emit("delta", out)
                if cutter.hit:
                    finish = "stop"
                    break
        finally:
            stream.close()  # stops generation when we leave early
        tail = cutter.flush()
        if tail:
            job.emit("delta", tail)
        if finish is None:
            finish = "length" if counter.pushed >= max_new else "stop"
        # generated ids: the pushed ones, plus the end-of-turn id when generation ended on it
        n_completion = counter.pushed + (1 if counter.flushed and counter.pushed < max_new else 0)
        job.emit("done", finish, {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                                  "total_tokens": n_prompt + n_completion})


def _timeout(settings: ServeSettings) -> APIError:
    return APIError(503, f"request timed out after {settings.request_timeout:g} s (server overloaded); retry later",
                    "server_error", None, "timeout")


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------

def build_turns(req: ParsedRequest, images: list[torch.Tensor]) -> tuple[str, list[tuple[str, str]]]:
    """The question and history as chat() takes them, `<image>` placeholders where the images were sent."""
    total = len(images)
    counter = iter(range(1, total + 1))

    def question(turn: Turn) -> str:
        if total == 1:
            prefix = "<image>\n" * len(turn.images)
        else:
            prefix = "".join(f"Image-{next(counter)}: <image>\n" for _ in turn.images)
        return prefix + turn.text

    history = [(question(t), a) for t, a in req.turns]
    return question(req.last), history


class _BodyLimit:
    """ASGI middleware: auth for /v1, request ids, body size limit, and one log line per request."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        rid = "req-" + secrets.token_hex(6)
        info = {"status": None, "prompt_tokens": "-", "completion_tokens": "-", "logged": False}
        scope.setdefault("state", {})["hovle"] = {"rid": rid, "info": info}
        headers = dict(scope.get("headers") or [])

        def finish():
            if not info["logged"]:
                info["logged"] = True
                log.info("%s %s %s status=%s prompt_tokens=%s completion_tokens=%s latency=%.3fs%s", rid,
                         scope["method"], scope["path"], info["status"], info["prompt_tokens"],
                         info["completion_tokens"], time.monotonic() - t0,
                         f" error={info['error']!r}" if info.get("error") else "")

        async def logged_send(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        async def reply(err: APIError, extra_headers=()):
            info["error"] = err.message
            body = json.dumps(err.body()).encode()
            await logged_send({"type": "http.response.start", "status": err.status,
                               "headers": [(b"content-type", b"application/json"),
                                           (b"content-length", str(len(body)).encode()), *extra_headers]})
            await logged_send({"type": "http.response.body", "body": body})

        try:
            if scope["path"].startswith("/v1/") and self.settings.api_key is not None:
                auth = headers.get(b"authorization", b"").decode("latin-1")
                scheme, _, key = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                          self.settings.api_key.encode()):
                    msg = "missing API key (send Authorization: Bearer KEY)" if not auth else "invalid API key"
                    return await reply(APIError(401, msg, "authentication_error", None, "invalid_api_key"),
                                       [(b"www-authenticate", b"Bearer")])
            if scope["method"] in ("POST", "PUT", "PATCH"):
                limit = self.settings.max_body_bytes
                length = headers.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    return await reply(APIError(413, f"request body is {int(length)} bytes, over the limit of "
                                                     f"{limit}", "invalid_request_error", None, "body_too_large"),
                                       [(b"connection", b"close")])
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        info["status"] = 499
                        return finish()
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limit:
                        return await reply(APIError(413, f"request body is over the limit of {limit} bytes",
                                                    "invalid_request_error", None, "body_too_large"),
                                           [(b"connection", b"close")])
                    if not message.get("more_body", False):
                        break
                body, replayed = b"".join(chunks), False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(scope, replay, logged_send)
            return await self.app(scope, receive, logged_send)
        finally:
            if info["status"] is None:
                info["status"] = 499  # client went away before any response
            finish()


def create_app(model, tokenizer, settings: ServeSettings | None = None):
    """The FastAPI app serving `model`; its model worker thread starts now (app.state.engine)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError as e:
        raise ImportError(f"hovle serve needs fastapi and uvicorn: pip install 'hovle[serve]' ({e})") from e

    settings = settings or ServeSettings()
    cfg = model.config
    max_tiles = settings.max_tiles or (cfg.max_dynamic_patch if cfg.dynamic_image_size else 1)
    engine = Engine(model, tokenizer, settings)
    app = FastAPI(title="hovle", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    created = int(time.time())

    def error_response(err: APIError, request: Request | None = None) -> JSONResponse:
        if request is not None:
            request.scope["state"]["hovle"]["info"]["error"] = err.message
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(bad(f"{loc or 'request'}: {first.get('msg', 'invalid request')}", loc), request)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind, None, None), request)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error ({type(exc).__name__})", "server_error"), request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued": engine.jobs.qsize(), "busy": engine.busy}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "hovle"}]}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = (STATIC / name).resolve()
        if not path.is_relative_to(STATIC.resolve()) or not path.is_file():
            raise APIError(404, f"no static file {name!r}", "not_found_error")
        return FileResponse(path)

    async def next_event(job: Job, request: Request):
        """The next worker event; cancels the job and returns None when the client has gone."""
        while True:
            left = job.deadline - time.monotonic()
            if left <= 0:
                job.cancel.set()
                return ("error", _timeout(settings))
            now = time.monotonic()
            if now - job.checked > 0.25:  # servers on ASGI 2.4 do not cancel a stream whose client left
                job.checked = now
                if await request.is_disconnected():
                    job.cancel.set()
                    return None
            try:
                return await asyncio.wait_for(job.events.get(), timeout=min(0.25, left))
            except asyncio.TimeoutError:
                pass

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state = request.scope["state"]["hovle"]
        info, rid = state["info"], state["rid"]
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        req = parse_request(body, settings.model_name)
        if engine.jobs.full():  # refuse before decoding images; submit() below is the real check
            engine.submit(None)
        refs = [ref for t, _ in req.turns for ref in t.images] + list(req.last.images)
        if len(refs) > settings.max_images:
            raise bad(f"{len(refs)} images in the request, over the limit of {settings.max_images}", "messages",
                      "too_many_images")
        images = [await load_request_image(url, param, settings, cfg, max_tiles) for url, param in refs]
        question, history = build_turns(req, images)
        job = Job(rid, question, history, req.system, torch.cat(images) if images else None,
                  [len(t) for t in images] if images else None, req,
                  time.monotonic() + settings.request_timeout, asyncio.get_running_loop(), asyncio.Queue())
        engine.submit(job)
        first = await next_event(job, request)
        if first is None:
            return JSONResponse({}, status_code=499)
        if first[0] == "error":
            raise first[1]
        info["prompt_tokens"] = first[1]
        cid = "chatcmpl-" + rid[4:] + secrets.token_hex(4)
        now = int(time.time())

        if not req.stream:
            parts = []
            while True:
                ev = await next_event(job, request)
                if ev is None:
                    return JSONResponse({}, status_code=499)
                if ev[0] == "delta":
                    parts.append(ev[1])
                elif ev[0] == "error":
                    raise ev[1]
                else:
                    _, finish, usage = ev
                    info["completion_tokens"] = usage["completion_tokens"]
                    return {"id": cid, "object": "chat.completion", "created": now, "model": settings.model_name,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                         "finish_reason": finish, "logprobs": None}],
                            "usage": usage}

        def chunk(delta: dict, finish=None, usage=None) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": settings.model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                obj["choices"], obj["usage"] = [], usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    ev = await next_event(job, request)
                    if ev is None:
                        return
                    if ev[0] == "delta":
                        yield chunk({"content": ev[1]})
                    elif ev[0] == "error":
                        info["error"] = ev[1].message
                        yield f"data: {json.dumps(ev[1].body())}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        _, finish, usage = ev
                        info["completion_tokens"] = usage["completion_tokens"]
                        yield chunk({}, finish)
                        if req.include_usage:
                            yield chunk({}, usage=usage)
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancel.set()  # no-op when finished; stops generation when the client left

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_middleware(_BodyLimit, settings=settings)
    return app


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `hovle serve` on an argparse subparsers object."""
    from hovle.cli import DEFAULT_MODEL, MODEL_HELP, add_dtype_argument, add_quantize_argument

    d = ServeSettings()
    s = subparsers.add_parser("serve", help="OpenAI-compatible chat server with a chat page (needs the serve extra)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("HOVLE_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1 (default: $HOVLE_API_KEY, else none)")
    s.add_argument("--model-name", help="model id in the API (default: the folder's name)")
    add_dtype_argument(s)
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_quantize_argument(s)
    s.add_argument("--image-root", help="allow image paths inside this folder (default: no local paths)")
    s.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public addresses only)")
    s.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    s.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    s.add_argument("--max-tiles", type=int, help="max tiles per image (default: the model's config)")
    s.add_argument("--max-images", type=int, default=d.max_images, help="max images per request")
    s.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    s.add_argument("--max-tokens-default", type=int, default=d.max_tokens_default,
                   help="max_tokens when a request gives none")
    s.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds (default 300)")
    s.add_argument("--queue-size", type=int, default=d.queue_size, help="requests waiting for the model")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.set_defaults(func=cmd_serve)
    return s


def settings_from_args(args, model_path: Path) -> ServeSettings:
    names = {f.name for f in fields(ServeSettings)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    kw["model_name"] = args.model_name or model_path.resolve().name
    return ServeSettings(**kw)


def cmd_serve(args) -> None:
    from hovle.cli import _load

    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"hovle serve needs fastapi and uvicorn: pip install 'hovle[serve]' ({e})") from e
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer = _load(args)
    app = create_app(model, tokenizer, settings_from_args(args, Path(args.model)))
    log.info("serving %s on http://%s:%d", app.state.settings.model_name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m hovle.serve --model PATH ...`: the serve command without going through `hovle`."""
    parser = argparse.ArgumentParser(prog="python -m hovle.serve")
    sub = parser.add_subparsers(dest="command")
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(argv if argv is not None else __import__("sys").argv[1:])])
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
