"""Peak memory of inference and of a training step, measured in a fresh subprocess.

Why a subprocess: inside the benchmark process the allocator keeps memory freed by earlier
models, so a later model can reuse it without raising the resident set; a new interpreter has no
such history. The child builds the model and the input, then reads its current resident set
(``VmRSS``), resets the kernel's high-water mark (writing ``5`` to ``/proc/self/clear_refs``),
runs one step and reads the high-water mark (``VmHWM``). The reported figure is
``VmHWM - VmRSS_before``: the extra resident memory the step needed (activations, workspace,
gradients and optimizer state for training), excluding the interpreter, the weights and the
input. Where the high-water mark cannot be reset, the child falls back to ``ru_maxrss`` and says
so (``method``). On CUDA it reports ``torch.cuda.max_memory_allocated`` deltas instead.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

from .models import build


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.M)
    if match is None:
        raise OSError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _child(spec: dict) -> dict:
    import resource  # Unix-only: imported where it is used, so that the module imports everywhere

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    train = spec["mode"] == "train"
    model = build(spec["name"], spec["variant"], img_size=spec["img_size"], train=train).to(device)
    x = torch.randn(spec["batch"], 3, spec["img_size"], spec["img_size"], device=device)
    if spec.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if train else None

    def step() -> None:
        if train:
            opt.zero_grad(set_to_none=True)
            model(x).float().mean().backward()
            opt.step()
        else:
            with torch.inference_mode():
                model(x)

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "method": "cuda_max_memory_allocated"}
    before_kib = _status_kib("VmRSS")
    if _reset_hwm():
        step()
        peak_kib, method = _status_kib("VmHWM"), "VmHWM-after-clear_refs minus VmRSS-before"
    else:
        step()
        peak_kib, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss minus VmRSS-before (upper bound)"
    return {"peak_mib": (peak_kib - before_kib) / 1024, "method": method}


def measure_peak_memory(
    name: str,
    variant: str,
    mode: str,
    batch: int,
    img_size: int = 224,
    threads: int = 1,
    device: str = "cpu",
    channels_last: bool = False,
    timeout_s: float = 300.0,
) -> dict:
    """Extra peak memory (MiB) of one inference (``mode="infer"``) or training step (``"train"``).

    Runs in a fresh ``python -m emov2.tools.bench.memory`` subprocess. Returns a dict with
    ``peak_mib`` and ``method``, or ``error``.
    """
    spec = {"name": name, "variant": variant, "mode": mode, "batch": batch, "img_size": img_size,
            "threads": threads, "device": device, "channels_last": channels_last}
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "emov2.tools.bench.memory", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:300]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
