import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "client-c" / "python"))


def _bin(name):
    d = os.environ.get("FERRY_BIN_DIR")
    for cand in ([pathlib.Path(d)] if d else []) + [ROOT / "target" / "debug", ROOT / "target" / "release"]:
        if (cand / name).exists():
            return cand / name
    pytest.fail(f"{name} not built: run `cargo build --workspace` (scripts/test.sh does)")


class Daemon:
    def __init__(self, extra=""):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="ferry-py-"))
        self.socket = self.dir / "ferryd.sock"
        self.admin = self.dir / "ferryd-admin.sock"
        cfg = self.dir / "ferryd.toml"
        cfg.write_text(f'version = 1\n[daemon]\nsocket = "{self.socket}"\n{extra}\n')
        self.log = open(self.dir / "ferryd.log", "w")
        self.proc = subprocess.Popen([str(_bin("ferryd")), "--config", str(cfg)], stderr=self.log)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.socket.exists() and self.admin.exists():
                return
            time.sleep(0.01)
        raise RuntimeError("ferryd did not start: " + (self.dir / "ferryd.log").read_text())

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture
def daemon():
    d = Daemon()
    yield d
    d.stop()
