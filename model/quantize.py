"""int8 by ONNX Runtime's own quantization tooling, with the recipe that suits DeepViT.

- **dynamic** (no calibration images; the default): ``quantize_dynamic`` on the MatMuls with a constant
  weight (qkv, proj, fc1, fc2), per output channel, int8 weights, activations quantized per batch at run
  time. Attention's own products (QKᵀ and A·V), the Re-attention 1×1 convolution over heads, LayerNorm,
  Softmax, the stem and the head stay float32. Measured on a small trained model, quantizing every op
  cost 11.5 points of top-1 and static QDQ on every MatMul about 7; this recipe kept top-1 within a point.
- **static** (``--calibration DIR``): QDQ with activation ranges calibrated (MinMax) on the folder's images,
  on the same weight MatMuls only; Re-attention's head-mixing convolution stays float (its input is a
  softmax map whose range per head is narrow and whose mixing across the heads an 8-bit grid coarsens).
  Activations int8 and symmetric (S8S8, ONNX Runtime's recommendation for QDQ on x86-64): with uint8
  activations (U8S8) the official tiny_cnn weights kept 2% of their top-1 decisions on the shipped
  photographs, with S8S8 all of them. On a small trained model (35% top-1 on the demo's shapes), MinMax,
  Entropy and Percentile (99.99, 99.999) calibration all agreed with float32 on 97.5–99.5% of the images
  and none beat dynamic (98.5–99.5%); MinMax, the simplest, is the one used.

- **nncf** (``--int8-recipe nncf``, needs ``--calibration DIR``): NNCF's post-training quantization of the
  ONNX graph (``nncf.quantize`` with ``model_type=TRANSFORMER``: its transformer scheme, SmoothQuant and bias
  correction, calibrated on the folder's images), written as QDQ and computed by ONNX Runtime's OpenVINO
  execution provider, whose int8 kernels use VNNI and AMX; its gate and its speed are measured on that engine.

What was done is recorded in the artifact (``deepvit.quantization``), with the speed of the int8 graph
beside the float32 one on the exporting machine: int8 does not always pay (on a very small model the
quantize/dequantize steps cost more than the integer MatMuls save), and the export says so.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepvit.artifact.engines import Engine
from deepvit.artifact.session import open_session

Method = Literal["dynamic", "static", "nncf"]
CALIBRATION_BATCH = 16
MAX_CALIBRATION_IMAGES = 512
SPEED_BATCH_SIZES = (1, 8)


@dataclass(frozen=True)
class Speed:
    """Time per image of one session call, float32 against int8, on the exporting machine's CPU."""

    batch_size: int
    fp32_ms: float
    int8_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": round(self.speedup, 3)}


@dataclass(frozen=True)
class Quantization:
    """How an artifact was quantized: what ``deepvit.quantization`` records."""

    method: Method
    op_types: tuple[str, ...] = ("MatMul",)
    per_channel: bool = True
    weight_type: str = "int8"
    activation_type: str = "uint8"
    quant_format: str = "QOperator"  # dynamic: MatMulInteger; static: QDQ pairs
    calibration: dict[str, Any] = field(default_factory=dict)
    speed: tuple[Speed, ...] = ()
    engine: str = "cpu"  # the engine it is gated and timed on (deepvit.artifact.engines)

    @property
    def pays(self) -> bool:
        return all(s.speedup > 1.0 for s in self.speed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["op_types"] = list(self.op_types)
        d["speed"] = [s.to_dict() for s in self.speed]
        d["tool"] = "nncf" if self.method == "nncf" else "onnxruntime.quantization"
        return d


def _reader(input_name: str, images: np.ndarray) -> Any:
    """ONNX Runtime's CalibrationDataReader over uint8 NHWC images, a batch at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            # Batches of one size: the histogram calibrators stack what they collect across batches.
            size = min(CALIBRATION_BATCH, len(images))
            self.batches = (images[i : i + size] for i in range(0, len(images) - size + 1, size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    return Reader()


@contextlib.contextmanager
def _without_preprocessing_hint() -> Iterator[None]:
    """ONNX Runtime's quantizer suggests, through the root logger, running its pre-processing (symbolic shape
    inference and graph optimisation) first; the export's graph has consistent inferred shapes already, and
    the session optimises at load, so the hint would only be noise among the export's own lines."""

    def drop(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantize_nncf(
    fp32: bytes, calibration: np.ndarray, calibration_source: str, log: Callable[[str], None]
) -> tuple[bytes, Quantization]:
    """NNCF's post-training quantization, transformer scheme, of the float32 graph: QDQ for the OpenVINO engine."""
    import nncf
    import onnx

    images = calibration[:MAX_CALIBRATION_IMAGES]
    log(f"quantizing to int8: NNCF post-training (transformer scheme), calibrated on {len(images)} images…")
    model = onnx.load_from_string(fp32)
    name = model.graph.input[0].name
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))], lambda x: {name: x})
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(images))
    recipe = Quantization(
        "nncf",
        op_types=("NNCF transformer scheme",),
        activation_type="int8 (NNCF)",
        quant_format="QDQ",
        calibration={
            "images": len(images),
            "source": calibration_source,
            "method": "NNCF (SmoothQuant, bias correction)",
        },
        engine="openvino",
    )
    return quantized.SerializeToString(), recipe


def quantize(
    fp32: bytes,
    calibration: np.ndarray | None,
    calibration_source: str = "",
    log: Callable[[str], None] = print,
    method: Method | None = None,
) -> tuple[bytes, Quantization]:
    """The float32 artifact's graph → its int8 graph and how it was made (speed not yet measured). ``method``:
    ``nncf`` (calibration images needed), else dynamic without calibration images and static with them."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method == "nncf":
        if calibration is None:
            raise ValueError("the nncf int8 recipe is calibrated: give --calibration DIR")
        return quantize_nncf(fp32, calibration, calibration_source, log)

    with tempfile.TemporaryDirectory(prefix="deepvit-int8-") as tmp, _without_preprocessing_hint():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        if calibration is None:
            log("quantizing to int8: dynamic, MatMul weights per channel (no calibration images)…")
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)
            recipe = Quantization("dynamic")
        else:
            images = calibration[:MAX_CALIBRATION_IMAGES]
            log(f"quantizing to int8: static QDQ (S8S8) calibrated on {len(images)} images (MinMax), MatMuls…")
            input_name = open_session(fp32, optimize=False).get_inputs()[0].name
            quantize_static(
                src,
                dst,
                _reader(input_name, images),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": True},
            )
            recipe = Quantization(
                "static",
                activation_type="int8 symmetric",
                quant_format="QDQ",
                calibration={"images": len(images), "source": calibration_source, "method": "MinMax"},
            )
        return dst.read_bytes(), recipe


def _ms_per_image(session: Any, images: np.ndarray, min_time_s: float) -> float:
    name = session.get_inputs()[0].name
    session.run(None, {name: images})  # not timed: allocation and first-run effects
    n, started = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - started < min_time_s:
        session.run(None, {name: images})
        n += 1
    return (time.perf_counter() - started) / n / len(images) * 1000


def measure_speed(
    fp32: bytes,
    int8: bytes,
    image_size: int,
    batch_sizes: tuple[int, ...] = SPEED_BATCH_SIZES,
    min_time_s: float = 1.0,
    engine: Engine | None = None,
) -> tuple[Speed, ...]:
    """Both graphs side by side on ``engine`` (ONNX Runtime's CPU provider by default), alternately per batch
    size, so that a shared machine's noise hits both."""
    sessions = open_session(fp32, engine=engine), open_session(int8, engine=engine)
    rng = np.random.default_rng(0)
    out = []
    for b in batch_sizes:
        images = rng.integers(0, 256, (b, image_size, image_size, 3), dtype=np.uint8)
        fp32_ms, int8_ms = (_ms_per_image(s, images, min_time_s) for s in sessions)
        out.append(Speed(b, round(fp32_ms, 4), round(int8_ms, 4)))
    return tuple(out)
