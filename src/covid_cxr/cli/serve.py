"""``covid-cxr serve``: the web service and its page for one checkpoint or ONNX model.

Binds to 127.0.0.1 by default: put a reverse proxy with TLS and authentication in front before
exposing it on a network. It is a research tool, not a diagnostic device.
"""

from __future__ import annotations

import argparse
import errno
import math
import socket
import sys
from pathlib import Path

from covid_cxr.choices import BACKENDS, PRECISIONS
from covid_cxr.deploy.limits import ServerLimits


def port(text: str) -> int:
    """--port: a TCP port, 0-65535 (0: one the system picks)."""
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0-65535 (0: a free one); got {text}")
    return value


def positive(text: str) -> int:
    """--max-pixels, --max-batch: a whole number >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text}")
    return value


def megabytes(text: str) -> float:
    """--max-upload-mb: a finite number of MiB, at least one byte's worth."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of MiB, such as 64 or 0.5; got {text!r}") from None
    if not math.isfinite(value * 2**20) or value * 2**20 < 1:
        raise argparse.ArgumentTypeError(f"must be a finite number of MiB, at least one byte's worth (such as 64 or "
                                         f"0.5); got {text}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number; got {text!r}") from None


HOSTS = "give 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its own addresses"


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use or a host that is not this machine's is
    one line naming the flag, not uvicorn's ERROR and exit status 3 after a minute's export and warm-up."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: not an address of this machine ({exc.strerror}); {HOSTS}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: {host}:{port} is in use (another covid-cxr serve, or another program); "
                             "stop that one or choose another --port (0: a free one)") from None
        if exc.errno == errno.EACCES:
            raise ValueError(f"--port {port}: this user may not bind ports below 1024 here; choose --port 1024 or "
                             "above (0: a free one)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"--host {host}: not an address of this machine; {HOSTS}") from None
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    """The address a bound socket serves, as a browser takes it (the port the system chose for --port 0)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: REST API, OpenAPI docs and a web page",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path,
                   help="a covid-cxr checkpoint (.pt), an exported ONNX model, or a run folder (its best.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000,
                   help="port, 0-65535 (default 8000; 0: a free one, which the 'serving on' line names)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="auto (default: the fastest exact path here for a .pt, onnx for .onnx), torch or onnx")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="default auto: bf16 where native, but fp32 for a model with a threshold rule (chosen in fp32)")
    defaults = ServerLimits()
    p.add_argument("--max-upload-mb", type=megabytes, default=defaults.max_upload_bytes / 2**20,
                   help=f"largest upload accepted, in MiB above 0 (default {defaults.max_upload_bytes / 2**20:g})")
    p.add_argument("--max-pixels", type=positive, default=defaults.max_pixels,
                   help=f"largest image accepted, in pixels, refused from its header before decoding (default "
                   f"{defaults.max_pixels}; no more than the decoder's own limit)")
    p.add_argument("--max-batch", type=positive, default=defaults.max_batch,
                   help=f"concurrent uploads run together as one batch, up to this many (default {defaults.max_batch})")
    p.add_argument("--no-heatmap", action="store_true", help="refuse heatmap requests (saves the Grad-CAM memory)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network for one image at a time before serving (a checkpoint only; "
                   "about 30 s at start, then single uploads about 1.5x faster on CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The library (torch, FastAPI, uvicorn) is imported here, not above: `covid-cxr --help` stays fast.
    import uvicorn

    from covid_cxr.deploy.saturation import print_int8_record
    from covid_cxr.deploy.server import check_limits, create_app
    from covid_cxr.inference.backends import load_model
    from covid_cxr.inference.inputs import model_file
    from covid_cxr.inference.settings import InferenceSettings
    from covid_cxr.runs.model_card import served_card

    limits = ServerLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                          max_batch=args.max_batch)
    check_limits(limits)  # before the model is loaded: a refused limit should not cost an export
    with listen(args.host, args.port) as sock:  # so is a port in use; closed however the start-up ends
        model = model_file(args.checkpoint)
        settings = InferenceSettings(device=args.device, precision=args.precision, backend=args.backend)
        loaded = load_model(model, settings, compile=args.compile, follow_rule=True)
        loaded.warm_up(1)  # compile before the first upload, not during it; batches of uploads then run one by one
        gradcam = None if args.no_heatmap or loaded.checkpoint is None else loaded.gradcam()
        card = served_card(model, loaded.sha256, loaded.checkpoint, loaded.predictor)
        app = create_app(loaded.predictor, network=loaded.network, sha256=loaded.sha256, gradcam=gradcam, limits=limits,
                         model_card=card)
        print(f"model: {loaded.describe()}; heatmaps {'on' if gradcam else 'off'}", file=sys.stderr)
        print(f"operating point: {app.state.decision.describe()}", file=sys.stderr)
        for warning in loaded.warnings():
            print(warning, file=sys.stderr)
        print_int8_record(loaded.predictor, model)
        print(f"serving on {url_of(sock)} (API description at /docs and /openapi.json; Ctrl-C stops it)",
              file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=True)).run(sockets=[sock])
    return 0
