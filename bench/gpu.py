"""``make bench-gpu`` (``python3 -m deepvit.bench.gpu`` in a checkout): the GPU check in one command,
printing one table.

deepvit_S (random weights, saved as a checkpoint so that verify has one) exported fp32 and fp16; raw ONNX
Runtime CUDA by batch size (``session.run`` on host arrays), the same through IO binding, and through IO
binding with CUDA graphs; PyTorch's own CUDA throughput on the same network (the baseline a user would
otherwise serve with); the service over HTTP at c=64 and c=256 (a real ``deepvit serve`` on CUDA, asked by
an asyncio httpx load generator); fp16 parity on CUDA (``deepvit verify --provider cuda``).

A machine with PyTorch and the CPU ``onnxruntime`` but no package index gets ``onnxruntime-gpu`` (and the
service's own dependencies) as wheels: ``--wheels DIR`` installs every ``*.whl`` there, and first joins a
wheel split into ``NAME.whl.part-aa``, ``NAME.whl.part-ab``, … (``split -b 60M NAME.whl NAME.whl.part-``)
so that one larger than a single transfer can arrive in pieces. The script then runs itself again with the
installed packages first on the path (before anything imports onnxruntime).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "data" / "photos" / "astronaut.jpg"
SITE = Path("/tmp/deepvit-bench-gpu-site")
BATCH_SIZES = (1, 8, 32, 64, 128, 256)
CONCURRENCIES = (64, 256)


def join_wheels(folder: Path, out: Path) -> list[Path]:
    """Every wheel of ``folder``, split ones joined (parts in name order) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    wheels = [shutil.copy(w, out / w.name) for w in sorted(folder.glob("*.whl"))]
    parts: dict[str, list[Path]] = {}
    for part in sorted(folder.glob("*.whl.part-*")):
        parts.setdefault(part.name.split(".part-")[0], []).append(part)
    for name, pieces in parts.items():
        with open(out / name, "wb") as whole:
            for piece in pieces:
                whole.write(piece.read_bytes())
        wheels.append(out / name)
    return [Path(w) for w in wheels]


def install(folder: Path) -> None:
    wheels = join_wheels(folder, Path(tempfile.mkdtemp(prefix="deepvit-wheels-")))
    if not wheels:
        raise SystemExit(f"bench-gpu: no wheels in {folder}")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*pip, "--target", str(SITE), *map(str, wheels)], check=True)


def timed(fn: object, min_time_s: float = 2.0) -> float:
    """Seconds per call after two untimed calls (allocation, graph capture, algorithm choice)."""
    assert callable(fn)
    fn()
    fn()
    n, start = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - start < min_time_s:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def export(work: Path) -> tuple[Path, Path, Path]:
    import torch

    from deepvit.model.config import get_config
    from deepvit.model.net import DeepViT

    torch.manual_seed(0)
    ckpt = work / "deepvit_S.pth.tar"
    torch.save({"state_dict": DeepViT(get_config("deepvit_S")).state_dict()}, ckpt)
    paths = []
    for precision in ("fp32", "fp16"):
        out = work / "models" / f"deepvit_S_{precision}" / "1" / "model.onnx"
        cmd = [sys.executable, "-m", "deepvit.cli", "export", "--arch", "deepvit_S", "--checkpoint", str(ckpt)]
        cmd += ["--name", f"deepvit_S_{precision}", "--precision", precision, "--output", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        paths.append(out)
    return ckpt, paths[0], paths[1]


def ort_rows(artifact: Path, label: str) -> list[tuple[str, str, int, float]]:
    from deepvit.artifact.session import open_session
    from deepvit.service.binding import BoundSession

    rows = []
    cuda = ("CUDAExecutionProvider", {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"})
    plain = open_session(artifact, [cuda, "CPUExecutionProvider"])
    if plain.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"bench-gpu: ONNX Runtime runs on {plain.get_providers()[0]}: is onnxruntime-gpu installed?")
    bound = BoundSession(plain, 224, 1000, "cuda")
    graphed_session = open_session(artifact, [(cuda[0], {**cuda[1], "enable_cuda_graph": "1"}), "CPUExecutionProvider"])
    graphed = BoundSession(graphed_session, 224, 1000, "cuda", buckets=BATCH_SIZES, cuda_graph=True)
    rng = np.random.default_rng(0)
    for b in BATCH_SIZES:
        x = rng.integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
        rows.append(
            (f"onnxruntime CUDA {label}", "session.run", b, b / timed(lambda x=x: plain.run(None, {"image": x})))
        )
        rows.append((f"onnxruntime CUDA {label}", "IO binding", b, b / timed(lambda x=x: bound.run(x))))
        try:
            rows.append(
                (f"onnxruntime CUDA {label}", "IO binding + CUDA graph", b, b / timed(lambda x=x: graphed.run(x)))
            )
        except Exception as exc:  # a capture ONNX Runtime refuses: the table says so
            print(f"bench-gpu: CUDA graph at batch {b}: {exc}", file=sys.stderr)
    return rows


def torch_rows() -> list[tuple[str, str, int, float]]:
    import torch

    from deepvit.model.config import get_config
    from deepvit.model.export import ImageClassifier
    from deepvit.model.net import DeepViT

    torch.backends.cudnn.benchmark = True
    rows = []
    for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        net = DeepViT(get_config("deepvit_S")).eval().to("cuda", dtype)
        model = ImageClassifier(net, dtype).to("cuda").eval()
        for b in BATCH_SIZES:
            x = torch.randint(0, 256, (b, 224, 224, 3), dtype=torch.uint8, device="cuda")

            def step(x: torch.Tensor = x, model: ImageClassifier = model) -> None:
                with torch.inference_mode():
                    model(x)
                torch.cuda.synchronize()

            rows.append((f"PyTorch CUDA {label}", "eager, input on the device", b, b / timed(step)))
        torch.cuda.empty_cache()
    return rows


async def load(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[float, float, int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                r = await client.post("/classify", content=body, headers={"content-type": "image/jpeg"})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return len(latencies) / wall, float(np.percentile(latencies, 99) * 1000) if latencies else float("nan"), errors


def http_rows(repository: Path, model: str) -> list[tuple[str, str, int, float]]:
    from .server import free_port, serve, stop, wait_ready

    env = {
        "DEEPVIT_PROVIDERS": "cuda,cpu",
        "DEEPVIT_REQUIRE_GPU": "true",
        "DEEPVIT_MAX_BATCH_SIZE": "128",
        "DEEPVIT_MAX_QUEUE_SIZE": "1024",
        "DEEPVIT_MAX_PENDING_IMAGES": "1024",
        "DEEPVIT_IO_BINDING": "true",
    }
    only = Path(tempfile.mkdtemp()) / "repo"
    shutil.copytree(repository / model, only / model)
    port = free_port()
    proc = serve(only, model, port, only.parent / "server.log", env, cwd=ROOT)
    url, rows = f"http://127.0.0.1:{port}", []
    try:
        wait_ready(url, proc)
        body = PHOTO.read_bytes()
        for c in CONCURRENCIES:
            asyncio.run(load(url, body, c, 2))  # connections and queues warm up
            rate, p99, errors = asyncio.run(load(url, body, c, 10))
            rows.append((f"service over HTTP ({model})", f"c={c}, p99 {p99:.0f} ms, {errors} errors", c, rate))
    finally:
        stop(proc)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, help="folder of wheels (onnxruntime-gpu, whole or in .part-* pieces)")
    p.add_argument("--work", type=Path, default=Path("/tmp/deepvit-bench-gpu"))
    args = p.parse_args()
    if args.wheels and os.environ.get("DEEPVIT_BENCH_GPU_INSTALLED") != "1":
        install(args.wheels)
        env = {**os.environ, "PYTHONPATH": f"{SITE}:{ROOT}", "DEEPVIT_BENCH_GPU_INSTALLED": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "deepvit.bench.gpu", *sys.argv[1:]], env)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ckpt, fp32, fp16 = export(args.work)
    rows = ort_rows(fp32, "fp32") + ort_rows(fp16, "fp16") + torch_rows()
    rows += http_rows(args.work / "models", "deepvit_S_fp16")
    best = max(r[3] for r in rows if r[0].startswith("onnxruntime"))
    verify = subprocess.run(
        [sys.executable, "-m", "deepvit.cli", "verify", str(fp16), "--checkpoint", str(ckpt), "--provider", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    print("| layer | setting | batch / concurrency | images/s | share of best raw ORT |")
    print("|---|---|---:|---:|---:|")
    for layer, setting, n, rate in rows:
        print(f"| {layer} | {setting} | {n} | {rate:,.0f} | {rate / best:.2f} |")
    print(f"\nfp16 parity on CUDA (deepvit verify --provider cuda), exit {verify.returncode}:")
    print(verify.stdout.strip() or verify.stderr.strip()[-2000:])
    print(f"\nbench-gpu took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
