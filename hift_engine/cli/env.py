"""``hift env``: versions, GPU and PCIe link, whether the extension and kernels are active, host memory."""

from __future__ import annotations

import json
import os
import platform

NAME = "env"


def register(sub) -> None:
    p = sub.add_parser(NAME, help="print the environment (versions, GPU, PCIe link, extension)", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def collect() -> dict:
    import torch

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "platform": platform.platform(),
    }
    for mod in ("triton", "transformers", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, never fail
            info[mod] = f"unavailable ({type(e).__name__})"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["host_memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        info["host_memory_gib"] = None
    info["gpus"] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {"index": i, "name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1), "sms": prop.multi_processor_count}
            )
        try:
            import pynvml

            pynvml.nvmlInit()
            for g in info["gpus"]:
                h = pynvml.nvmlDeviceGetHandleByIndex(g["index"])
                g["pcie_gen"] = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)
                g["pcie_width"] = pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)
                g["pcie_gen_max"] = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
                g["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # noqa: BLE001
            info["pynvml"] = f"unavailable ({type(e).__name__}: {e})"
    from .. import _native

    info["native_extension"] = _native.status()
    triton_ok = not str(info["triton"]).startswith("unavailable")
    info["fused_kernels"] = "triton" if triton_ok and (torch.cuda.is_available() or info["triton_interpret"]) else "reference"
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "gpus":
            for g in value:
                print(f"gpu {g['index']}: " + ", ".join(f"{k}={v}" for k, v in g.items() if k != "index"))
            if not value:
                print("gpu: none")
        else:
            print(f"{key}: {value}")
    return 0
