"""Per-device backend preference tables, one `<device slug>.json` per GPU model.

`benchmarks/kernels.py` measures every op on every backend and writes the table of the GPU
it ran on here (`fastrlhf.ops.dispatch.device_slug` of the device name, e.g.
`nvidia-h100-80gb-hbm3.json`):

    {"device": "NVIDIA H100 80GB HBM3", "date": "...", "ops": {"rms_norm": ["triton", "cuda", "torch"], ...}}

For each op, the backends from fastest to slowest. Commit a table here to ship it: the JSON
files are package data (setup.py), and `fastrlhf.ops.dispatch.load_device_table` reads them
through importlib.resources, so `auto` uses them from a wheel as well as from a checkout.
This file makes the folder a package, which importlib.resources needs to find it.
"""
