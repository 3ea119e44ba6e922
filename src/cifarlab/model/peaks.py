"""Published dense peak FLOP/s of common data-centre GPUs, per precision, and matching a device name to them.

Every figure is the vendor datasheet's *dense* tensor/vector throughput in TFLOP/s. Datasheets from
Ampere on print tensor-core figures "with sparsity" (marked *): those are halved here, since a dense
ResNet-18 cannot use 2:4 structured sparsity. Precisions: fp32 (CUDA cores), tf32 (fp32 tensors on tensor
cores: what cuDNN's convolutions use by default for fp32 on Ampere and later), bf16 and fp16 (tensor cores,
fp32 accumulate). A card without a precision (V100/T4: no tf32 or bf16 tensor cores) has no entry for it.

Names are matched most specific first ("H100 PCIe" before "H100", "L40S" before "L40" before "L4"), on
the name CUDA reports (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3", "Tesla V100-SXM2-16GB", ...).
Nothing here imports torch: the table and its matching are plain data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass(frozen=True)
class Card:
    name: str  # the card as the table calls it, e.g. "H100 SXM"
    pattern: str  # regular expression searched (case-insensitive) in the device name
    tflops: dict[str, float]  # precision -> dense peak TFLOP/s
    source: str  # the datasheet the figures come from (document name and URL)


_A100 = "NVIDIA A100 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet, https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet, https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446"
_V100 = "NVIDIA Tesla V100 GPU Accelerator datasheet, https://images.nvidia.com/content/technologies/volta/pdf/tesla-volta-v100-datasheet-letter-fnl-web.pdf"
_V100S = "NVIDIA V100 Tensor Core GPU datasheet (V100S), https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"
_T4 = "NVIDIA T4 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf"
_L4 = "NVIDIA L4 Tensor Core GPU datasheet, https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet"
_L40S = "NVIDIA L40S GPU datasheet, https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413"
_L40 = "NVIDIA L40 GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/support-guide/NVIDIA-L40-Datasheet-January-2023.pdf"
_A10 = "NVIDIA A10 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/datasheet-new/nvidia-a10-datasheet.pdf"


def _tensor(fp32: float, tf32: float | None, half: float) -> dict[str, float]:
    """fp32 plus the dense tensor-core figures (bf16 and fp16 share one on these cards)."""
    out = {"fp32": fp32, "bf16": half, "fp16": half}
    if tf32 is not None:
        out["tf32"] = tf32
    return out


# Most specific first: the first pattern found in the name wins. Sparse datasheet figures are halved (x / 2).
CARDS: tuple[Card, ...] = (
    Card("H200 NVL", r"H200\s*NVL", _tensor(60.0, 835 / 2, 1671 / 2), _H200),
    Card("H200 SXM", r"H200", _tensor(67.0, 989 / 2, 1979 / 2), _H200),
    Card("H100 NVL", r"H100\s*NVL", _tensor(60.0, 835 / 2, 1671 / 2), _H100),
    Card("H100 PCIe", r"H100.*PCIe", _tensor(51.0, 756 / 2, 1513 / 2), _H100),
    Card("H100 SXM", r"H100", _tensor(67.0, 989 / 2, 1979 / 2), _H100),  # "NVIDIA H100 80GB HBM3" is the SXM5 card
    Card("A100", r"A100", _tensor(19.5, 156.0, 312.0), _A100),  # PCIe and SXM4, 40 and 80 GB: one set of peaks
    Card("A10", r"\bA10\b", _tensor(31.2, 62.5, 125.0), _A10),  # not the A10G (AWS), whose clocks differ
    Card("L40S", r"L40S", _tensor(91.6, 366 / 2, 733 / 2), _L40S),
    Card("L40", r"\bL40\b", _tensor(90.5, 181.0, 181.0), _L40),
    Card("L4", r"\bL4\b", _tensor(30.3, 120 / 2, 242 / 2), _L4),
    Card("V100S PCIe", r"V100S", {"fp32": 16.4, "fp16": 130.0}, _V100S),
    Card("V100 PCIe", r"V100.*PCIE", {"fp32": 14.0, "fp16": 112.0}, _V100),
    Card("V100 SXM2", r"V100", {"fp32": 15.7, "fp16": 125.0}, _V100),
    Card("T4", r"\bT4\b", {"fp32": 8.1, "fp16": 65.0}, _T4),
)


def match_card(device_name: str) -> Card | None:
    """The table's card for a CUDA device name, most specific pattern first; None: not in the table."""
    for card in CARDS:
        if re.search(card.pattern, device_name, flags=re.IGNORECASE):
            return card
    return None


def published_peak(device_name: str, precision: str) -> tuple[Card, float] | None:
    """(card, dense peak TFLOP/s) for that precision, or None when the card or its precision is not in the table."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    card = match_card(device_name)
    if card is None or precision not in card.tflops:
        return None
    return card, card.tflops[precision]
