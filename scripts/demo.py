#!/usr/bin/env python3
"""Ferry demo: two ferryd daemons as two hosts of one cluster (on loopback,
with the soft fabric), one C producer of image-like batches on the first,
and two consumers in one group, a C one on the first host and a Python one
on the second, which reads its batches where the first host's daemon wrote
them over the fabric. Shows progress while it runs and ends with a summary:
batches and bytes per consumer and host, hand-off latency p50/p99, and a
check that every produced batch was delivered exactly once across the
group and the hosts with intact bytes. --hosts 1 runs it on one host."""

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_shape(text):
    dims = [int(x) for x in text.lower().split("x")]
    n = 1
    for d in dims:
        n *= d
    return n


def status(admin):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(str(admin))
    s.sendall(b'{"cmd":"status"}\n')
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    answer = json.loads(data)
    if "status" not in answer:
        raise ValueError(answer.get("error", answer))
    return answer["status"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0, help="how long the producer runs")
    ap.add_argument("--batch", default="64x3x224x224", help="batch shape of uint8 (product = bytes per batch)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--slots", type=int, default=16, help="slots in the stream's pool")
    ap.add_argument("--hosts", type=int, default=2, choices=(1, 2),
                    help="daemons: 2 (two hosts of a cluster on loopback) or 1")
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    ap.add_argument("--device", default="cpu",
                    help="where the Python consumer takes its batches: cpu, or cuda:N for GPU delivery "
                         "(needs a GPU and PyTorch, which checks each batch's crc32 after copying it back)")
    args = ap.parse_args()

    bins = pathlib.Path(args.bin_dir)
    batch_bytes = parse_shape(args.batch)
    work = pathlib.Path(tempfile.mkdtemp(prefix="ferry-demo-"))
    names = ["host-a", "host-b"][: args.hosts]
    ports = [free_port() for _ in names]
    secret = work / "cluster.secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o600)
    hosts = {}
    for i, name in enumerate(names):
        d = work / name
        d.mkdir()
        cfg = f'version = 1\n[daemon]\nsocket = "{d / "ferryd.sock"}"\n'
        if args.hosts > 1:
            peers = ", ".join(f'{{ node_id = "{n}", addr = "127.0.0.1:{p}" }}'
                              for n, p in zip(names, ports) if n != name)
            cfg += (f'[cluster]\nnode_id = "{name}"\nlisten = "127.0.0.1:{ports[i]}"\n'
                    f'secret_file = "{secret}"\npeers = [{peers}]\n')
        (d / "ferryd.toml").write_text(cfg)
        hosts[name] = {"dir": d, "sock": d / "ferryd.sock", "admin": d / "ferryd-admin.sock"}
    home, other = names[0], names[-1]
    # The Python consumer reads on the second host, unless it takes its
    # batches into a GPU (a stream homed elsewhere goes to host memory).
    py_host, c_host = (other, home) if args.device == "cpu" else (home, other)

    def env_of(host):
        return dict(os.environ, FERRY_SOCKET=str(hosts[host]["sock"]), FERRY_LIB=str(bins / "libferry.so"),
                    FERRY_DEMO_DEVICE=args.device)

    done = work / "producer-done"
    where = "two hosts (two ferryd on loopback, soft fabric)" if args.hosts > 1 else "one host"
    print(f"ferry demo on {where}: {args.seconds:.0f} s, batches of {args.batch} uint8 ({human(batch_bytes)}), "
          f"{args.partitions} partitions, {args.slots} slots; producer and C consumer on {home}, Python consumer "
          f"on {py_host} ({args.device}); work dir {work}")
    daemons = {}
    for name, h in hosts.items():
        log = open(h["dir"] / "ferryd.log", "w")
        daemons[name] = subprocess.Popen([str(bins / "ferryd"), "--config", str(h["dir"] / "ferryd.toml")],
                                         stderr=log)
    for name, h in hosts.items():
        for _ in range(250):
            if h["sock"].exists() and h["admin"].exists():
                break
            time.sleep(0.02)
        else:
            sys.exit(f"ferryd of {name} did not start; see {h['dir'] / 'ferryd.log'}")
    if args.hosts > 1:
        for _ in range(250):
            try:
                if all(p["state"] == "up" for p in status(hosts[other]["admin"])["peers"]):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        else:
            sys.exit(f"the two daemons did not connect; see {work}/*/ferryd.log")

    admin = hosts[home]["admin"]
    consumers = {
        f"C consumer ({c_host})": subprocess.Popen(
            [str(bins / "demo-consumer"), "images", "trainers", str(work / "c.txt"), str(done)],
            env=env_of(c_host)),
        f"Python consumer ({py_host})": subprocess.Popen(
            [sys.executable, str(ROOT / "client-c" / "examples" / "consumer.py"), "images", "trainers",
             str(work / "py.txt"), str(done)], env=env_of(py_host)),
    }
    producer = subprocess.Popen(
        [str(bins / "demo-producer"), "images", str(batch_bytes), str(args.seconds), str(args.partitions),
         str(args.slots)], env=env_of(home), stdout=subprocess.PIPE, text=True)

    start = time.time()
    tty = sys.stdout.isatty()
    last_print = 0.0
    while producer.poll() is None:
        time.sleep(0.25)
        try:
            st = status(admin)
        except (OSError, ValueError):
            continue
        streams = [s for s in st["streams"] if s["name"] == "images"]
        if not streams:
            continue
        s = streams[0]
        per_host = {}
        for g in s["groups"]:
            for m in g["members"]:
                h = m.get("host") or home
                per_host[h] = per_host.get(h, 0) + m["delivered"]
        delivered = "  ".join(f"{h} {n:6d}" for h, n in sorted(per_host.items()))
        lag = sum(g["lag"] for g in s["groups"])
        el = time.time() - start
        line = (f"[{el:5.1f}s] published {s['published']:6d} ({human(s['published'] * batch_bytes / max(el, 1e-9))}/s)"
                f"  delivered: {delivered}  slots held {s['slots_held']:2d}/{s['slot_count']}  lag {lag}")
        if tty:
            print("\r" + line, end="", flush=True)
        elif el - last_print >= 1.0:
            print(line, flush=True)
            last_print = el
    if tty:
        print()
    out = producer.stdout.read().split()
    if producer.returncode != 0 or len(out) < 2:
        sys.exit(f"producer failed (exit {producer.returncode})")
    produced = int(out[1])
    done.touch()
    for name, p in consumers.items():
        if p.wait(timeout=60) != 0:
            sys.exit(f"{name} failed (exit {p.returncode})")

    final = status(admin)
    ends = [s for s in final["streams"] if s["name"] == "images"][0]["end_offsets"]
    # The consumers' host first, then the home (which drains what is left).
    daemon_rc = {}
    for name in reversed(names):
        daemons[name].terminate()
        daemon_rc[name] = daemons[name].wait(timeout=30)

    records = {}
    for name, f in ((f"C consumer ({c_host})", "c.txt"), (f"Python consumer ({py_host})", "py.txt")):
        rows = []
        for line in (work / f).read_text().split("\n"):
            if line.strip():
                seq, part, off, lat, ok = line.split()
                rows.append((int(seq), int(part), int(off), int(lat), int(ok)))
        records[name] = rows

    print()
    print("summary")
    all_lat = []
    for name, rows in records.items():
        lat = [r[3] for r in rows]
        all_lat += lat
        print(f"  {name:26s} {len(rows):6d} batches  {human(len(rows) * batch_bytes):>11s}  "
              f"hand-off p50 {pct(lat, 50) / 1000:8.1f} us  p99 {pct(lat, 99) / 1000:8.1f} us")
    print(f"  {'all':26s} {sum(len(r) for r in records.values()):6d} batches  "
          f"hand-off p50 {pct(all_lat, 50) / 1000:8.1f} us  p99 {pct(all_lat, 99) / 1000:8.1f} us")

    rows = [r for rs in records.values() for r in rs]
    seqs = sorted(r[0] for r in rows)
    places = sorted((r[1], r[2]) for r in rows)
    expect_places = sorted((p, o) for p, end in enumerate(ends) for o in range(end))
    bad_crc = sum(1 for r in rows if not r[4])
    checks = [
        (f"every produced batch delivered exactly once across the group"
         f"{' and the hosts' if args.hosts > 1 else ''} ({produced} produced)",
         seqs == list(range(produced))),
        (f"every (partition, offset) delivered once, per-partition end offsets {ends}", places == expect_places),
        ("every batch's bytes intact (crc32)", bad_crc == 0),
        (f"both consumers received work{', on both hosts' if args.hosts > 1 else ''}", all(records.values())),
        (f"{' and '.join(names)}: ferryd drained and exited 0 on SIGTERM", all(rc == 0 for rc in daemon_rc.values())),
    ]
    ok = True
    for text, passed in checks:
        print(f"  [{'ok' if passed else 'FAIL'}] {text}")
        ok &= passed
    if not ok:
        print(f"demo FAILED; logs in {work}")
        sys.exit(1)
    print("demo passed")
    subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
