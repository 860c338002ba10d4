"""Start or join Ray, in bounded time: the one way every command gets a cluster.

Without an address monoray starts its own local Ray on 127.0.0.1, never one
recorded in Ray's temp files (a dead `ray start` cluster left there would hang
`ray.init()` for ever). With an address it connects within
`MONORAY_RAY_CONNECT_TIMEOUT_S` or raises one `InputError` line, before the
caller has created anything.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from monoray.errors import InputError
from monoray.runs.verbosity import add_verbose_arg, is_verbose, ray_init_defaults

TIMEOUT_ENV = "MONORAY_RAY_CONNECT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0
ADVICE = (
    "start the head there with `ray start --head`, check that this client has the "
    "cluster's token (`ray get-auth-token` on the head, RAY_AUTH_MODE=token), "
    "or give no --address (and no RAY_ADDRESS) for a local Ray"
)
CLI_DEFAULTS: dict[str, Any] = {"include_dashboard": False}


def add_address_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--address` and `--verbose`, as every command that starts or joins Ray documents them."""
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join: HOST:PORT of its head, ray://HOST:PORT, or auto (the "
        "cluster `ray start` recorded on this machine); fails in one line after "
        f"${TIMEOUT_ENV} (default {DEFAULT_TIMEOUT_S:g}) s. Default: $RAY_ADDRESS, "
        "else a new local Ray on 127.0.0.1",
    )
    add_verbose_arg(parser)


def start_ray(
    address: str | None = None, *, connect_timeout_s: float | None = None, **local_kwargs: Any
) -> None:
    """Join the Ray cluster at `address`, else start a new local one; no-op if Ray is up.

    `address`: the command's `--address` value; None falls back to `RAY_ADDRESS`, and
    with neither (or "local") a new local Ray starts on 127.0.0.1 with `local_kwargs`
    (`ray.init` arguments such as `num_cpus`; the dashboard is off). "auto" means the
    cluster the last `ray start` on this machine recorded in
    `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`; anything else is `HOST:PORT` of a
    head's GCS or `ray://HOST:PORT`. Connecting first probes HOST:PORT over TCP, then
    runs `ray.init`, both within `connect_timeout_s` (default: $MONORAY_RAY_CONNECT_TIMEOUT_S,
    else 30 s); Ray's retry warnings go to a log file meanwhile. Raises `InputError`
    (one line: address, what was tried, what to do) when that fails.
    """
    import ray

    if not ray.is_initialized():
        source = "--address"
        if not address and os.environ.get("RAY_ADDRESS"):
            address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        if not address or address == "local":
            start_local_ray(**{**CLI_DEFAULTS, **ray_init_defaults(), **local_kwargs})
        else:
            timeout = connect_timeout() if connect_timeout_s is None else connect_timeout_s
            _connect(address, source, timeout)
    restrict_token_file()


def start_local_ray(**kwargs: Any) -> None:
    """`ray.init(address="local", **kwargs)`: a new local cluster, tried twice.

    On a loaded machine the raylet can give up waiting for its dashboard agent
    (a hard-coded 15 s, ray-project/ray#65983); a second start usually works.
    """
    import ray

    try:
        ray.init(address="local", **kwargs)
    except Exception:  # Ray raises a bare Exception on a node start-up timeout
        ray.shutdown()
        try:
            ray.init(address="local", **kwargs)
        except Exception as err:
            ray.shutdown()
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            logs = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
            raise InputError(
                f"a local Ray cluster did not start (tried twice): {first}; "
                f"Ray's logs are under {logs}/session_latest/logs (a loaded machine: retry)"
            ) from None


def connect_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise InputError(f"{TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return value


def restrict_token_file() -> None:
    """Ray writes ~/.ray/auth_token world-readable; the token is a credential."""
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)


def _connect(address: str, source: str, timeout_s: float) -> None:
    import ray
    from ray._common.utils import get_ray_address_file

    deadline = time.monotonic() + timeout_s
    where = f"{source} {address}"
    target = address
    if address == "auto":
        recorded = Path(get_ray_address_file(None))
        target = recorded.read_text().strip() if recorded.is_file() else ""
        if not target:
            raise InputError(
                f"{where}: no cluster recorded in {recorded} (none started with `ray start` "
                f"here); {ADVICE}"
            )
        where = f"{where} (recorded in {recorded}: {target})"
    host, port = _host_port(target, where)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise InputError(
            f"{where}: no Ray cluster there: a TCP connection to {host}:{port} failed "
            f"({reason}, limit {timeout_s:g} s, {TIMEOUT_ENV}); {ADVICE}"
        ) from None

    fd, name = tempfile.mkstemp(prefix="monoray-ray-connect-", suffix=".log")
    os.close(fd)
    log = Path(name)
    outcome: list[BaseException | None] = []

    def init() -> None:
        try:
            # "auto" lets Ray use a token found on this machine, as for its own `ray start`.
            ray.init(address=address, log_to_driver=is_verbose())
            outcome.append(None)
        except BaseException as err:  # reported to the caller below
            outcome.append(err)

    if threading.current_thread() is threading.main_thread():
        # ray.init sets this itself, but only when it runs in the main thread.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    thread = threading.Thread(target=init, name="monoray-ray-connect", daemon=True)
    terminal = os.dup(2)
    with log.open("ab") as sink:
        os.dup2(sink.fileno(), 2)  # Ray's C++ retry warnings write to fd 2 directly
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0))
    if not outcome:
        # ray.init cannot be cancelled: its daemon thread retries (into the log) until the
        # command exits, so fd 2 stays on the log and Python's stderr moves to the terminal.
        sys.stderr = os.fdopen(terminal, "w", buffering=1)
        _raise_if_token_refused(log, where, timeout_s)
        raise InputError(
            f"{where}: {host}:{port} accepts TCP but Ray did not connect within "
            f"{timeout_s:g} s ({TIMEOUT_ENV}; Ray's log: {log}); is it a head's GCS port? "
            f"{ADVICE}"
        )
    os.dup2(terminal, 2)
    os.close(terminal)
    if outcome[0] is not None:
        ray.shutdown()
        _raise_if_token_refused(log, where, timeout_s)
        lines = str(outcome[0]).strip().splitlines() or [type(outcome[0]).__name__]
        raise InputError(
            f"{where}: Ray did not connect: {lines[-1]} (Ray's log: {log}); {ADVICE}"
        ) from None
    log.unlink()


def _raise_if_token_refused(log: Path, where: str, timeout_s: float) -> None:
    if "InvalidAuthToken" in log.read_text(errors="replace"):
        raise InputError(
            f"{where}: the cluster refused this client's token (limit {timeout_s:g} s, "
            f"{TIMEOUT_ENV}; Ray's log: {log}); put the head's token (`ray get-auth-token` "
            "on the head) in ~/.ray/auth_token or RAY_AUTH_TOKEN and export RAY_AUTH_MODE=token"
        )


def _host_port(target: str, where: str) -> tuple[str, int]:
    scheme, _, hostport = target.rpartition("://")
    host, sep, port = hostport.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if scheme not in ("", "ray") or not sep or not host or not port.isdigit():
        # http://HOST:8265 is the job server's address: right for jobs/submit.sh, not here.
        raise InputError(
            f"{where}: expected HOST:PORT (the head's GCS), ray://HOST:PORT, auto or local"
        )
    return host, int(port)
