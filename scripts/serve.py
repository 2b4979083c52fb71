"""Starts TorchServe with the LLM and the static-batching models, waits until every model is
READY, and prints how to call each; ``--stop`` stops it; ``--demo`` also builds everything
first and streams one sample request token by token.

Everything a server writes lives in its run directory (default logs/server): the rendered
config.properties, logs, Java's tmpdir (worker sockets, unpacked archives), TorchServe's PID
file and key_file.json (token authorization is on by default; the keys are read from there).

    python scripts/serve.py --demo            # build models + archives, start, stream a sample
    python scripts/serve.py                   # start with archives/ as they are
    python scripts/serve.py --stop            # drains the LLM first (see drain_workers)
    python scripts/serve.py --drain llm       # drain only, e.g. before scaling it to zero
    python scripts/serve.py --scale llm=2     # workers via the management API (drains first)
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import requests

from handlers.keeper import KEY_FILE_ENV, URL_ENV

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / "logs" / "server"
MODELS = ("llm", "llm_static", "classifier")
STREAMING_MODELS = ("llm",)          # continuous-batching models, whose workers drain on SIGTERM
PORT_KEYS = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
DEFAULT_PORTS = dict(zip(PORT_KEYS, (8080, 8081, 8082, 7070, 7071)))


@dataclass
class Server:
    run_dir: Path
    ports: dict[str, int]
    pid: int
    inference_key: str | None
    management_key: str | None

    def url(self, kind: str = "inference") -> str:
        return f"http://127.0.0.1:{self.ports[kind]}"

    def headers(self, kind: str = "inference") -> dict[str, str]:
        key = self.inference_key if kind == "inference" else self.management_key
        return {"Authorization": f"Bearer {key}"} if key else {}


def free_ports(n: int = len(PORT_KEYS)) -> dict[str, int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return dict(zip(PORT_KEYS, ports))


def render_config(run_dir: Path, ports: dict[str, int], model_store: Path) -> Path:
    """config/config.properties with this run's ports, absolute paths and Java tmpdir."""
    overrides = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "metrics_config": str(ROOT / "config" / "metrics.yaml"),
        "model_store": str(model_store),
        "vmargs": f"-Xmx1g -Djava.io.tmpdir={run_dir / 'java-tmp'}",
    }
    lines = []
    for line in (ROOT / "config" / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in overrides and not line.lstrip().startswith("#"):
            line = f"{key}={overrides.pop(key)}"
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items()]
    path = run_dir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def frontend_env(url: str, key_file: Path | None) -> dict[str, str]:
    """Where the LLM workers' keepers reach the frontend (handlers/keeper.py): TorchServe
    passes its environment on to its workers."""
    return {URL_ENV: url} | ({KEY_FILE_ENV: str(key_file)} if key_file else {})


def read_keys(run_dir: Path) -> tuple[str | None, str | None]:
    """The keys from key_file.json; (None, None) until TorchServe has finished writing it."""
    try:
        keys = json.loads((run_dir / "key_file.json").read_text())
        return keys["inference"]["key"], keys["management"]["key"]
    except (OSError, ValueError, KeyError):
        return None, None


def start_server(model_store: Path, models: tuple[str, ...] = MODELS, run_dir: Path = RUN_DIR,
                 ports: dict[str, int] | None = None, token_auth: bool = True,
                 timeout_s: float = 300, model_api: bool = False) -> Server:
    """Start TorchServe in the background and return once every model is READY."""
    run_dir = Path(run_dir).resolve()
    for sub in ("logs", "java-tmp", "tmp"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    ports = ports or dict(DEFAULT_PORTS)
    config = render_config(run_dir, ports, Path(model_store).resolve())
    # PATH first names this interpreter's scripts: TorchServe runs `torchrun` by name for a
    # parallelType tp model
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PATH=path, LOG_LOCATION=str(run_dir / "logs"),
               METRICS_LOCATION=str(run_dir / "logs"), TMPDIR=str(run_dir / "tmp"),
               **frontend_env(f"http://127.0.0.1:{ports['inference']}",
                              run_dir / "key_file.json" if token_auth else None))
    torchserve = Path(sys.executable).with_name("torchserve")
    cmd = [str(torchserve if torchserve.exists() else "torchserve"), "--start", "--ncs",
           "--model-store", str(Path(model_store).resolve()), "--ts-config", str(config),
           "--models", *[f"{m}={m}.mar" for m in models]]
    if not token_auth:
        cmd.append("--disable-token-auth")
    if model_api:
        cmd.append("--enable-model-api")
    with open(run_dir / "logs" / "torchserve.out", "ab") as out:
        subprocess.run(cmd, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    pid = int((run_dir / "tmp" / ".model_server.pid").read_text().strip())
    server = Server(run_dir, ports, pid, None, None)
    try:
        wait_ready(server, models, token_auth, timeout_s)
    except BaseException:
        stop_server(run_dir)
        raise
    return server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_ready(server: Server, models: tuple[str, ...], token_auth: bool,
               timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(models)
    while pending:
        if not _alive(server.pid):
            raise RuntimeError(f"TorchServe exited; see {server.run_dir / 'logs'}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"models not READY after {timeout_s}s: {pending}; "
                               f"see {server.run_dir / 'logs'}")
        if token_auth and server.management_key is None:
            server.inference_key, server.management_key = read_keys(server.run_dir)
        try:
            reply = requests.get(f"{server.url('management')}/models/{pending[0]}",
                                 headers=server.headers("management"), timeout=5)
            workers = reply.json()[0]["workers"] if reply.ok else []
        except (requests.RequestException, ValueError, KeyError, IndexError):
            workers = []
        if workers and all(w.get("status") == "READY" for w in workers):
            pending.pop(0)
        else:
            time.sleep(0.5)


def running_server(run_dir: Path) -> Server | None:
    """The server of ``run_dir`` as its rendered config, PID file and key file describe it."""
    try:
        pid = int((Path(run_dir) / "tmp" / ".model_server.pid").read_text().strip())
        config = (Path(run_dir) / "config.properties").read_text().splitlines()
    except (OSError, ValueError):
        return None
    props = dict(line.split("=", 1) for line in config if "=" in line and line[0] != "#")
    ports = {kind: int(props[f"{kind}_address"].rsplit(":", 1)[1])
             for kind in ("inference", "management", "metrics")}
    return Server(Path(run_dir), ports, pid, *read_keys(Path(run_dir)))


def workers(server: Server, model: str) -> list[dict]:
    """The model's workers as the management API describes them, in TorchServe's order."""
    reply = requests.get(f"{server.url('management')}/models/{model}",
                         headers=server.headers("management"), timeout=10)
    return reply.json()[0]["workers"] if reply.ok else []


def worker_pids(server: Server, model: str) -> list[int]:
    return [w["pid"] for w in workers(server, model)]


def drain_workers(server: Server, models: tuple[str, ...] = STREAMING_MODELS,
                  timeout_s: float = 30, pids: list[int] | None = None) -> None:
    """SIGTERM each worker of ``models`` (or only ``pids``) and wait until none has a stream
    left.

    TorchServe 0.12 gives a worker no warning before it closes the worker's socket and
    SIGKILLs it (scale-down, unregister, stop), so a stream in flight then is cut off. A worker
    of handlers/continuous_batching.py that gets SIGTERM ends every stream with a last chunk
    carrying an error, answers new requests with 503 and stops its engine; it stays up until
    TorchServe stops or scales it. The stats route answers from whichever worker takes the
    request, with its PID: it is read until every drained worker has reported itself idle.
    """
    pending: dict[int, str] = {}                 # drained PID: its model
    for model in models:
        try:
            chosen = worker_pids(server, model) if pids is None else pids
        except (requests.RequestException, ValueError, KeyError, IndexError):
            continue
        for pid in chosen:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            pending[pid] = model
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for model in set(pending.values()):
            try:
                reply = requests.get(f"{server.url()}/predictions/{model}/1.0/stats",
                                     headers=server.headers(), timeout=10)
                stats = reply.json() if reply.ok else {}
            except (requests.RequestException, ValueError):
                stats = {}
            if not stats:               # not served any more
                pending = {pid: m for pid, m in pending.items() if m != model}
            elif stats.get("draining") and stats.get("num_streams") == 0:
                pending.pop(stats.get("pid"), None)
        pending = {pid: m for pid, m in pending.items() if _alive(pid)}
        time.sleep(0.05)


def scale_workers(server: Server, model: str, count: int, drain: bool = True,
                  timeout_s: float = 240) -> None:
    """Scale ``model`` to ``count`` workers through the management API. On scale-down
    TorchServe 0.12 stops the last workers of its list (``WorkLoadManager.modelChanged``);
    with ``drain`` those are drained first, so their streams end with an error chunk instead
    of being cut or dropped."""
    current = worker_pids(server, model)
    if drain and count < len(current):
        drain_workers(server, (model,), pids=current[count:])
    reply = requests.put(f"{server.url('management')}/models/{model}?min_worker={count}"
                         f"&max_worker={count}&synchronous=true",
                         headers=server.headers("management"), timeout=timeout_s)
    if reply.status_code != 200:
        raise RuntimeError(f"scaling {model} to {count} workers: {reply.status_code} "
                           f"{reply.text[:200]}")


@contextmanager
def serving(model_store: Path, run_dir: Path, **start_args) -> Iterator[Server]:
    """``start_server`` on free loopback ports for the block, then ``stop_server``."""
    server = start_server(model_store, run_dir=run_dir, ports=free_ports(), **start_args)
    try:
        yield server
    finally:
        stop_server(run_dir)


def stop_server(run_dir: Path = RUN_DIR, timeout_s: float = 60,
                drain: tuple[str, ...] = STREAMING_MODELS) -> bool:
    """Stop the server whose PID file is in ``run_dir``: drain the streaming models' workers
    first (in-flight streams end with an error chunk, not a reset), then wait for Java to exit."""
    pid_file = Path(run_dir) / "tmp" / ".model_server.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip())
    server = running_server(run_dir)
    if drain and server is not None and _alive(pid):
        drain_workers(server, drain, timeout_s=min(timeout_s, 30))
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def usage(server: Server) -> str:
    auth = (f' -H "Authorization: Bearer {server.inference_key}"'
            if server.inference_key else "")
    base = f"{server.url()}/predictions"
    js = '-H "Content-Type: application/json"'
    return "\n".join([
        f"TorchServe is up (run dir {server.run_dir}; keys in key_file.json there).",
        "Streamed generation (NDJSON, one object per delta):",
        f"  curl -N{auth} {js} {base}/llm -d '{{\"prompt\": \"Once upon a time\", "
        f"\"max_tokens\": 64, \"stream\": true}}'",
        "OpenAI chat completions (server-sent events):",
        f"  curl -N{auth} {js} {base}/llm/1.0/v1/chat/completions -d '{{\"model\": \"llm\", "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of "
        f"France?\"}}], \"max_tokens\": 64, \"stream\": true}}'",
        "OpenAI completions (server-sent events):",
        f"  curl -N{auth} {js} {base}/llm/1.0/v1/completions -d '{{\"model\": \"llm\", "
        f"\"prompt\": \"Hello\", \"max_tokens\": 32, \"stream\": true}}'",
        "Static-batching baseline, same model:",
        f"  curl{auth} {js} {base}/llm_static -d '{{\"prompt\": \"Hello\", \"max_tokens\": 32}}'",
        "Text classifier:",
        f"  curl{auth} {js} {base}/classifier -d '{{\"text\": \"what a wonderful day\"}}'",
        f"Metrics (Prometheus): curl {server.url('metrics')}/metrics",
        "Stop: python scripts/serve.py --stop",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stop", action="store_true", help="stop the running server")
    parser.add_argument("--drain", default=None, metavar="MODELS",
                        help="drain these streaming models' workers (comma-separated) and exit")
    parser.add_argument("--scale", default=None, metavar="MODEL=N",
                        help="scale a model of the running server to N workers and exit")
    parser.add_argument("--no-drain", action="store_true",
                        help="with --scale: stop workers without draining them first")
    parser.add_argument("--demo", action="store_true",
                        help="build models and archives if needed, start, stream a sample")
    parser.add_argument("--size", choices=["tiny", "default"], default="default",
                        help="default: SmolLM2-135M-Instruct; tiny: a small test model")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="serve this local Hugging Face checkpoint instead (with --demo/--build)")
    parser.add_argument("--build", action="store_true", help="(re)build archives before start")
    parser.add_argument("--bundle", action="store_true",
                        help="with --demo/--build: put the weights inside the archives")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--model-store", type=Path, default=ROOT / "archives")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--disable-token-auth", action="store_true")
    args = parser.parse_args(argv)
    if args.stop:
        print("stopped" if stop_server(args.run_dir) else "no server running")
        return
    if args.scale:
        server = running_server(args.run_dir)
        if server is None:
            raise SystemExit("no server running")
        model, count = args.scale.split("=")
        scale_workers(server, model, int(count), drain=not args.no_drain)
        print(f"{model}: workers {worker_pids(server, model)}")
        return
    if args.drain:
        server = running_server(args.run_dir)
        if server is None:
            raise SystemExit("no server running")
        drain_workers(server, tuple(m for m in args.drain.split(",") if m))
        print(f"drained {args.drain}: in-flight streams ended, new requests get 503")
        return
    models = tuple(m for m in args.models.split(",") if m)
    if args.demo or args.build:
        from scripts.build_archives import build_all
        build_all(args.size, out=args.model_store, llm_path=args.model_path, names=models,
                  bundle=args.bundle)
    stop_server(args.run_dir)
    server = start_server(args.model_store, models, args.run_dir,
                          token_auth=not args.disable_token_auth)
    print(usage(server))
    if args.demo and "llm" in models:
        from scripts.stream_client import stream
        print("\nSample streamed chat completion (tokens printed as they arrive):")
        stream(f"{server.url()}/predictions/llm", "What is the capital of France?",
               server.inference_key, max_tokens=64, api="chat")


if __name__ == "__main__":
    main()
