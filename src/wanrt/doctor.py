"""What this machine can run: torch, CUDA, GPUs (NVML), TensorRT, PyAV codecs, diffusers."""

from __future__ import annotations

import importlib
import platform


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", "installed")
    except Exception as e:  # missing or broken: say which
        return f"missing ({type(e).__name__}: {e})".splitlines()[0][:160]


def gpu_report() -> dict:
    """NVML view of each GPU; {"available": False, "reason": ...} on machines without one."""
    try:
        import pynvml
    except Exception as e:
        return {"available": False, "reason": f"nvidia-ml-py not importable: {e}"}
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return {"available": False, "reason": f"no NVIDIA GPU (NVML: {e})"}
    def safe(fn, *a):  # any one query may be unsupported (utilisation on a MIG GPU): that field is null
        try:
            return fn(*a)
        except Exception:
            return None

    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = safe(pynvml.nvmlDeviceGetHandleByIndex, i)
            if h is None:
                gpus.append({"index": i, "error": "NVML could not open this GPU"})
                continue
            mem = safe(pynvml.nvmlDeviceGetMemoryInfo, h)
            util = safe(pynvml.nvmlDeviceGetUtilizationRates, h)
            power = safe(pynvml.nvmlDeviceGetPowerUsage, h)
            name = safe(pynvml.nvmlDeviceGetName, h)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_mb": mem.total // 2**20 if mem is not None else None,
                "memory_used_mb": mem.used // 2**20 if mem is not None else None,
                "utilization_gpu_pct": util.gpu if util is not None else None,
                "utilization_memory_pct": util.memory if util is not None else None,
                "temperature_c": safe(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
                "power_w": power / 1000 if power is not None else None,
                "clock_sm_mhz": safe(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
                "clock_mem_mhz": safe(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM),
            })
        return {"available": True, "driver": _s(safe(pynvml.nvmlSystemGetDriverVersion)), "gpus": gpus}
    except Exception as e:  # the count itself failed: no view, never a crash of doctor, /debug/gpu or /metrics
        return {"available": False, "reason": f"NVML: {type(e).__name__}: {e}"}
    finally:
        pynvml.nvmlShutdown()


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def report() -> dict:
    info: dict = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
            cap = torch.cuda.get_device_capability(0)
            info["fp8_supported"] = cap >= (8, 9)
    except Exception as e:
        info["torch"] = f"missing ({e})"
    info["diffusers"] = _version("diffusers")
    info["transformers"] = _version("transformers")
    info["tensorrt"] = _version("tensorrt")
    info["onnx"] = _version("onnx")
    info["onnxruntime"] = _version("onnxruntime")
    gpu = gpu_report()
    info["nvml"] = gpu if not gpu.get("available") else {"driver": gpu["driver"], "gpus": len(gpu["gpus"])}
    try:
        import av

        info["pyav"] = av.__version__
        info["h264_encoder"] = "libx264" if "libx264" in av.codecs_available else "missing"
    except Exception as e:
        info["pyav"] = f"missing ({e})"
    return info
