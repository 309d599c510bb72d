"""`hovle serve`: the OpenAI-compatible server, driven by the real openai client, raw HTTP and headless Chromium."""

import base64
import io
import json
import logging
import shutil
import socket
import threading
import time

import pytest
import torch
from PIL import Image

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from hovle import HoVLE, load_image, load_tokenizer  # noqa: E402
from hovle.chat import expand_images, get_template  # noqa: E402
from hovle.serve import ServeSettings, StopCutter, create_app  # noqa: E402



KEY = "test-key"
NAME = "tiny-hovle"


@pytest.fixture(scope="module")
def model(checkpoint):
    return HoVLE.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def tok(checkpoint):
    return load_tokenizer(checkpoint)


def png_bytes(size=(90, 60), color=(30, 90, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an app in a thread on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.engine.stop()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "blue.png").write_bytes(png_bytes())
    (root / "bad.png").write_bytes(b"not an image at all")
    outside = root.parent / "outside.png"
    outside.write_bytes(png_bytes())
    return root


@pytest.fixture(scope="module")
def server(model, tok, image_root):
    settings = ServeSettings(model_name=NAME, api_key=KEY, image_root=str(image_root), allow_remote_images=True,
                             max_image_bytes=100_000, max_body_bytes=400_000, max_images=3, queue_size=4)
    with Server(create_app(model, tok, settings)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def post(server, body, key=KEY, raw=None, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h |= headers or {}
    if raw is not None:
        return httpx.post(server.url + "/v1/chat/completions", content=raw, headers=h, timeout=30)
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=h, timeout=30)


def user(text, *urls):
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}


def expected_ids(model, tok, pv, question, n, history=(), system=None):
    """Generated ids straight from model.generate on the official prompt (the end-of-turn id included)."""
    prompt = get_template("internlm2-chat").prompt(question, history, system)
    prompt = expand_images(prompt, [len(pv)] if pv is not None else [], model.config.num_image_token)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    new = model.generate(ids, pv, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), max_new_tokens=n)
    return ids.shape[1], new[0].tolist()


# ---------------------------------------------------------------------------
# Through the openai client
# ---------------------------------------------------------------------------

def test_openai_client_plain_and_stream_match_chat(client, model, tok):
    img = png_bytes()
    pv = load_image(Image.open(io.BytesIO(img)), input_size=56, max_num=12)
    expected = model.chat(tok, pv, "What is it?", dict(max_new_tokens=8))
    messages = [user("What is it?", data_url(img))]

    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    n_prompt, ids = expected_ids(model, tok, pv, "<image>\nWhat is it?", 8)
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == n_prompt + len(ids)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert r.choices[0].finish_reason == ("stop" if ids[-1] == eos else "length")

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_raw_stream_format(server):
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    objs = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length") and objs[-1]["choices"][0]["delta"] == {}
    assert all(o["object"] == "chat.completion.chunk" and o["id"] == objs[0]["id"] for o in objs)


def test_multi_turn_system_and_multi_image(client, model, tok):
    a, b = png_bytes((90, 60)), png_bytes((40, 40), (200, 30, 30))
    pa = load_image(Image.open(io.BytesIO(a)), input_size=56)
    pb = load_image(Image.open(io.BytesIO(b)), input_size=56)
    cfg = dict(max_new_tokens=6)
    first = model.chat(tok, pa, "Describe.", cfg)
    messages = [{"role": "system", "content": "Be brief."}, user("Describe.", data_url(a)),
                {"role": "assistant", "content": first}, {"role": "user", "content": "More?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6)
    assert r.choices[0].message.content == model.chat(tok, pa, "More?", cfg, history=[("<image>\nDescribe.", first)],
                                                      system_message="Be brief.")
    # two images in two turns: numbered placeholders where they were sent
    messages = [user("First.", data_url(a)), {"role": "assistant", "content": "ok"}, user("Second?", data_url(b))]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6)
    expected = model.chat(tok, torch.cat([pa, pb]), "Image-2: <image>\nSecond?", cfg,
                          history=[("Image-1: <image>\nFirst.", "ok")], num_patches_list=[len(pa), len(pb)])
    assert r.choices[0].message.content == expected


def test_stop_seed_and_image_root(client, model, tok, image_root):
    full = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=24)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=24,
                                         stop=[stop, "never-seen-zz"])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    streamed = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.index(stop)]

    kw = dict(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=1.5, top_p=0.9)
    one = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert client.chat.completions.create(seed=7, **kw).choices[0].message.content == one

    pv = load_image(image_root / "blue.png", input_size=56)
    r = client.chat.completions.create(model=NAME, messages=[user("What?", "blue.png")], max_tokens=5)
    assert r.choices[0].message.content == model.chat(tok, pv, "What?", dict(max_new_tokens=5))


def test_remote_image_fetch(client, model, tok, image_root, monkeypatch):
    """http(s) images are fetched from the checked address; here loopback is let through on purpose."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr("hovle.serve._public_address", lambda addr: True)
    try:
        base = f"http://localhost:{httpd.server_address[1]}"
        r = client.chat.completions.create(model=NAME, messages=[user("What?", base + "/blue.png")], max_tokens=5)
        pv = load_image(image_root / "blue.png", input_size=56)
        assert r.choices[0].message.content == model.chat(tok, pv, "What?", dict(max_new_tokens=5))
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            client.chat.completions.create(model=NAME, messages=[user("What?", base + "/missing.png")])
    finally:
        httpd.shutdown()


def test_models_health_and_page(server):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/v1/models", headers=h).json()["data"][0]["id"] == NAME
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "hovle chat" in page.text


# ---------------------------------------------------------------------------
# Bad input: the right 4xx in the OpenAI error shape, logged, never a 500
# ---------------------------------------------------------------------------

def test_bad_requests(server, image_root, caplog):
    caplog.set_level(logging.INFO, logger="hovle.serve")
    msg = [{"role": "user", "content": "hi"}]
    pixels = torch.randint(0, 256, (120_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noise = Image.frombytes("RGB", (200, 200), bytes(pixels.tolist()))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    big = buf.getvalue()  # a real PNG over the 100 kB limit
    assert len(big) > 100_000
    cases = [
        (post(server, None, raw=b"{not json"), 400, "not valid JSON"),
        (post(server, None, raw=b"\xff\xfe"), 400, "not valid JSON"),
        (post(server, [1, 2]), 400, "JSON object"),
        (post(server, {"messages": "hi"}), 400, "'messages'"),
        (post(server, None, raw=b"[" * 100_000), 400, "not valid JSON"),
        (post(server, {"messages": msg, "max_tokens": "5"}), 400, "'max_tokens' must be an integer"),
        (post(server, {"messages": msg, "max_tokens": True}), 400, "'max_tokens' must be an integer"),
        (post(server, {"messages": msg, "temperature": 7}), 400, "'temperature' must be in"),
        (post(server, {"messages": msg, "stream": "yes"}), 400, "'stream'"),
        (post(server, {"messages": [{"role": "robot", "content": "x"}]}), 400, "role"),
        (post(server, {"messages": [{"role": "user", "content": 5}]}), 400, "content"),
        (post(server, {"messages": [{"role": "user", "content": "look <image>"}]}), 400, "reserved marker"),
        (post(server, {"messages": [{"role": "assistant", "content": "x"}]}), 400, "must follow a user"),
        (post(server, {"messages": msg, "max_tokens": 10**6}), 400, "context"),
        (post(server, {"messages": [user("x", data_url(b"hello world", "text/plain"))]}), 400, "not an image"),
        (post(server, {"messages": [user("x", data_url(b"hello world"))]}), 400, "not a recognised image"),
        (post(server, {"messages": [user("x", "data:image/png;base64,@@@")]}), 400, "invalid base64"),
        (post(server, {"messages": [user("x", "bad.png")]}), 400, "not a recognised image"),
        (post(server, {"messages": [user("x", *[data_url(png_bytes())] * 4)]}), 400, "over the limit of 3"),
        (post(server, {"messages": [user("x", "ftp://example.com/a.png")]}), 400, "unsupported URL scheme"),
        (post(server, {"messages": [user("x", data_url(big))]}), 413, "over the limit"),
        (post(server, None, raw=b"x" * 500_000), 413, "request body is 500000 bytes"),
        (post(server, {"messages": [user("x", str(image_root.parent / "outside.png"))]}), 403, "outside"),
        (post(server, {"messages": [user("x", "../outside.png")]}), 403, "outside"),
        (post(server, {"messages": [user("x", "http://127.0.0.1:9/a.png")]}), 403, "loopback"),
        (post(server, {"messages": [user("x", "http://localhost:9/a.png")]}), 403, "loopback"),
        (post(server, {"messages": [user("x", "http://10.1.2.3/a.png")]}), 403, "private"),
        (post(server, {"messages": [user("x", "http://169.254.169.254/latest")]}), 403, "link-local"),
        (post(server, {"messages": [user("x", "http://[::1]:9/a.png")]}), 403, "loopback"),
        (post(server, {"messages": msg}, key=None), 401, "missing API key"),
        (post(server, {"messages": msg}, key="wrong"), 401, "invalid API key"),
        (post(server, {"model": "gpt-4", "messages": msg}), 404, "does not exist"),
        (httpx.get(server.url + "/nope"), 404, ""),
    ]
    for r, status, text in cases:
        assert r.status_code == status, (r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and text in err["message"], err
    time.sleep(0.1)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "hovle.serve"]
    for status in (400, 401, 403, 404, 413):
        assert any(f"status={status}" in line for line in lines), status
    assert not any("status=500" in line for line in lines)


def test_openai_client_errors(server):
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        good.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], top_p=0)


def test_stop_cutter_holds_back_partial_matches():
    c = StopCutter(["END"])
    assert c.push("abcE") == "abc" and c.push("N") == "" and c.push("x") == "ENx"
    c = StopCutter(["END", "xy"])
    assert c.push("ab") == "ab" and c.push("cEN") == "c" and c.push("Dzz") == "" and c.hit and c.flush() == ""
    c = StopCutter([])
    assert c.push("a") == "a" and c.flush() == ""


# ---------------------------------------------------------------------------
# Queue, timeout, cancellation (a model wrapper that waits on a gate)
# ---------------------------------------------------------------------------

class GatedModel:
    """The model, but each generation waits for `gate` first and records when it was stopped early."""

    def __init__(self, model):
        self.model, self.gate, self.started, self.closed = model, threading.Event(), threading.Event(), []
        self.steps = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def chat_stream(self, *args, **kwargs):
        self.started.set()
        self.gate.wait(10)
        done = False
        try:
            for piece in self.model.chat_stream(*args, **kwargs):
                self.steps += 1
                time.sleep(0.05)
                yield piece
            done = True
        finally:
            self.closed.append(done)


def test_queue_full_timeout_and_disconnect(model, tok):
    gated = GatedModel(model)
    settings = ServeSettings(model_name=NAME, queue_size=1, request_timeout=3.0)
    with Server(create_app(gated, tok, settings)) as s:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        results = {}

        def call(name):
            results[name] = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)

        t1 = threading.Thread(target=call, args=("running",))
        t1.start()
        assert gated.started.wait(5)  # the worker holds this one
        t2 = threading.Thread(target=call, args=("queued",))
        t2.start()
        for _ in range(100):  # until the second one sits in the queue
            if s.app.state.engine.jobs.qsize() == 1:
                break
            time.sleep(0.02)
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        t1.join(10)
        t2.join(10)
        # the gate never opened: both waited past the 3 s timeout -> clean 503s
        assert results["running"].status_code == 503 and results["queued"].status_code == 503
        assert "timed out" in results["queued"].json()["error"]["message"]

        # a streaming client that leaves stops its generation
        gated.gate.set()
        for _ in range(200):  # let the worker drop the two timed-out jobs
            if not s.app.state.engine.busy and s.app.state.engine.jobs.qsize() == 0:
                break
            time.sleep(0.02)
        time.sleep(0.1)
        gated.closed.clear()
        gated.steps = 0
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                                "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        for _ in range(100):
            if gated.closed:
                break
            time.sleep(0.05)
        assert gated.closed == [False] and gated.steps < 150
        assert httpx.get(s.url + "/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------
# The chat page in headless Chromium
# ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt: chromium chromium-driver)")
def test_chat_page_in_chromium(model, tok, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    img = tmp_path / "pic.png"
    img.write_bytes(png_bytes())
    pv = load_image(img, input_size=56)
    cfg = dict(max_new_tokens=16)
    expected = model.chat(tok, pv, "What is it?", cfg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    with Server(create_app(model, tok, ServeSettings(model_name=NAME, max_tokens_default=16))) as s:
        driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
        try:
            driver.get(s.url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)
            driver.find_element(By.ID, "file").send_keys(str(img))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
            driver.find_element(By.ID, "question").send_keys("What is it?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
            reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant.done span").get_attribute("textContent")
            assert reply == expected
            assert driver.find_elements(By.CSS_SELECTOR, ".msg.user img")
            # a second turn keeps the conversation
            driver.find_element(By.ID, "question").send_keys("And then?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2)
            second = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant.done span")[1].get_attribute("textContent")
            assert second == model.chat(tok, pv, "And then?", cfg, history=[("<image>\nWhat is it?", expected)])
        finally:
            driver.quit()
