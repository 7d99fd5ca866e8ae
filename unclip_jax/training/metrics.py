"""Training logs: TensorBoard event files (tensorboardX), a JSON-lines file, a progress line, and speed.

Speed comes from XLA itself: `compiled_flops(compiled)` reads the FLOPs of one compiled train step from its
cost analysis (per device under SPMD, and counting rematerialised work), and MFU = FLOPs / step time / the
device's peak. Peaks are dense bf16 figures from vendor data sheets; a device not in the table (a CPU) gets no
MFU rather than an invented one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, matched against jax.Device.device_kind (first match wins).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def compiled_flops(compiled, loop_trips: int = 1) -> float | None:
    """FLOPs of one call of a compiled function (per device), from XLA's cost analysis; None if unknown.

    XLA counts a while loop's body once, whatever its trip count: for a step that scans over k gradient-
    accumulation micro-batches pass loop_trips=k (the small optimiser update is then over-counted k times)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) * loop_trips if flops and flops > 0 else None


class Speed:
    """Steps/s, examples/s, TFLOP/s and MFU over the steps since the last `measure`."""

    def __init__(self, batch_size: int, flops_per_step: float | None, peak: float | None):
        self.batch_size, self.flops, self.peak = batch_size, flops_per_step, peak
        self.reset(0)

    def reset(self, step: int) -> None:
        self.t0, self.step0 = time.perf_counter(), step

    def measure(self, step: int) -> dict:
        dt = time.perf_counter() - self.t0
        n = step - self.step0
        self.reset(step)
        if n <= 0 or dt <= 0:
            return {}
        out = {"speed/steps_per_s": n / dt, "speed/examples_per_s": n * self.batch_size / dt}
        if self.flops:
            out["speed/tflops_per_device"] = self.flops * n / dt / 1e12
            if self.peak:
                out["speed/mfu"] = self.flops * n / dt / self.peak
        return out


class Writer:
    """Scalars and images to TensorBoard (when tensorboardX is installed) and scalars to metrics.jsonl, from
    process 0 only."""

    def __init__(self, workdir):
        self.active = jax.process_index() == 0
        self.tb = None
        self.jsonl = None
        if not self.active:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            log.warning("tensorboardX is not installed: no TensorBoard summaries (pip install tensorboardX)")

    def scalars(self, step: int, values: dict) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def image(self, step: int, name: str, image) -> None:
        """image: a PIL image or (H, W, 3) in [0, 1]."""
        if self.active and self.tb is not None:
            arr = np.asarray(image, np.float32)
            if arr.max() > 1.0:
                arr = arr / 255.0
            self.tb.add_image(name, arr, step, dataformats="HWC")

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def progress_line(step: int, total: int, m: dict, elapsed: float) -> str:
    """'step 120/1000 (12%) | loss 0.4213 (mse 0.41, vb 0.012) | grad 1.23 | lr 1.0e-04 | 3.1 steps/s | ...'"""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    loss_parts = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in m.items() if k.startswith("loss/"))
    parts.append(f"loss {m.get('loss', float('nan')):.4f}" + (f" ({loss_parts})" if loss_parts else ""))
    parts.append(f"grad {m.get('grad_norm', float('nan')):.3g}")
    parts.append(f"lr {m.get('learning_rate', 0):.2e}")
    if "speed/steps_per_s" in m:
        sps = m["speed/steps_per_s"]
        parts.append(f"{sps:.2f} steps/s, {m['speed/examples_per_s']:.1f} ex/s")
        if "speed/tflops_per_device" in m:
            tf = m["speed/tflops_per_device"]
            parts.append(f"{tf:.1f} TFLOP/s/dev" if tf >= 1 else f"{tf * 1e3:.2f} GFLOP/s/dev")
        parts.append(f"MFU {100 * m['speed/mfu']:.1f}%" if "speed/mfu" in m else "MFU n/a")
        eta = (total - step) / sps if sps > 0 else 0
        parts.append(f"eta {eta / 60:.1f} min")
    if m.get("skipped"):
        parts.append(f"{int(m['skipped'])} non-finite steps skipped")
    parts.append(f"{elapsed / 60:.1f} min elapsed")
    return " | ".join(parts)
