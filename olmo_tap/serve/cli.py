"""``olmo-tap serve``: load the model once, then serve the API and the page with uvicorn.

Every setting is a flag whose default comes from an environment variable (``OLMO_TAP_SERVE_<NAME>``), so a
container or a service manager can configure the server without a command line.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from olmo_tap.serve.config import WILDCARD_BINDS, ServeConfig, boolean, comma_list, env_default, env_name

T = TypeVar("T")


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible chat API and a web page, with the jury's trust signals",
        description="Serve the model: POST /v1/chat/completions (OpenAI format + trust), GET /v1/models, "
        "GET /health, POST /v1/verify, POST /v1/audit, GET /v1/signing-key, and the chat page at /. "
        "Every flag's default can be set by an environment variable: "
        f"--queue-size by {env_name('--queue-size')}, --model by {env_name('--model')}, "
        "and so on.",
    )
    add_model_args(parser)
    # A bad environment value must not break the other sub-commands: it is reported when `serve` runs.
    env_errors: list[str] = []

    def from_env(flag: str, default: Any, cast: Callable[[str], Any]) -> Any:
        try:
            return env_default(flag, default, cast)
        except ValueError as e:
            env_errors.append(str(e))
            return default

    # The model flags belong to the shared CLI; here their defaults may also come from the environment.
    for flag, cast in (("--model", str), ("--heads", int), ("--heads-depth", int), ("--dtype", str), ("--device", str)):
        if os.environ.get(env_name(flag)):
            parser.set_defaults(**{flag[2:].replace("-", "_"): from_env(flag, None, cast)})
    defaults = ServeConfig()
    group = parser.add_argument_group("server")

    def option(flag: str, default: Any, cast: Callable[[str], Any], help: str, **kwargs: Any) -> None:
        kwargs.setdefault("type", None if cast is str else cast)
        group.add_argument(flag, default=from_env(flag, default, cast), help=f"{help} (default: %(default)s)", **kwargs)

    option("--host", defaults.host, str, "address to listen on")
    option("--port", defaults.port, int, "port")
    option("--queue-size", defaults.queue_size, int, "requests that may wait beyond a full batch; more get 429")
    option(
        "--max-batch",
        defaults.max_batch,
        int,
        "answers decoded together (continuous batching: requests join and leave between steps)",
    )
    option("--request-timeout", defaults.request_timeout_s, float, "seconds a request may take, queue wait included")
    option("--max-tokens", defaults.default_max_tokens, int, "new tokens when a request sets no max_tokens")
    option("--temperature", defaults.default_temperature, float, "temperature when a request sets none")
    option("--max-body-bytes", defaults.max_body_bytes, int, "largest request body accepted; larger ones get 413")
    option(
        "--max-verify-tokens",
        defaults.max_verify_tokens,
        int,
        "prompt + output tokens over all sequences of one /v1/verify or /v1/audit request; more get 400 "
        "(0: the model's context)",
    )
    option("--log-level", defaults.log_level, str, "log level", choices=["debug", "info", "warning", "error"])
    option(
        "--signing-key",
        defaults.signing_key,
        str,
        "Ed25519 private key (olmo-tap keygen) that signs every transcript's digest, so auditors can tell "
        "this server vouched for an answer; its public key is served at GET /v1/signing-key",
        metavar="PATH",
    )
    option(
        "--attack-bank",
        defaults.attack_bank,
        str,
        "the robustness probe's attack bank (olmo-tap train attacks): requests with robustness true append its "
        "first 3 suffixes to the question; default: the bank shipped for the model's preset, if any",
        metavar="PATH",
    )
    option(
        "--allowed-hosts",
        defaults.allowed_hosts,
        comma_list,
        "comma-separated Host names answered besides localhost, 127.0.0.1, [::1] and --host; others get 400, "
        "so a web page cannot reach the server through DNS rebinding ('*.example.com' for subdomains, '*': any). "
        "With --host 0.0.0.0 or ::, clients by IP address are answered too; by name only when listed here",
        metavar="HOSTS",
    )
    option(
        "--cors-origins",
        defaults.cors_origins,
        comma_list,
        "comma-separated origins (scheme://host[:port]) whose web pages may call the API; none: no CORS headers, "
        "browsers keep other sites' pages out",
        metavar="ORIGINS",
    )
    group.add_argument(
        "--docs",
        action="store_true",
        default=from_env("--docs", defaults.docs, boolean),
        help="serve /docs (Swagger UI) and /redoc, which load their scripts from a CDN (jsdelivr), so they work "
        "only online; /openapi.json is always served",
    )
    parser.set_defaults(env_errors=env_errors)
    parser.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from olmo_tap.cli import load_model_and_tokenizer
    from olmo_tap.serve.app import create_app

    if args.env_errors:
        raise ValueError("; ".join(args.env_errors))
    from olmo_tap.model import kernels, native_attention, native_linear, native_norm
    from olmo_tap.quant.linear import quant_kernel
    from olmo_tap.quant.linear import route_for as quant_route_for

    # a bad OLMO_TAP_KERNELS / _ATTENTION / _NORM / _LINEAR / _QUANT_KERNEL: refused now
    kernels.kernel_path(), native_attention.requested(), native_norm.requested(), native_linear.requested_route()
    quant_kernel()
    config = ServeConfig(
        host=args.host,
        port=args.port,
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        request_timeout_s=args.request_timeout,
        default_max_tokens=args.max_tokens,
        default_temperature=args.temperature,
        max_body_bytes=args.max_body_bytes,
        max_verify_tokens=args.max_verify_tokens,
        log_level=args.log_level,
        signing_key=args.signing_key or None,
        attack_bank=args.attack_bank or None,
        allowed_hosts=tuple(args.allowed_hosts),
        cors_origins=tuple(args.cors_origins),
        docs=args.docs,
    )
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    signing_key = None
    if config.signing_key:
        from olmo_tap.verify.signing import key_fingerprint, load_private_key

        # Before the model loads: a bad key should cost a second, not a model load.
        signing_key = load_private_key(config.signing_key)
        print(f"olmo-tap serve: signing transcripts as {key_fingerprint(signing_key.public_key())}", file=sys.stderr)
    # Before the model loads too: a port in use or an address not this machine's fails in a second, not after a
    # load (uvicorn then reported it as an internal error); the bound socket is the one uvicorn serves on.
    sock = listening_socket(config.host, config.port)
    from olmo_tap.robustness.probe import resolve_bank

    # Before the model loads too: a malformed bank is a clear error in a second, not a server that fails later.
    attack_bank = resolve_bank(config.attack_bank, str(args.model))
    if attack_bank is None:
        print("olmo-tap serve: no attack bank for this model: robustness will be unavailable", file=sys.stderr)
    print(f"olmo-tap serve: loading {args.model} ...", file=sys.stderr)

    def load() -> Any:
        model, tokenizer = load_model_and_tokenizer(args)
        # the native kernels' one-off builds (or the fused reduction's compile) before the first request, not in it
        native_attention.route_for(model), native_norm.route_for(model)
        if model.quantization is not None:
            quant_route_for(model)
        else:
            model.prepack()
        return create_app(model, tokenizer, str(args.model), config, signing_key=signing_key, attack_bank=attack_bank)

    app = on_passing_thread(load)
    for warning in exposure_warnings(config):
        print(f"olmo-tap serve: warning: {warning}", file=sys.stderr)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    host = f"[{config.host}]" if ":" in config.host else config.host
    ready = f"http://{host}:{port}/ (page), /v1 (OpenAI API); ready when /health says ok"
    print(f"olmo-tap serve: {ready}", file=sys.stderr)
    # uvicorn's access log is replaced by the app's own lines, which carry request ids and timings.
    server_config = uvicorn.Config(app, host=config.host, port=port, log_level=config.log_level, access_log=False)
    uvicorn.Server(server_config).run(sockets=[sock])
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` as uvicorn binds one (IPv6 for an address with a colon, the address
    reusable at once after a restart); ValueError naming the address and the reason when it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        why = {
            errno.EADDRINUSE: "the port is in use (another server? choose another with --port)",
            errno.EADDRNOTAVAIL: "no interface of this machine has that address (--host)",
            errno.EACCES: "not permitted (ports below 1024 need privileges)",
        }.get(getattr(e, "errno", None) or 0, getattr(e, "strerror", None) or str(e))
        if isinstance(e, socket.gaierror):
            why = f"cannot resolve the host name ({e.strerror})"
        raise ValueError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def on_passing_thread(work: Callable[[], T]) -> T:
    """``work()`` on a thread that ends when it returns (its exception re-raised here).

    The server decodes on its worker thread, and torch's CPU threads are an OpenMP pool per calling thread: the
    model's load and prepacking on the main thread would leave a second pool there for good, and with more pool
    threads than CPUs libgomp stops spinning at its barriers, so every parallel region of a decode step wakes
    its threads from sleep. Measured on the embedded default (2-core AMD EPYC, 2 threads, greedy PoE): one
    answer's draft step took 47.7 ms on a thread after the main thread had loaded the model, 29.7 ms after a
    passing thread had (28.1 ms on the main thread itself); through ``olmo-tap serve``, 48.6 -> 29.5 ms for one
    answer and 70.8 -> 49.0 ms for a batch of 8. A thread that ends takes its pool with it, leaving the
    worker's the only one (``HydraTransformer.identical_heads`` is answered at start-up for the same reason).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as e:  # raised on the caller's thread below
            outcome["error"] = e

    # A daemon: Ctrl-C during a long load interrupts the join and the process exits without waiting for it.
    thread = threading.Thread(target=run, name="olmo-tap-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def exposure_warnings(config: ServeConfig) -> list[str]:
    """What the operator should know about who can reach the server, said once at start-up."""
    warnings = []
    if config.host in WILDCARD_BINDS:
        warnings.append(
            f"listening on every interface ({config.host or 'all'}): anyone on the network can use the model; "
            "clients by IP address are answered, by name only when the name is in --allowed-hosts"
        )
    if "*" in config.allowed_hosts:
        warnings.append("--allowed-hosts '*': the Host check is off; a web page can reach the server by DNS rebinding")
    if "*" in config.cors_origins:
        warnings.append("--cors-origins '*': every web page the user visits may call the API and read its answers")
    return warnings
