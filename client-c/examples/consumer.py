"""Demo consumer (Python): a member of a consumer group. Reads every batch
in place (zero-copy memoryview), checks its crc32, records
"seq partition offset latency_ns ok" per batch, and exits once DONE_FILE
exists and no batch arrived for half a second. With FERRY_DEMO_DEVICE=cuda:N
the batches arrive in that GPU's memory as PyTorch CUDA tensors (no copy);
the crc32 check then copies each back to host memory.

    python3 consumer.py STREAM GROUP OUT_FILE DONE_FILE
"""

import os
import struct
import sys
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import ferry  # noqa: E402

META = struct.Struct("<QQII")


def main():
    stream, group, out_path, done_path = sys.argv[1:5]
    device = os.environ.get("FERRY_DEMO_DEVICE", "cpu")
    if device != "cpu":
        import torch  # noqa: F401  (GPU batches are read as CUDA tensors)
    client = ferry.Client()
    for _ in range(200):
        try:
            cons = client.consumer(stream, group, prefetch=4, device=device)
            break
        except ferry.FerryError as e:
            if e.status != ferry.E_UNKNOWN_STREAM:
                raise
            time.sleep(0.01)  # the producer creates the stream
    else:
        sys.exit("consumer.py: stream never appeared")
    n = 0
    with open(out_path, "w") as out:
        while True:
            try:
                b = cons.next(timeout_s=0.5)
            except ferry.Timeout:
                if os.path.exists(done_path):
                    break
                continue
            now = time.monotonic_ns()  # CLOCK_MONOTONIC, as in the C producer
            seq, publish_ns, crc, _ = META.unpack(b.meta) if len(b.meta) == META.size else (0, now, 0, 0)
            data = b.data if b.device is None else b.tensor().cpu().numpy()
            ok = int(len(b.meta) == META.size and zlib.crc32(data) == crc)
            out.write(f"{seq} {b.partition} {b.offset} {now - publish_ns} {ok}\n")
            b.release()
            n += 1
            if n % 16 == 0:
                cons.commit()
    cons.commit()
    cons.close()


if __name__ == "__main__":
    main()
