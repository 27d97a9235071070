"""Rebuild the reconstructed nvidia-smi outputs here (see README.md) in the layouts of drivers 535 (89 columns) and
545-580 (91 columns). Run: python tests/data/detect/reconstruct.py tests/data/detect
It first regenerates the real H100 capture and stops unless that reproduces the real file byte for byte."""
import os, sys

def table(date, drv, cuda, gpus, procs, *, wide=True, model_col="Persistence-M", sep_plus=False, blank=None):
    c2 = 24 if wide else 22
    W = 41 + c2 + 22 + 2
    L = [date + "       ", "+" + "-" * W + "+"]
    if wide:
        head = f" NVIDIA-SMI {drv:<23}Driver Version: {drv:<15}CUDA Version: {cuda:<9}"
    else:
        head = f" NVIDIA-SMI {drv:<23}Driver Version: {drv:<13}CUDA Version: {cuda:<9}"
    L.append("|" + head.ljust(W) + "|")
    edge = "+" if sep_plus else "|"
    L.append(edge + "-" * 41 + "+" + "-" * c2 + "+" + "-" * 22 + "+")
    if wide:
        L.append("| GPU  Name" + model_col.rjust(30) + " | Bus-Id          Disp.A | Volatile Uncorr. ECC |")
        L.append("| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |")
        L.append("|                                         |                        |               MIG M. |")
    else:
        L.append("| GPU  Name" + model_col.rjust(30) + " | Bus-Id        Disp.A | Volatile Uncorr. ECC |")
        L.append("| Fan  Temp   Perf          Pwr:Usage/Cap |         Memory-Usage | GPU-Util  Compute M. |")
        L.append("|                                         |                      |               MIG M. |")
    L.append("|" + "=" * 41 + "+" + "=" * c2 + "+" + "=" * 22 + "|")
    for g in gpus:
        namepm = (g["name"].ljust(31 - max(0, len(g["pm"]) - 3)) + g["pm"].ljust(3) + " ") if wide else \
                 (g["name"].ljust(34 - len(g["pm"])) + g["pm"] + " ")
        bus = (f"   {g['bus']} {g['disp']:>3} ") if wide else (f" {g['bus']} {g['disp']:>3} ")
        L.append(f"|{g['i']:>4}  {namepm}|{bus}|{g['ecc']:>21} |")
        mem = f"{g['used']}MiB / {g['total']:>6}MiB" if wide else f"{g['used']}MiB / {g['total']}MiB"
        L.append(f"| {g['fan']:>3}   {g['temp']}    {g['perf']}{g['pwr']:>24} |{mem:>{c2 - 1}} |{g['util']:>8}      Default |")
        L.append(f"|                                         |{'':{c2}}|{g['mig']:>21} |")
        L.append("+" + "-" * 41 + "+" + "-" * c2 + "+" + "-" * 22 + "+")
    L.append(" " * (W + 2) if blank is None else blank)
    L.append("+" + "-" * W + "+")
    L.append("| Processes:".ljust(W + 1) + "|")
    pid_hdr = "        PID" if not sep_plus else "              PID"
    L.append(("|  GPU   GI   CI" + pid_hdr + "   Type   Process name").ljust(W - 10) + "GPU Memory |")
    L.append("|        ID   ID".ljust(W - 10) + "Usage      |")
    L.append("|" + "=" * W + "|")
    if not procs:
        L.append("|  No running processes found".ljust(W + 1) + "|")
    for gpu, pid, typ, name, mib in procs:
        L.append(f"|{gpu:>5}  N/A  N/A{pid:>11}{typ:>7}   {name:<{W - 48}}{(str(mib) + 'MiB') if isinstance(mib, int) else mib:>11} |")
    L.append("+" + "-" * W + "+")
    return "\n".join(L) + "\n"

def gpu(i, name, total, used, **kw):
    d = dict(i=i, name=name, total=total, used=used, pm="Off", bus="00000000:01:00.0", disp="On", ecc="N/A",
             fan="0%", temp="41C", perf="P8", pwr="21W /  450W", util="2%", mig="N/A")
    d.update(kw)
    return d

if __name__ == "__main__":
    out = sys.argv[1]
    # Self-check against the real capture (driver 580 layout: '+' edges under the header, empty separator line).
    real = open(os.path.join(out, "h100_80gb_hbm3/plain.txt")).read()
    again = table("Fri Nov 27 12:01:45 2026", "580.159.04", "13.0",
                  [gpu(0, "NVIDIA H100 80GB HBM3", 81559, 0, pm="On", bus="00000000:00:06.0", disp="Off", ecc="0",
                       fan="N/A", temp="33C", perf="P0", pwr="107W /  700W", util="0%", mig="Disabled")],
                  [], sep_plus=True, blank="")
    if again != real:
        import difflib
        sys.exit("".join(difflib.unified_diff(real.splitlines(True), again.splitlines(True))))
    cases = {
        "rtx4070_12gb": dict(date="Thu Oct 10 19:22:05 2024", drv="560.35.03", cuda="12.6",
            gpus=[gpu(0, "NVIDIA GeForce RTX 4070", 12282, 686, pwr="11W /  200W", temp="38C")],
            procs=[(0, 1873, "G", "/usr/lib/xorg/Xorg", 402), (0, 2051, "G", "/usr/bin/gnome-shell", 141),
                   (0, 3390, "G", "...seed-version=20241008-180137.331000", 97)],
            smi=[("0", "GPU-3b2f9c41-7a0e-5d6c-8e1f-2a4b6c8d0e12", "NVIDIA GeForce RTX 4070", 12282, 11243, "8.9")]),
        "rtx4060ti_16gb_windows": dict(date="Sat Jan 11 20:14:37 2025", drv="566.36", cuda="12.7",
            model_col="Driver-Model",
            gpus=[gpu(0, "NVIDIA GeForce RTX 4060 Ti", 16380, 812, pm="WDDM", pwr="9W /  165W", temp="36C")],
            procs=[(0, 7212, "C+G", "C:\\Windows\\explorer.exe", "N/A")],
            smi=[("0", "GPU-8d1e4f7a-2c3b-9e50-a6f1-7b2c9d3e4f50", "NVIDIA GeForce RTX 4060 Ti", 16380, 15214, "8.9")]),
        "rtx4080": dict(date="Tue Sep 17 08:03:51 2024", drv="550.120", cuda="12.4",
            gpus=[gpu(0, "NVIDIA GeForce RTX 4080", 16376, 150, pwr="7W /  320W", temp="33C", disp="Off")],
            procs=[],
            smi=[("0", "GPU-c27e04b9-51f3-8d2a-0b6e-94f1a3c5d7e8", "NVIDIA GeForce RTX 4080", 16376, 15876, "8.9")]),
        "rtx3090": dict(date="Mon Jun 17 09:41:12 2024", drv="535.183.01", cuda="12.2", wide=False,
            gpus=[gpu(0, "NVIDIA GeForce RTX 3090", 24576, 2, disp="Off", fan="30%", temp="34C",
                      pwr="19W / 350W", util="0%")],
            procs=[],
            smi=[("0", "GPU-5a0e7c1d-93b4-2f68-c1d0-8e7f6a5b4c3d", "NVIDIA GeForce RTX 3090", 24576, 24237, "8.6")]),
        "rtx4090": dict(date="Tue Mar 12 14:02:11 2024", drv="550.54.15", cuda="12.4",
            gpus=[gpu(0, "NVIDIA GeForce RTX 4090", 24564, 1205, ecc="Off")],
            procs=[(0, 1425, "G", "/usr/lib/xorg/Xorg", 612), (0, 1690, "G", "/usr/bin/gnome-shell", 198),
                   (0, 2874, "G", "...irefox/firefox --type=gpu-process", 371)],
            smi=[("0", "GPU-4c1f8a92-6d3e-7b05-a9c8-1e2d3f4a5b6c", "NVIDIA GeForce RTX 4090", 24564, 23012, "8.9")]),
        "2x_rtx3090": dict(date="Wed Aug 21 22:47:30 2024", drv="535.183.01", cuda="12.2", wide=False,
            gpus=[gpu(0, "NVIDIA GeForce RTX 3090", 24576, 512, fan="30%", temp="45C", pwr="32W / 350W", util="3%"),
                  gpu(1, "NVIDIA GeForce RTX 3090", 24576, 2, bus="00000000:21:00.0", disp="Off", fan="30%",
                      temp="37C", pwr="18W / 350W", util="0%")],
            procs=[(0, 2231, "G", "/usr/lib/xorg/Xorg", 398), (0, 2467, "G", "/usr/bin/gnome-shell", 101)],
            smi=[("0", "GPU-0f3a6b2e-4c8d-1e97-b5a0-d2c4e6f8a1b3", "NVIDIA GeForce RTX 3090", 24576, 23727, "8.6"),
                 ("1", "GPU-e9b71d04-a2c6-35f8-8d1e-60b4c2a7f953", "NVIDIA GeForce RTX 3090", 24576, 24237, "8.6")]),
    }
    for name, c in cases.items():
        os.makedirs(os.path.join(out, name), exist_ok=True)
        smi = c.pop("smi")
        with open(os.path.join(out, name, "plain.txt"), "w") as f:
            f.write(table(**c))
        with open(os.path.join(out, name, "query.csv"), "w") as f:
            for i, uuid, nm, tot, free, cc in smi:
                f.write(f"{i}, {uuid}, {nm}, {tot}, {free}, {cc}, {c['drv']}\n")
