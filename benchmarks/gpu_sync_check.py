"""Does masking the stop ids wait for the GPU? (CUDA; the check behind decode.MinLength's device index)

    python3 benchmarks/gpu_sync_check.py

torch's sync debug mode warns on every synchronising CUDA call. A Python list used as an index
is copied to the device on each call, and that copy synchronises: once per token it cost the
overlapped decode loop its overlap. The ids as a device tensor (made once) do not.
"""
import warnings

import torch


def synchronising_calls(fn) -> int:
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def main() -> int:
    logits = torch.zeros(1, 248320, device="cuda")
    stop_ids = [248044, 248046]
    index = torch.tensor(stop_ids, device="cuda")
    listed = synchronising_calls(lambda: logits.__setitem__((..., stop_ids), float("-inf")))
    on_device = synchronising_calls(lambda: logits.index_fill_(-1, index, float("-inf")))
    print(f"synchronising calls: list index {listed}, device index_fill_ {on_device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
