"""Imported by every Python process of scripts/bench_gpus.py (on PYTHONPATH): when SWFT_BENCH_CAP_GIB is set, caps
this process's CUDA allocator at that many GiB on its own GPU (LOCAL_RANK) before anything allocates, as bench.py
does for one process, and at exit writes this rank's peak memory to $SWFT_BENCH_PEAKS/peak-rankR.json."""

import atexit
import json
import os

if os.environ.get("SWFT_BENCH_CAP_GIB") and "LOCAL_RANK" in os.environ:
    import torch

    if torch.cuda.is_available():
        _device = int(os.environ["LOCAL_RANK"])
        _total = torch.cuda.get_device_properties(_device).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, float(os.environ["SWFT_BENCH_CAP_GIB"]) * 2**30 / _total), _device)

        def _write_peak():
            folder = os.environ.get("SWFT_BENCH_PEAKS")
            if folder:
                rank = os.environ.get("RANK", "0")
                with open(os.path.join(folder, f"peak-rank{rank}.json"), "w") as f:
                    json.dump({"rank": int(rank),
                               "peak_allocated_gib": round(torch.cuda.max_memory_allocated(_device) / 2**30, 2),
                               "peak_reserved_gib": round(torch.cuda.max_memory_reserved(_device) / 2**30, 2)}, f)

        atexit.register(_write_peak)
