"""Bounded load test of `hovle serve` on loopback.

Starts the server as a subprocess (a tiny random model matching the test tokenizer unless --model is
given), fires --requests chat requests (each with a small image as a data URL) from --concurrency
clients, and reports requests/s, p50/p95 latency, status counts and the server's RSS before/after.
Every request must get a 200 or a clean 429/503 in the OpenAI error shape, and the server must stay up;
the exit status is 1 otherwise.

    python benchmarks/load_test.py                       # 64 clients, 256 requests, max_tokens 8
    python benchmarks/load_test.py --model PATH --requests 64 --concurrency 8
"""

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(folder: Path) -> Path:
    """A random tiny HoVLE whose vocabulary is the fixture tokenizer's, saved with that tokenizer."""
    from hovle import HoVLE, HoVLEConfig

    cfg = HoVLEConfig.from_name("tiny")
    cfg = replace(cfg, embedding=replace(cfg.embedding, llm_vocab_size=609, img_context_token_id=602))
    HoVLE.from_config(cfg.with_llm(vocab_size=609), seed=1).save_pretrained(folder)
    for f in (ROOT / "tests" / "fixtures" / "tokenizer").iterdir():
        shutil.copy(f, folder)
    return folder


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (120, 80), (40, 120, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def run_load(url: str, n: int, concurrency: int, max_tokens: int, stream_every: int) -> tuple[list, float]:
    import httpx

    img = image_url()
    results: list[tuple[int, float, str]] = []
    todo = iter(range(n))

    async def client_loop(client):
        for i in todo:
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                              {"type": "text", "text": f"Describe image {i}."}]}],
                    "max_tokens": max_tokens, "stream": bool(stream_every and i % stream_every == 0)}
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/chat/completions", json=body)
                status, text = r.status_code, r.text
                if status == 200 and body["stream"]:
                    ok = text.endswith("data: [DONE]\n\n")
                elif status == 200:
                    ok = bool(r.json()["choices"][0]["finish_reason"])
                else:
                    ok = set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
                results.append((status if ok else -status, time.perf_counter() - t0, ""))
            except Exception as e:  # a dropped connection or a timeout: a failure of the test
                results.append((0, time.perf_counter() - t0, f"{type(e).__name__}: {e}"))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: a tiny random model, built in a temp folder)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--stream-every", type=int, default=4, help="every Nth request streams (0: none)")
    p.add_argument("--dtype", default="fp32")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hovle-load-"))
    model = Path(args.model) if args.model else tiny_checkpoint(tmp / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "hovle.serve", "--model", str(model), "--port", str(port), "--dtype", args.dtype,
           "--device", "cpu", "--queue-size", str(args.queue_size), "--request-timeout", str(args.request_timeout),
           "--log-level", "info"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        import httpx

        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"server exited early:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        # one warm-up request, not counted
        httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": args.max_tokens})
        rss_before = rss_mib(server.pid)
        results, wall = asyncio.run(run_load(url, args.requests, args.concurrency, args.max_tokens,
                                             args.stream_every))
        rss_after = rss_mib(server.pid)
        alive = server.poll() is None and httpx.get(url + "/health", timeout=5).status_code == 200
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()

    counts = Counter(s for s, _, _ in results)
    ok = [t for s, t, _ in results if s == 200]
    everything = [t for _, t, _ in results]
    report = {
        "requests": len(results), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "queue_size": args.queue_size, "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 2), "ok_per_s": round(len(ok) / wall, 2),
        "status_counts": {str(k): v for k, v in sorted(counts.items())},
        "latency_200_p50_s": round(percentile(ok, 0.5), 3), "latency_200_p95_s": round(percentile(ok, 0.95), 3),
        "latency_all_p50_s": round(percentile(everything, 0.5), 3),
        "latency_all_p95_s": round(percentile(everything, 0.95), 3),
        "server_rss_mib_before": round(rss_before, 1), "server_rss_mib_after": round(rss_after, 1),
        "server_alive_after": alive,
    }
    print(json.dumps(report, indent=2))
    lines = [line for line in log_path.read_text().splitlines() if "hovle.serve" in line]
    print(f"server log: {len(lines)} hovle.serve lines, e.g.:", *lines[-3:], sep="\n  ")
    failures = [(s, e) for s, _, e in results if s not in (200, 429, 503)]
    for status, error in failures[:5]:
        print(f"failure: status {status} {error}", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if alive and not failures and len(results) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
