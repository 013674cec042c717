"""Load test of ``covid-cxr serve``: concurrent uploads from a second process, latency percentiles, 5xx count.

The server runs as its own process (the real command line); this process is the client, firing
``--concurrency`` uploads at once (PNG chest X-rays rendered by ``covid_cxr.synth``, a different
image each) for ``--rounds`` rounds, and records each request's latency and status. A 5xx is a
failure of the service; the script exits non-zero when it sees one.

    python benchmarks/serve_load.py                       # paper-size concat network, random weights
    python benchmarks/serve_load.py --checkpoint best.pt  # a real checkpoint
    python benchmarks/serve_load.py --write-results       # also update benchmarks/RESULTS.md

Speed does not depend on the weights, so by default a randomly initialised checkpoint of the
paper's network and input size is built in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Web service under load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_checkpoint(folder: Path, network: str, image_size: int) -> Path:
    import torch

    from covid_cxr.labels import CLASSES
    from covid_cxr.models import build_model
    from covid_cxr.preprocess import Preprocessing
    from covid_cxr.runs.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model(network, image_size=image_size)
    ckpt = Checkpoint(network, CLASSES, Preprocessing(image_size, "symmetric"), model.state_dict(),
                      meta={"source": "benchmarks/serve_load.py (random weights)"})
    return save_checkpoint(ckpt, folder / f"{network}-{image_size}-random.pt")


def uploads(n: int, size: int) -> list[bytes]:
    from covid_cxr.synth import render_chest

    rng = np.random.default_rng(0)
    labels = ("covid", "pneumonia", "normal")
    return [cv2.imencode(".png", render_chest(rng, size, labels[i % 3]).image)[1].tobytes() for i in range(n)]


def start_server(ckpt: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "covid_cxr", "serve", str(ckpt), "--port", str(port), *extra],
                                stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"covid-cxr serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"covid-cxr serve did not answer within 600 s:\n{log.read_text()}")
        time.sleep(0.5)


async def fire(url: str, bodies: list[bytes], heatmap_every: int) -> list[tuple[float, int]]:
    """All ``bodies`` at once; (latency s, status) per request, in submission order."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        async def one(i: int, body: bytes) -> tuple[float, int]:
            heat = heatmap_every > 0 and i % heatmap_every == 0
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/predict", params={"heatmap": "true"} if heat else None,
                                      files={"file": (f"x{i}.png", body, "image/png")})
                status = r.status_code
            except httpx.TransportError:
                status = 599  # connection refused/reset: counted as a server failure
            return time.perf_counter() - t0, status

        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def write_section(text: str) -> None:
    """Replace (or append) our section of RESULTS.md, keeping every other section as it is."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("" if nxt < 0 else old[nxt + 1 :])
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: random weights, see --network)")
    ap.add_argument("--network", default="concat", help="network of the random checkpoint (default concat)")
    ap.add_argument("--image-size", type=int, default=300, help="input size of the random checkpoint (default 300)")
    ap.add_argument("--concurrency", type=int, default=50, help="uploads fired at once (default 50)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of --concurrency uploads (default 1)")
    ap.add_argument("--upload-size", type=int, default=1024, help="side of the uploaded PNGs (default 1024)")
    ap.add_argument("--heatmap-every", type=int, default=0, help="ask a heatmap on every k-th upload (0: never)")
    ap.add_argument("--serve-args", default="", help="extra arguments for covid-cxr serve, e.g. '--max-batch 16'")
    ap.add_argument("--write-results", action="store_true", help=f"update the section of {RESULTS.name}")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or random_checkpoint(Path(tmp), args.network, args.image_size)
        bodies = uploads(args.concurrency, args.upload_size)
        port = free_port()
        proc = start_server(ckpt, port, args.serve_args.split(), Path(tmp) / "serve.log")
        url = f"http://127.0.0.1:{port}"
        try:
            health = httpx.get(f"{url}/health").json()
            asyncio.run(fire(url, bodies[:2], 0))  # warm-up (first-call allocations), not measured
            load_before = os.getloadavg()[0]
            results, walls = [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                results += asyncio.run(fire(url, bodies, args.heatmap_every))
                walls.append(time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        log_tail = (Path(tmp) / "serve.log").read_text()[-2000:]

    lat = np.array([r[0] for r in results])
    codes = [r[1] for r in results]
    n5xx = sum(c >= 500 for c in codes)
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "model": health["model"]["version"],
        "image_size": health["model"]["image_size"],
        "backend": health["model"]["backend"],
        "requests": len(results),
        "concurrency": args.concurrency,
        "upload": f"{args.upload_size}x{args.upload_size} PNG, {np.mean([len(b) for b in bodies]) / 1024:.0f} KiB mean",
        "heatmap_every": args.heatmap_every,
        "status_counts": {str(c): codes.count(c) for c in sorted(set(codes))},
        "5xx": n5xx,
        "latency_s": {"p50": round(p50, 3), "p90": round(p90, 3), "p99": round(p99, 3), "max": round(lat.max(), 3)},
        "throughput_per_s": round(len(results) / sum(walls), 2),
        "load_average": {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)},
    }
    print(json.dumps(summary, indent=2))
    if n5xx:
        print(log_tail, file=sys.stderr)
    if args.write_results:
        lt = summary["latency_s"]
        text = (
            f"{SECTION}\n\n"
            f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`: `covid-cxr serve` in its own process, "
            f"{summary['concurrency']} concurrent uploads ({summary['upload']}) fired by this second process "
            f"with httpx, {args.rounds} round(s) after a 2-request warm-up. "
            f"Measured {summary['date']} on {summary['machine']}; 1-minute load average "
            f"{summary['load_average']['before']} before and {summary['load_average']['after']} after (other jobs "
            "share these cores: a load above the core count stretches every latency below).\n\n"
            "| model | backend | requests | p50 s | p90 s | p99 s | max s | throughput /s | 5xx | statuses |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {summary['model']} ({summary['image_size']} px) | {summary['backend']} | {summary['requests']} | "
            f"{lt['p50']} | {lt['p90']} | {lt['p99']} | {lt['max']} | {summary['throughput_per_s']} | {n5xx} | "
            f"{', '.join(f'{k}: {v}' for k, v in summary['status_counts'].items())} |\n\n"
            "Uploads queue for one inference worker, which runs those waiting together as one batch (up to "
            "`--max-batch`, 8 by default), so latency grows with the queue while no request fails.\n"
        )
        write_section(text)
    return 1 if n5xx else 0


if __name__ == "__main__":
    sys.exit(main())
