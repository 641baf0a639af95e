"""`lorakit serve`: an OpenAI-compatible HTTP server for a base model and its LoRA adapters."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys

from lorakit.errors import LorakitError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a base model and many LoRA adapters over HTTP (OpenAI-compatible)",
        description="Serve one base model and many LoRA adapters over an OpenAI-compatible HTTP API. "
                    "Requests pick an adapter with their 'model' field ('base' for none); requests for "
                    "different adapters are decoded together in one forward of the base model.")
    p.add_argument("--model", default="default-chat",
                   help="'default-chat' (embedded SmolLM2-135M-Instruct), 'default' (embedded MiniLM "
                        "classifier) or a model folder (default: %(default)s)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="load the adapter in DIR under NAME (repeatable)")
    p.add_argument("--adapter-root", metavar="DIR",
                   help="adapters loaded over HTTP (POST /v1/adapters, /v1/load_lora_adapter) must lie under DIR; "
                        "without it, loading over HTTP is refused")
    p.add_argument("--load-on-demand", action="store_true",
                   help="a request whose model names a folder directly under --adapter-root that is not loaded "
                        "loads it first")
    p.add_argument("--max-loaded", type=int, default=8, metavar="N",
                   help="most adapters resident at once; the least recently used is unloaded (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=32, metavar="B",
                   help="most requests decoding together (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on max_tokens per request (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048,
                   help="cap on prompt length in tokens (default: %(default)s)")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                   help="store the base model's linear weights in nf4 or int8 (adapters stay full precision)")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="the chats' template instead of the tokenizer's own: chatml, a Jinja template file, or an "
                        "adapter folder trained with --chat-template (its chat_template.jinja)")
    p.add_argument("--task", choices=["generate", "classify"],
                   help="what the model does (default: guessed from the model)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most requests waiting for a row; more are answered 429 with Retry-After: 1 "
                        "(default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="seconds a request may take in all; past it, 504 (default: no limit)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="BYTES",
                   help="largest request body; larger ones are answered 413 (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"), metavar="KEY",
                   help="every /v1/ route needs 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY; none: open)")
    p.add_argument("--admin-key", default=os.environ.get("LORAKIT_ADMIN_KEY"), metavar="KEY",
                   help="loading and unloading adapters needs this key instead (default: $LORAKIT_ADMIN_KEY; "
                        "none: the API key)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated Host header names accepted besides the bound address, localhost, "
                        "127.0.0.1 and ::1 ('*': any)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def check_address(host: str, port: int) -> None:
    """Refuse a port out of range, a host that does not resolve, or an address already in use,
    in one line each, by binding it once (the server binds it again a moment later)."""
    if not 0 <= port <= 65535:
        raise LorakitError(f"--port {port} is not a TCP port; give one from 0 (any free port) to 65535, e.g. 8000")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise LorakitError(f"--host {host!r} does not resolve ({err.strerror}); give an address such as "
                           "127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as probe:
        if os.name != "nt":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            fix = ("another server holds it: give another --port, or stop that server" if err.errno == errno.EADDRINUSE
                   else "give an address of this machine as --host (127.0.0.1, or 0.0.0.0 for all)")
            raise LorakitError(f"cannot listen on {host}:{port} ({err.strerror}); {fix}") from None


def parse_adapters(values: list[str]) -> dict[str, str]:
    """``["sql=adapters/sql", ...]`` -> ``{"sql": "adapters/sql"}``."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise LorakitError(f"--adapter {value!r} is not NAME=DIR; e.g. --adapter sql=adapters/sql")
        if name in adapters:
            raise LorakitError(f"--adapter name {name!r} is given twice")
        adapters[name] = path
    return adapters


def run(args: argparse.Namespace) -> int:
    from lorakit.run_folder import adapter_folder  # a run folder of lorakit train stands for its adapter/
    from lorakit.serve import Access, allowed_hosts, build_service, run as serve

    check_address(args.host, args.port)  # before the model loads: a taken port is known in a second, not a minute
    hosts = [h for h in args.allowed_hosts.split(",") if h.strip()]
    access = Access(api_key=args.api_key, admin_key=args.admin_key, hosts=allowed_hosts(args.host, hosts))
    if not _is_loopback(args.host):
        if access.api_key is None:
            print(f"lorakit serve: warning: binding {args.host} exposes the server beyond this machine and it has "
                  "no API key: give --api-key", file=sys.stderr)
        if not hosts:
            print(f"lorakit serve: warning: only the Host names {args.host}, localhost, 127.0.0.1 and ::1 are "
                  "answered: give --allowed-hosts with the names clients use", file=sys.stderr)
    service = build_service(
        args.model, adapters={name: str(adapter_folder(path)) for name, path in parse_adapters(args.adapter).items()},
        adapter_root=args.adapter_root,
        max_loaded=args.max_loaded, max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens, task=args.task, load_on_demand=args.load_on_demand, max_queue=args.max_queue,
        request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
        quantize=args.quantize,
        chat_template=args.chat_template and str(adapter_folder(args.chat_template)))  # a run folder: its adapter
    names = ", ".join(["base", *service.registry.names()])
    print(f"lorakit serve: {args.model} ({service.task}) with models: {names}", file=sys.stderr, flush=True)
    serve(service, host=args.host, port=args.port, log_level=args.log_level, access=access)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
